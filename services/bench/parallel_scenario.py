"""`llmesh bench --scenario parallel`: TP and PP groups against one rank, on one machine.

Arms: TP=1, TP=2, PP=2 with one micro-batch and with the default (one per
stage). Each arm is a real group (this process is rank 0 and runs the
engine, as the target service does; the other ranks are its child
processes over Gloo), driven in-process by closed-loop greedy requests at
concurrency 1 and 32. Reported per arm: tokens/s (``tps_c1``, ``tps_c32``),
per rank where the c32 steps' time went (compute, collectives,
point-to-point waits = pipeline bubble), weight bytes and peak RSS after
load. ``identical_greedy``: every arm's greedy tokens at concurrency 1 equal
TP=1's. ``weight_memory_ratio_tp2`` / ``_pp2``: the largest rank's weight
bytes over TP=1's (goal <= 0.6). Clocks: time.perf_counter() seconds.
"""

from __future__ import annotations

import gc
import threading
import time

from services.bench.scenarios import SCENARIOS, BenchOptions
from services.engine.sequence import GenerationRequest, SamplingOptions
from services.engine.settings import EngineSettings
from services.models.corpus import heldout_prompts
from services.parallel.build import build_parallel_engine
from services.parallel.group import ParallelSpec

ARMS = {"tp1": (1, 1, 0), "tp2": (2, 1, 0), "pp2_mb1": (1, 2, 1), "pp2": (1, 2, 0)}


def _closed_loop(engine, prompts: list[list[int]], concurrency: int, total: int, new_tokens: int
                 ) -> tuple[float, list[list[int]], int]:
    """``total`` greedy requests, ``concurrency`` at a time: (tokens/s, tokens per request, errors)."""
    outputs: list[list[int]] = [[] for _ in range(total)]
    errors = 0
    lock = threading.Lock()
    done = threading.Event()
    state = {"next": 0, "finished": 0}

    def submit_next() -> None:
        with lock:
            i = state["next"]
            if i >= total:
                return
            state["next"] += 1
        req = GenerationRequest(prompt_ids=prompts[i % len(prompts)],
                                sampling=SamplingOptions(max_new_tokens=new_tokens, ignore_eos=True))

        def sink(ev, i=i) -> None:
            nonlocal errors
            outputs[i].extend(ev.token_ids)
            if ev.finish_reason is not None:
                with lock:
                    errors += ev.error is not None
                    state["finished"] += 1
                    finished = state["finished"]
                if finished == total:
                    done.set()
                else:
                    submit_next()
        engine.submit(req, sink)

    t0 = time.perf_counter()
    for _ in range(min(concurrency, total)):
        submit_next()
    done.wait()
    took = time.perf_counter() - t0
    return sum(map(len, outputs)) / took, outputs, errors


def _delta(after, before) -> dict:
    keys = ("step_s", "collective_s", "recv_wait_s", "send_wait_s")
    d = {k: getattr(after, k) - getattr(before, k) for k in keys}
    d["compute_s"] = max(0.0, d["step_s"] - d["collective_s"] - d["recv_wait_s"] - d["send_wait_s"])
    return d


def _arm(model_dir, tp: int, pp: int, micro: int, threads: int, prompts, new_tokens: int, c1_n: int,
         c32_n: int) -> dict:
    spec = ParallelSpec(model=str(model_dir), tp=tp, pp=pp, micro_batches=micro,
                        threads=max(1, threads // (tp * pp)))
    loaded = build_parallel_engine(spec, EngineSettings(max_batch_size=32, num_slots=64))
    engine, runner = loaded.engine, loaded.engine.runner
    try:
        runner.warmup()
        engine.start()
        tps_c1, greedy, err1 = _closed_loop(engine, prompts, 1, c1_n, new_tokens)
        before = runner.stats()
        tps_c32, _, err32 = _closed_loop(engine, prompts, 32, c32_n, new_tokens)
        after = runner.stats()
    finally:
        engine.stop()
        loaded.close()
        gc.collect()
    ranks = []
    for a, b in zip(after, before):
        d = _delta(a, b)
        step = d["step_s"] or 1.0
        ranks.append({"rank": a.rank, "stage": a.stage, "tp_rank": a.tp_rank, "weight_bytes": a.weight_bytes,
                      "peak_rss_mib": round(a.peak_rss_bytes / 2**20, 1),
                      "compute_fraction": round(d["compute_s"] / step, 3),
                      "communication_fraction": round((d["collective_s"] + d["send_wait_s"]) / step, 3),
                      "bubble_fraction": round(d["recv_wait_s"] / step, 3), "step_s": round(d["step_s"], 3)})
    out = {"tps_c1": round(tps_c1, 1), "tps_c32": round(tps_c32, 1), "errors": err1 + err32, "ranks": ranks,
           "micro_batches": spec.default_micro_batches, "greedy": greedy}
    if pp > 1:
        m = spec.default_micro_batches
        out["bubble_fraction"] = round(sum(r["bubble_fraction"] for r in ranks) / len(ranks), 3)
        out["bubble_fraction_ideal"] = round((pp - 1) / (m + pp - 1), 3)
    return out


def parallel(opts: BenchOptions, new_tokens: int = 32, c1_requests: int = 2, c32_requests: int = 32) -> dict:
    """Every arm of :data:`ARMS` on ``opts.model`` (see the module docstring)."""
    from transformers import AutoTokenizer

    model_dir = opts.model_dir(opts.model)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    prompts = [tok(p)["input_ids"] for p in heldout_prompts(32, seed=0)]
    arms = {}
    for name, (tp, pp, micro) in ARMS.items():
        if opts.progress:
            print(f"parallel: arm {name} (tp={tp}, pp={pp}, micro-batches={micro or 'default'})", flush=True)
        arms[name] = _arm(model_dir, tp, pp, micro, opts.threads, prompts, new_tokens, c1_requests, c32_requests)
    ref = arms["tp1"]
    tp1_bytes = ref["ranks"][0]["weight_bytes"]
    result = {
        "scenario": "parallel", "model": opts.model, "threads": opts.threads, "new_tokens": new_tokens,
        "identical_greedy": all(a["greedy"] == ref["greedy"] for a in arms.values()),
        "weight_memory_ratio_tp2": round(max(r["weight_bytes"] for r in arms["tp2"]["ranks"]) / tp1_bytes, 3),
        "weight_memory_ratio_pp2": round(max(r["weight_bytes"] for r in arms["pp2"]["ranks"]) / tp1_bytes, 3),
        "tps_c32": {name: a["tps_c32"] for name, a in arms.items()},
        "tps_c1": {name: a["tps_c1"] for name, a in arms.items()},
        "bubble_fraction": {name: a["bubble_fraction"] for name, a in arms.items() if "bubble_fraction" in a},
        "errors": sum(a["errors"] for a in arms.values()),
        "arms": {name: {k: v for k, v in a.items() if k != "greedy"} for name, a in arms.items()},
    }
    return result


SCENARIOS["parallel"] = parallel
