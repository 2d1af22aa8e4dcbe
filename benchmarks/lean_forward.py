"""The lean forward against transformers' module tree, in one process (issue 16, points 2 and 5).

An offline measurement (not a test, not part of ``llmesh bench``), on the
built models (``~/.cache/llmesh/models``), with the services' engine and
thread setup (``OMP_WAIT_POLICY=PASSIVE``, one interop thread):

- the draft (one torch thread, as ``llmesh bench`` runs it): ms per proposed token of γ = 4 rounds through the draft
  service's proposer (``DraftProposer`` on a persistent sequence, the engine
  on its own thread, as ``DraftModel/Propose`` drives it; each round
  discards one proposal and appends two tokens, as a partly accepted round
  does), and the ms of one bare one-token forward;
- the target: tokens/s of a greedy request at concurrency 1 through the
  engine (decode steps only: first to last token), and its model-bandwidth
  utilisation (``mbu``, :mod:`services.bench.machine`) at that context.

Each figure is taken for both paths of the same loaded runner (transformers'
modules, then the lean forward, alternating ``--repeats`` times; the median
of each arm), so the ratio compares like with like on a shared machine. Run
it in a tree without the lean forward and it measures that tree's one path.

    flock /tmp/bench.lock python benchmarks/lean_forward.py [--threads 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from services.bench.machine import machine_info, mbu  # noqa: E402
from services.common.paths import default_model_path  # noqa: E402
from services.draft.proposer import DraftProposer, StreamStart  # noqa: E402
from services.engine.async_engine import AsyncEngine  # noqa: E402
from services.engine.build import build_engine  # noqa: E402
from services.engine.model_runner import ForwardRow  # noqa: E402
from services.engine.sequence import GenerationRequest, SamplingOptions  # noqa: E402
from services.engine.settings import EngineSettings  # noqa: E402
from services.speculative.sync import Round  # noqa: E402

GAMMA = 4
PROMPT = list(range(20, 60))


def _arms(runner) -> dict:
    """name -> value of ``runner.lean`` for that arm (one arm in a tree without it)."""
    if not hasattr(runner, "lean"):
        return {"tree": None}
    lean = runner.lean
    return {"hf": None, "lean": lean} if lean is not None else {"hf": None}


def _use(runner, arms: dict, name: str) -> None:
    if hasattr(runner, "lean"):
        runner.lean = arms[name]


def bare_forward_ms(runner, arms: dict, repeats: int, n: int = 200) -> dict:
    table = list(range(1, 9))
    runner.forward([ForwardRow(table, 0, PROMPT)])
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(repeats):
        for name in arms:
            _use(runner, arms, name)
            for _ in range(n):
                t0 = time.perf_counter()
                runner.forward([ForwardRow(table, len(PROMPT), [7])])
                times[name].append(time.perf_counter() - t0)
    return {name: round(statistics.median(ts) * 1e3, 3) for name, ts in times.items()}


async def _rounds(engine, rounds: int) -> float:
    """Seconds per proposed token over ``rounds`` rounds of one stream."""
    proposer = DraftProposer(AsyncEngine(engine))
    start = StreamStart("bench", SamplingOptions(max_new_tokens=1, ignore_eos=True))
    tokens, _ = await proposer.propose(Round(0, PROMPT, GAMMA), start)
    t0 = time.perf_counter()
    proposed = 0
    for _ in range(rounds):
        tokens, _ = await proposer.propose(Round(discard=1, append=[tokens[-2], 9], gamma=GAMMA))
        proposed += len(tokens)
    took = time.perf_counter() - t0
    proposer.close()
    return took / proposed


async def _interleaved(engine, arms: dict, repeats: int, measure) -> dict[str, float]:
    """The median of ``measure()`` per arm, arms interleaved ``repeats`` times; on
    one event loop, which outlives the engine thread (stopped here): a closed
    stream's last event is delivered to it."""
    values: dict[str, list[float]] = {name: [] for name in arms}
    try:
        for _ in range(repeats):
            for name in arms:
                _use(engine.runner, arms, name)
                values[name].append(await measure())
    finally:
        await asyncio.to_thread(engine.stop)
    return {name: statistics.median(v) for name, v in values.items()}


async def draft_ms_per_token(engine, arms: dict, repeats: int, rounds: int = 100) -> dict:
    """Milliseconds per proposed token of each arm (median of ``repeats``)."""
    times = await _interleaved(engine, arms, repeats, lambda: _rounds(engine, rounds))
    return {name: round(t * 1e3, 3) for name, t in times.items()}


async def _decode_tps(engine, new_tokens: int) -> float:
    request = GenerationRequest(prompt_ids=PROMPT, sampling=SamplingOptions(max_new_tokens=new_tokens,
                                                                            ignore_eos=True))
    stamps = []
    async for event in AsyncEngine(engine).generate(request):
        stamps += [time.perf_counter()] * len(event.token_ids)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


async def target_tps(engine, arms: dict, repeats: int, new_tokens: int) -> dict:
    """Decode tokens/s of one request at a time, after a warm-up (median of ``repeats``)."""
    await _decode_tps(engine, 8)
    rates = await _interleaved(engine, arms, repeats, lambda: _decode_tps(engine, new_tokens))
    return {name: round(r, 2) for name, r in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draft", default=str(default_model_path("draft")))
    parser.add_argument("--target", default=str(default_model_path("target-large")))
    parser.add_argument("--threads", type=int, default=2, help="the target's torch threads (the bench's use 2; "
                                                                   "the draft has 1, as in the bench)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    out: dict = {"machine": machine_info(args.threads), "gamma": GAMMA, "new_tokens": args.new_tokens}

    # One thread for the draft, as `llmesh bench` starts it (services/bench/scenarios.py _spec_suite).
    draft = build_engine(args.draft, EngineSettings(), device="cpu", threads=1).engine
    arms = _arms(draft.runner)
    out["draft_forward_ms"] = bare_forward_ms(draft.runner, arms, args.repeats)
    draft.start()
    out["draft_ms_per_token"] = asyncio.run(draft_ms_per_token(draft, arms, args.repeats))
    del draft

    target = build_engine(args.target, EngineSettings(), device="cpu", threads=args.threads).engine
    arms = _arms(target.runner)
    target.start()
    tps = asyncio.run(target_tps(target, arms, args.repeats, args.new_tokens))
    context = len(PROMPT) + args.new_tokens / 2
    bandwidth = out["machine"]["memory_bandwidth_gbs"]
    out["target_c1_decode_tps"] = tps
    out["target_mbu_c1"] = {name: mbu(v, Path(args.target), context, bandwidth) for name, v in tps.items()}
    for key in ("draft_forward_ms", "draft_ms_per_token"):
        if "lean" in out[key]:
            out[key + "_ratio"] = round(out[key]["lean"] / out[key]["hf"], 3)
    if "lean" in tps:
        out["target_c1_tps_ratio"] = round(tps["lean"] / tps["hf"], 3)
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
