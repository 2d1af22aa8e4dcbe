"""Benchmark scenarios. Each returns a JSON-able dict with the figures its issue names."""

from __future__ import annotations

import asyncio
import statistics
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import grpc

from services.bench import local_suite, offline
from services.bench.loadgen import RunResult, closed_loop, greedy_request
from services.common.stubs import router_pb2_grpc
from services.models.corpus import heldout_prompts
from services.speculative.gamma import SpeculationSettings


@dataclass
class BenchOptions:
    home: Path
    model: str = "target-large"
    draft: str = "draft"
    router: str = ""          # a running suite; empty: start what the scenario needs
    repeats: int = 3
    threads: int = 2
    progress: bool = True

    def model_dir(self, name: str) -> Path:
        return self.home / "models" / name


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def _suite(opts: BenchOptions, specs_fn):
    """The router address: the given one, or one of a suite started now."""
    if opts.router:
        return nullcontext({"router": opts.router})
    log_dir = Path(tempfile.mkdtemp(prefix="llmesh-bench-"))
    return local_suite.running(specs_fn(), log_dir)


def _prompts(n: int) -> list[str]:
    return heldout_prompts(n, seed=0)


async def _measure(address: str, arms: dict, concurrency: int, total: int, repeats: int, label: str,
                   progress: bool) -> dict[str, list[RunResult]]:
    """Each arm (name -> request maker) ``repeats`` times on the same suite, after a
    warm-up. With several arms the runs are interleaved (off, on, off, on...), so
    that drift over the run (warm caches, a neighbour's load) falls on all alike."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        for make in arms.values():
            await closed_loop(stub, make, min(concurrency, 4), min(total, 4), label=f"{label} warm-up",
                              progress=False)
        runs: dict[str, list[RunResult]] = {name: [] for name in arms}
        for r in range(repeats):
            for name, make in arms.items():
                runs[name].append(await closed_loop(stub, make, concurrency, total,
                                                    label=f"{label} {name}, run {r + 1}".strip(), progress=progress))
        return runs


def batching(opts: BenchOptions, concurrencies=(1, 4, 16, 32), new_tokens: int = 64) -> dict:
    """Served tokens/s through the router at each concurrency vs HF generate at batch 32."""
    prompts = _prompts(256)
    model_dir = opts.model_dir(opts.model)
    offline_tps = offline.hf_generate_tps(model_dir, prompts, new_tokens, 32, opts.repeats)
    # The same, with the weights packed as the engine packs them: the like-for-like baseline.
    packed_tps = offline.hf_generate_tps(model_dir, prompts, new_tokens, 32, opts.repeats, packed=True)

    def specs():
        target = local_suite.target_spec(model_dir, opts.threads, max_batch_size=max(concurrencies))
        return [target, local_suite.router_spec([target.address])]

    make = lambda i: greedy_request(prompts[i % len(prompts)], new_tokens, speculate=False)  # noqa: E731
    points = {}
    with _suite(opts, specs) as addrs:
        for c in concurrencies:
            runs = asyncio.run(_measure(addrs["router"], {"": make}, c, max(4, 2 * c), opts.repeats, f"c={c}",
                                        opts.progress))[""]
            points[c] = runs
    served = {c: median([r.tokens_per_s for r in runs]) for c, runs in points.items()}
    mid = {c: sorted(runs, key=lambda r: r.tokens_per_s)[len(runs) // 2] for c, runs in points.items()}
    cmax, cmin = max(concurrencies), min(concurrencies)
    off, off_packed = median(offline_tps), median(packed_tps)
    return {
        "scenario": "batching", "model": opts.model, "new_tokens": new_tokens, "repeats": opts.repeats,
        "served_tps": {str(c): round(v, 1) for c, v in served.items()},
        "offline_hf_tps_b32": round(off, 1),
        "offline_hf_tps_b32_runs": [round(x, 1) for x in offline_tps],
        "offline_hf_packed_tps_b32": round(off_packed, 1),
        f"ratio_c{cmax}_vs_offline": round(served[cmax] / off, 3) if off else None,
        f"ratio_c{cmax}_vs_offline_packed": round(served[cmax] / off_packed, 3) if off_packed else None,
        f"ratio_c{cmax}_vs_c{cmin}": round(served[cmax] / served[cmin], 2) if served[cmin] else None,
        "ttft_p50_ms": {str(c): r.summary()["ttft_p50_ms"] for c, r in mid.items()},
        "ttft_p99_ms": {str(c): r.summary()["ttft_p99_ms"] for c, r in mid.items()},
        "tpot_p50_ms": {str(c): r.summary()["tpot_p50_ms"] for c, r in mid.items()},
        "e2e_p50_ms": {str(c): r.summary()["e2e_p50_ms"] for c, r in mid.items()},
        "e2e_p99_ms": {str(c): r.summary()["e2e_p99_ms"] for c, r in mid.items()},
        "errors": sum(r.errors for runs in points.values() for r in runs),
    }


#: Concurrencies of the speculation on/off sweep that finds the break-even batch size.
SWEEP_CONCURRENCIES = (1, 2, 4, 8, 16)


def speculation_batch_sweep(opts: BenchOptions, make, concurrencies=SWEEP_CONCURRENCIES) -> dict:
    """Speculation on vs off at each concurrency, on a target that never switches
    speculation off by batch size: where it stops paying is the break-even that
    ``--speculative-disable-by-batch-size`` should be set to."""
    target_dir, draft_dir = opts.model_dir(opts.model), opts.model_dir(opts.draft)

    def specs():
        draft = local_suite.draft_spec(draft_dir, 1)
        target = local_suite.target_spec(target_dir, opts.threads, draft=draft.address, speculative_disable_by_batch_size=1024)
        return [draft, target, local_suite.router_spec([target.address], [draft.address])]

    points = {}
    with local_suite.running(specs(), Path(tempfile.mkdtemp(prefix="llmesh-bench-"))) as addrs:
        for c in concurrencies:
            runs = asyncio.run(_measure(addrs["router"], {"off": make(False, 32), "on": make(True, 32)}, c,
                                        max(4, 2 * c), opts.repeats, f"sweep c={c}", opts.progress))
            off, on = runs["off"], runs["on"]
            off_tps, on_tps = median([r.tokens_per_s for r in off]), median([r.tokens_per_s for r in on])
            points[str(c)] = {"off_tps": round(off_tps, 1), "on_tps": round(on_tps, 1),
                              "ratio": round(on_tps / off_tps, 3) if off_tps else None}
    return points


def break_even(sweep: dict) -> int:
    """The largest concurrency up to which speculation never lost (0: it lost at once)."""
    best = 0
    for c, point in sorted(sweep.items(), key=lambda kv: int(kv[0])):
        if point["ratio"] is None or point["ratio"] < 1.0:
            break
        best = int(c)
    return best


def speculative(opts: BenchOptions, new_tokens: int = 128, prompts_n: int = 6, gamma: int | None = None) -> dict:
    """Target-only vs speculation through the suite vs HF assisted generation, at
    concurrency 1; speculation on/off at concurrency 16 with the default
    settings; and (on a fleet of its own) the on/off sweep over batch sizes."""
    prompts = _prompts(64)
    target_dir, draft_dir = opts.model_dir(opts.model), opts.model_dir(opts.draft)
    hf_rates, hf_outputs = offline.hf_assisted(target_dir, draft_dir, prompts[:prompts_n], new_tokens, opts.repeats)
    hf_packed_rates, _ = offline.hf_assisted(target_dir, draft_dir, prompts[:prompts_n], new_tokens, opts.repeats,
                                             packed=True)

    def specs():
        draft = local_suite.draft_spec(draft_dir, 1)
        target = local_suite.target_spec(target_dir, opts.threads, draft=draft.address)
        return [draft, target, local_suite.router_spec([target.address], [draft.address])]

    def make(spec: bool, n: int):
        return lambda i: greedy_request(prompts[i % n], new_tokens, speculate=spec, gamma=gamma)

    with _suite(opts, specs) as addrs:
        router = addrs["router"]
        c1 = asyncio.run(_measure(router, {"off": make(False, prompts_n), "on": make(True, prompts_n)}, 1,
                                  prompts_n, opts.repeats, "c1 speculation", opts.progress))
        c16 = asyncio.run(_measure(router, {"off": make(False, 32), "on": make(True, 32)}, 16, 32, opts.repeats,
                                   "c16 speculation", opts.progress))
        off, on, off16, on16 = c1["off"], c1["on"], c16["off"], c16["on"]
    sweep = speculation_batch_sweep(opts, make) if not opts.router else {}
    target_only = median([r.tokens_per_s for r in off])
    spec = median([r.tokens_per_s for r in on])
    hf, hf_packed = median(hf_rates), median(hf_packed_rates)
    identical = all([r.tokens for r in a.results] == [r.tokens for r in b.results] for a, b in zip(off, on))
    spec_summary = sorted(on, key=lambda r: r.tokens_per_s)[len(on) // 2].summary()
    return {
        "scenario": "speculative", "model": opts.model, "draft": opts.draft, "new_tokens": new_tokens,
        "prompts": prompts_n, "repeats": opts.repeats, "gamma": gamma or "adaptive",
        "target_only_tps": round(target_only, 1), "spec_tps": round(spec, 1), "hf_assisted_tps": round(hf, 1),
        "speedup_vs_target_only": round(spec / target_only, 3) if target_only else None,
        "ratio_vs_hf_assisted": round(spec / hf, 3) if hf else None,
        "hf_assisted_packed_tps": round(hf_packed, 1),
        "ratio_vs_hf_assisted_packed": round(spec / hf_packed, 3) if hf_packed else None,
        "acceptance_rate": spec_summary["acceptance_rate"], "mean_accepted_len": spec_summary["mean_accepted_len"],
        "identical_greedy": identical,
        "hf_assisted_matches_target_only": [r.tokens for r in off[0].results] == hf_outputs,
        "c16_off_tps": round(median([r.tokens_per_s for r in off16]), 1),
        "c16_on_tps": round(median([r.tokens_per_s for r in on16]), 1),
        "load_ratio_c16": round(median([r.tokens_per_s for r in on16]) / median([r.tokens_per_s for r in off16]), 3),
        # Where a round goes at concurrency 1 (means per round, from the requests' stats).
        "round_draft_wait_ms": spec_summary["round_draft_wait_ms"],
        "round_draft_compute_ms": spec_summary["round_draft_compute_ms"],
        "round_verify_ms": spec_summary["round_verify_ms"],
        "batch_sweep": sweep,
        "break_even_batch": break_even(sweep) if sweep else None,
        "disable_by_batch_size_default": SpeculationSettings().disable_by_batch_size,
        "errors": sum(r.errors for runs in (off, on, off16, on16) for r in runs),
    }


#: name -> function(opts, **kw) -> result dict. Scenarios in other modules add themselves here.
SCENARIOS = {"batching": batching, "speculative": speculative}

#: What `make bench` runs: (scenario, model) pairs, in order.
ALL_RUNS = [("batching", "target-large"), ("batching", "target"), ("speculative", "target-large"), ("soak", "target"),
            ("parallel", "target-large")]


def registry() -> dict:
    """Every scenario, those defined in their own modules included."""
    import importlib

    for module in ("services.bench.router_scenario", "services.bench.autoscale", "services.bench.soak",
                   "services.bench.parallel_scenario"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    return SCENARIOS
