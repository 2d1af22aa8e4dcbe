"""Benchmark scenarios. Each returns a JSON-able dict with the figures its issue names."""

from __future__ import annotations

import asyncio
import logging
import statistics
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import grpc

from services.bench import local_suite, offline
from services.bench.loadgen import RunResult, closed_loop, greedy_request
from services.bench.machine import machine_info, mbu
from services.bench.prompt_sets import copy_heavy, open_ended
from services.common.stubs import generation_pb2 as gen
from services.common.stubs import model_pb2, model_pb2_grpc, router_pb2, router_pb2_grpc, stats_pb2
from services.models.corpus import heldout_prompts

log = logging.getLogger(__name__)


@dataclass
class BenchOptions:
    home: Path
    model: str = "target-large"
    draft: str = "draft"
    router: str = ""          # a running suite; empty: start what the scenario needs
    repeats: int = 3
    threads: int = 2
    progress: bool = True
    #: openai: run the peer harnesses (GuideLLM, lm-evaluation-harness) after the front door's cost.
    harnesses: bool = True

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


async def target_layouts(router: str) -> list[str]:
    """Each target's weight layout behind ``router`` (``ModelInfo.weight_layout``
    by GetInfo on the addresses the router lists), "" for one that does not
    answer in 5 s or does not say; none when the router does not list them
    (the report then says the layout is unknown rather than failing a run)."""
    try:
        async with grpc.aio.insecure_channel(router) as channel:
            listed = await router_pb2_grpc.RouterStub(channel).ListInstances(
                router_pb2.ListInstancesRequest(role=stats_pb2.ROLE_TARGET), timeout=5.0)
    except grpc.aio.AioRpcError as exc:
        log.warning("the router at %s did not list its targets (%s): weight layout unknown", router, exc.code().name)
        return []
    layouts = []
    for instance in listed.instances:
        try:
            async with grpc.aio.insecure_channel(instance.spec.address) as channel:
                info = await model_pb2_grpc.TargetModelStub(channel).GetInfo(model_pb2.GetInfoRequest(), timeout=5.0)
            layouts.append(info.weight_layout)
        except grpc.aio.AioRpcError:
            layouts.append("")
    return layouts


def weight_facts(layouts: list[str]) -> dict:
    """What the served targets' weights are (``layouts`` from
    :func:`target_layouts`), as the report says it: ``weight_layout`` (one
    target's :func:`services.engine.cpu_linear.weight_layout`, or every
    distinct one joined by "; ") and ``packed_weights`` (whether any target
    holds a packed copy; None when none says). Pure."""
    layouts = sorted({layout for layout in layouts if layout})
    return {"packed_weights": any(layout != "plain" for layout in layouts) if layouts else None,
            "weight_layout": "; ".join(layouts)}


def _prompts(n: int) -> list[str]:
    return heldout_prompts(n, seed=0)


async def _measure(address: str, arms: dict, concurrency: int, total: int, repeats: int, label: str,
                   progress: bool) -> dict[str, list[RunResult]]:
    """Each arm (name -> request maker) ``repeats`` times on the same suite, after a
    warm-up. With several arms the runs are interleaved and counterbalanced
    (ABBA: off, on, on, off, off, on...), so that drift over the run (warm
    caches, a neighbour's load, a VM slowing down) falls on all arms alike:
    a drift linear in time cancels out of every pair of repeats, where plain
    alternation (off, on, off, on) always gives the later arm the later
    machine.

    The warm-up runs each arm at ``concurrency`` streams, one request each
    (at least ``min(total, 4)``): the first time a suite meets a batch size
    costs what no later run pays (kernels and buffers for the new shapes, the
    cost model's first steps there), and ABBA does not cancel a step change
    at the first run. 2026-12-02, a fresh suite at 16 streams after a warm-up
    at 4: the first off run gave 236 tokens/s, the next seven 248-353."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        for make in arms.values():
            await closed_loop(stub, make, concurrency, max(concurrency, min(total, 4)), label=f"{label} warm-up",
                              progress=False)
        runs: dict[str, list[RunResult]] = {name: [] for name in arms}
        for r in range(repeats):
            for name, make in (list(arms.items()) if r % 2 == 0 else list(arms.items())[::-1]):
                runs[name].append(await closed_loop(stub, make, concurrency, total,
                                                    label=f"{label} {name}, run {r + 1}".strip(), progress=progress))
        return runs


def batching(opts: BenchOptions, concurrencies=(1, 4, 16, 32), new_tokens: int = 64) -> dict:
    """Served tokens/s through the router at each concurrency vs HF generate at batch 32."""
    machine = machine_info(opts.threads)
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
        layout = weight_facts(asyncio.run(target_layouts(addrs["router"])))
        for c in concurrencies:
            runs = asyncio.run(_measure(addrs["router"], {"": make}, c, max(4, 2 * c), opts.repeats, f"c={c}",
                                        opts.progress))[""]
            points[c] = runs
    served = {c: median([r.tokens_per_s for r in runs]) for c, runs in points.items()}
    mid = {c: sorted(runs, key=lambda r: r.tokens_per_s)[len(runs) // 2] for c, runs in points.items()}
    cmax, cmin = max(concurrencies), min(concurrencies)
    off, off_packed = median(offline_tps), median(packed_tps)
    context = _prompt_tokens(model_dir, prompts[:8]) + new_tokens / 2
    return {
        "scenario": "batching", "model": opts.model, "new_tokens": new_tokens, "repeats": opts.repeats,
        **machine, **layout,
        f"mbu_c{cmin}": mbu(served[cmin], model_dir, context, machine["memory_bandwidth_gbs"]),
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


#: Concurrencies of the speculation on/off sweep.
SWEEP_CONCURRENCIES = (1, 2, 4, 8, 16, 32)
#: Static overrides measured beside the cost model: arm name -> --speculative-disable-by-batch-size
#: (4: the break-even shipped before the cost model; 1024: never stand down, which finds the break-even).
STATIC_ARMS = {"static_4": 4, "static_always": 1024}


def _tps(runs: list[RunResult]) -> float:
    return median([r.tokens_per_s for r in runs])


def _steady_tps(runs: list[RunResult]) -> float:
    """The median run's tokens/s in its steady phase (every worker busy), the
    whole run's where it had none (see RunResult.steady_tokens_per_s)."""
    return median([r.tokens_per_s if r.steady_tokens_per_s is None else r.steady_tokens_per_s for r in runs])


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def _spec_suite(opts: BenchOptions, **target_flags):
    """A draft, a target speculating through it (with ``target_flags``) and a router."""
    draft = local_suite.draft_spec(opts.model_dir(opts.draft), 1)
    target = local_suite.target_spec(opts.model_dir(opts.model), opts.threads, draft=draft.address, **target_flags)
    specs = [draft, target, local_suite.router_spec([target.address], [draft.address])]
    return local_suite.running(specs, Path(tempfile.mkdtemp(prefix="llmesh-bench-")))


def sweep_length(i: int, mean: int) -> int:
    """Request ``i``'s output length in the on/off sweep: spread evenly over
    ``[mean / 2, 3 mean / 2)``, the same for every arm. Equal lengths made the
    plain arm's streams finish and restart in lockstep, their prefills batched
    32 at a time, which no served load does and speculation (each stream at
    its own pace) cannot match: 2026-12-01, at 32 streams, the plain arm gave
    335-343 tokens/s with spread lengths against 370-440 in lockstep."""
    return mean // 2 + (i * 37) % mean


def sweep_requests(c: int) -> int:
    """Requests in one run of the on/off sweep at concurrency ``c``: two per
    stream, and at least 8, so that at 1 and 2 streams the steady phase (every
    stream busy) is more than a request or two long."""
    return max(8, 2 * c)


def speculation_batch_sweep(opts: BenchOptions, make, router: str,
                            concurrencies=SWEEP_CONCURRENCIES) -> dict:
    """Speculation off and on (the cost model, on the suite at ``router``) at
    each concurrency, then each static override of :data:`STATIC_ARMS` on a
    suite of its own, against speculation off on that same suite
    (``{arm}_off_tps``): two suites started minutes apart on the same machine
    differed by up to 20 % with speculation off (2026-12-01: 194-210 against
    243-249 tokens/s at 16 streams), more than the static settings differ
    from the cost model, so each ratio is taken within one suite.

    Each run is a closed loop of :func:`sweep_requests` requests at concurrency ``c``
    (the speculative scenario gives them spread output lengths, :func:`sweep_length`).
    ``*_tps`` and ``*ratio`` are tokens/s in the run's steady phase, while all
    ``c`` streams run (:attr:`RunResult.steady_tokens_per_s`): the concurrency
    the point stands for. ``*_makespan_tps`` and ``*makespan_ratio`` count the
    whole run, the drain at its end included, where speculation's unequal
    request times leave a tail of small batches that plain decoding, whose
    streams finish together, does not have. ``*_proposed_per_token`` and
    ``*_acceptance`` (:func:`_proposals`) say how much each speculating arm
    speculated at the point."""
    points = {}
    for c in concurrencies:
        runs = asyncio.run(_measure(router, {"off": make(False), "on": make(True)}, c, sweep_requests(c), opts.repeats,
                                    f"sweep c={c}", opts.progress))
        off, on = _steady_tps(runs["off"]), _steady_tps(runs["on"])
        off_all, on_all = _tps(runs["off"]), _tps(runs["on"])
        points[str(c)] = {"off_tps": round(off, 1), "on_tps": round(on, 1), "ratio": _ratio(on, off),
                          "off_makespan_tps": round(off_all, 1), "on_makespan_tps": round(on_all, 1),
                          "makespan_ratio": _ratio(on_all, off_all), **_proposals("on", runs["on"])}
    for arm, limit in STATIC_ARMS.items():
        with _spec_suite(opts, speculative_disable_by_batch_size=limit) as addrs:
            for c in concurrencies:
                runs = asyncio.run(_measure(addrs["router"], {"off": make(False), arm: make(True)}, c,
                                            sweep_requests(c), opts.repeats, f"sweep {arm} c={c}", opts.progress))
                point = points[str(c)]
                off, off_all = _steady_tps(runs["off"]), _tps(runs["off"])
                tps, tps_all = _steady_tps(runs[arm]), _tps(runs[arm])
                point[f"{arm}_tps"] = round(tps, 1)
                point[f"{arm}_off_tps"] = round(off, 1)
                point[f"{arm}_ratio"] = _ratio(tps, off)
                point[f"{arm}_makespan_tps"] = round(tps_all, 1)
                point[f"{arm}_off_makespan_tps"] = round(off_all, 1)
                point[f"{arm}_makespan_ratio"] = _ratio(tps_all, off_all)
                point.update(_proposals(arm, runs[arm]))
    return points


def _proposals(arm: str, runs: list[RunResult]) -> dict:
    """How much an arm speculated, over every request of its runs: draft tokens
    proposed per token emitted (``{arm}_proposed_per_token``; 0: it never
    speculated, e.g. the cost model judged every step a loss) and the share of
    them the target accepted (``{arm}_acceptance``; None when none was proposed).
    A sweep point whose ratio falls below 1 then tells whether speculation ran
    and lost or did not run."""
    ok = [r for run in runs for r in run.results if r.ok]
    tokens, proposed = sum(len(r.tokens) for r in ok), sum(r.proposed for r in ok)
    return {f"{arm}_proposed_per_token": round(proposed / tokens, 3) if tokens else None,
            f"{arm}_acceptance": round(sum(r.accepted for r in ok) / proposed, 3) if proposed else None}


def break_even(sweep: dict, key: str = "ratio") -> int:
    """The largest concurrency up to which speculation (the ``key`` ratio) never lost (0: it lost at once)."""
    best = 0
    for c, point in sorted(sweep.items(), key=lambda kv: int(kv[0])):
        if point.get(key) is None or point[key] < 1.0:
            break
        best = int(c)
    return best


def _prompt_set_arms(router: str, opts: BenchOptions, prompts: list[str], new_tokens: int, label: str) -> dict:
    """Off, the draft model, ngram and the target's default (the draft model,
    falling back to ngram where it does not pay: "auto") at concurrency 1 on one prompt set."""
    make = _maker(prompts, new_tokens)
    arms = {"off": make(False), "draft_model": make(True, gen.SPECULATION_METHOD_DRAFT_MODEL),
            "ngram": make(True, gen.SPECULATION_METHOD_NGRAM), "auto": make(True)}
    return _arms_report(asyncio.run(_measure(router, arms, 1, len(prompts), opts.repeats, label, opts.progress)))


def no_draft_arms(opts: BenchOptions, prompts: list[str], new_tokens: int, label: str) -> dict:
    """Off, the default ("auto": with no draft, n-gram lookup on the target from
    the first round) and ``ngram`` named by the request, at concurrency 1 on a
    target that has no draft (a suite of its own)."""
    make = _maker(prompts, new_tokens)
    target = local_suite.target_spec(opts.model_dir(opts.model), opts.threads)
    specs = [target, local_suite.router_spec([target.address])]
    with local_suite.running(specs, Path(tempfile.mkdtemp(prefix="llmesh-bench-"))) as addrs:
        arms = {"off": make(False), "auto": make(True), "ngram": make(True, gen.SPECULATION_METHOD_NGRAM)}
        return _arms_report(asyncio.run(_measure(addrs["router"], arms, 1, len(prompts), opts.repeats, label,
                                                 opts.progress)))


def _maker(prompts: list[str], new_tokens: int):
    """``make(speculate, method)``: request ``i`` of an arm is greedy on ``prompts[i % len(prompts)]``."""
    def make(spec: bool, method: int | None = None):
        return lambda i: greedy_request(prompts[i % len(prompts)], new_tokens, speculate=spec, method=method)
    return make


def _arms_report(runs: dict[str, list[RunResult]]) -> dict:
    """Each arm's tokens/s, and its speedup, acceptance and mean accepted length (median run) against "off";
    how many requests of the default arm ("auto") fell back to ngram; whether every arm's output was the same."""
    off = _tps(runs["off"])
    out = {"prompts": len(runs["off"][0].results)}
    for name, rs in runs.items():
        out[f"{name}_tps"] = round(_tps(rs), 1)
        if name != "off":
            mid = sorted(rs, key=lambda r: r.tokens_per_s)[len(rs) // 2].summary()
            out[f"{name}_speedup"] = _ratio(_tps(rs), off)
            out[f"{name}_acceptance"] = mid["acceptance_rate"]
            out[f"{name}_mean_accepted_len"] = mid["mean_accepted_len"]
    out["auto_fallbacks"] = sorted(rs.summary()["fallbacks"] for rs in runs["auto"])[len(runs["auto"]) // 2]
    out["identical_greedy"] = all(len({tuple(tuple(r.tokens) for r in run.results) for run in same}) == 1
                                  for same in zip(*runs.values()))
    return out


def _draft_ms_per_token(runs: list[RunResult]) -> float | None:
    """The draft's compute per proposed token (ms), over every request of ``runs``."""
    ok = [r for run in runs for r in run.results if r.ok]
    proposed = sum(r.proposed for r in ok)
    return round(sum(r.draft_compute_ms for r in ok) / proposed, 3) if proposed else None


def speculative(opts: BenchOptions, new_tokens: int = 128, prompts_n: int = 6, gamma: int | None = None,
                sweep_new_tokens: int = 64, prompt_set_n: int = 4) -> dict:
    """Target-only vs speculation (the cost model) through the suite vs HF
    assisted generation, at concurrency 1; on/off at 16 streams; the on/off
    sweep over concurrencies with the cost model and the static overrides;
    the draft model vs ngram vs the default (falling back to ngram) on
    copy-heavy and open-ended prompts, and on a target with no draft; the
    machine and the batch-1 figures' model-bandwidth utilisation (``mbu``)."""
    machine = machine_info(opts.threads)
    prompts = _prompts(64)
    target_dir, draft_dir = opts.model_dir(opts.model), opts.model_dir(opts.draft)
    hf_rates, hf_outputs = offline.hf_assisted(target_dir, draft_dir, prompts[:prompts_n], new_tokens, opts.repeats)
    hf_packed_rates, _ = offline.hf_assisted(target_dir, draft_dir, prompts[:prompts_n], new_tokens, opts.repeats,
                                             packed=True)

    def make(spec: bool, n: int, tokens: int = new_tokens):
        return lambda i: greedy_request(prompts[i % n], tokens, speculate=spec, gamma=gamma)

    def make_varied(spec: bool):
        return lambda i: greedy_request(prompts[i % 32], sweep_length(i, sweep_new_tokens), speculate=spec,
                                        gamma=gamma)

    with (nullcontext({"router": opts.router}) if opts.router else _spec_suite(opts)) as addrs:
        router = addrs["router"]
        layout = weight_facts(asyncio.run(target_layouts(router)))
        c1 = asyncio.run(_measure(router, {"off": make(False, prompts_n), "on": make(True, prompts_n)}, 1,
                                  prompts_n, opts.repeats, "c1 speculation", opts.progress))
        c16 = asyncio.run(_measure(router, {"off": make(False, 32), "on": make(True, 32)}, 16, 32, opts.repeats,
                                   "c16 speculation", opts.progress))
        copy = _prompt_set_arms(router, opts, copy_heavy(prompt_set_n), new_tokens, "copy-heavy")
        open_ = _prompt_set_arms(router, opts, open_ended(prompt_set_n), new_tokens, "open-ended")
        sweep = (speculation_batch_sweep(opts, make_varied, router)
                 if not opts.router else {})
    no_draft = (no_draft_arms(opts, copy_heavy(prompt_set_n), new_tokens, "no draft, copy-heavy")
                if not opts.router else {})
    off, on, off16, on16 = c1["off"], c1["on"], c16["off"], c16["on"]
    target_only, spec = _tps(off), _tps(on)
    hf, hf_packed = median(hf_rates), median(hf_packed_rates)
    identical = all([r.tokens for r in a.results] == [r.tokens for r in b.results] for a, b in zip(off, on))
    spec_summary = sorted(on, key=lambda r: r.tokens_per_s)[len(on) // 2].summary()
    # Batch-1 decoding reads the weights and the KV cache of the context (prompt + half the output, on average).
    context = statistics.mean(len(r.tokens) for r in off[0].results) / 2 + _prompt_tokens(target_dir, prompts[:prompts_n])
    ratios = [p["ratio"] for p in sweep.values() if p.get("ratio") is not None]
    return {
        "scenario": "speculative", "model": opts.model, "draft": opts.draft, "new_tokens": new_tokens,
        "prompts": prompts_n, "repeats": opts.repeats, "gamma": gamma or "cost model",
        **machine, **layout,
        "target_only_tps": round(target_only, 1), "spec_tps": round(spec, 1), "hf_assisted_tps": round(hf, 1),
        "speedup_vs_target_only": _ratio(spec, target_only),
        "ratio_vs_hf_assisted": _ratio(spec, hf),
        "hf_assisted_packed_tps": round(hf_packed, 1),
        "ratio_vs_hf_assisted_packed": _ratio(spec, hf_packed),
        "mbu_c1": mbu(target_only, target_dir, context, machine["memory_bandwidth_gbs"]),
        "mbu_c1_speculative": mbu(spec, target_dir, context, machine["memory_bandwidth_gbs"]),
        "acceptance_rate": spec_summary["acceptance_rate"], "mean_accepted_len": spec_summary["mean_accepted_len"],
        "identical_greedy": (identical and copy["identical_greedy"] and open_["identical_greedy"]
                             and no_draft.get("identical_greedy", True)),
        "hf_assisted_matches_target_only": [r.tokens for r in off[0].results] == hf_outputs,
        "c16_off_tps": round(_tps(off16), 1),
        "c16_on_tps": round(_tps(on16), 1),
        "load_ratio_c16": _ratio(_tps(on16), _tps(off16)),
        # Where a round goes at concurrency 1 (means per round, from the requests' stats).
        "round_draft_wait_ms": spec_summary["round_draft_wait_ms"],
        "round_draft_compute_ms": spec_summary["round_draft_compute_ms"],
        "round_verify_ms": spec_summary["round_verify_ms"],
        "draft_ms_per_token": _draft_ms_per_token(on),
        "copy_heavy": copy, "open_ended": open_,
        "ngram_speedup_copy_heavy": copy["ngram_speedup"],
        "ngram_speedup_open_ended": open_["ngram_speedup"],
        # The default (the draft model, falling back to ngram where it does not pay) on both sets, and on a
        # target with no draft at all (ngram looked up on the target).
        "auto_speedup_copy_heavy": copy["auto_speedup"], "auto_speedup_open_ended": open_["auto_speedup"],
        "no_draft_copy_heavy": no_draft, "no_draft_speedup_copy_heavy": no_draft.get("auto_speedup"),
        "batch_sweep": sweep,
        "min_ratio_on_off": min(ratios) if ratios else None,
        "min_makespan_ratio_on_off": min((p["makespan_ratio"] for p in sweep.values()
                                          if p.get("makespan_ratio") is not None), default=None),
        "break_even_batch": break_even(sweep, "static_always_ratio") if sweep else None,
        "errors": sum(r.errors for runs in (off, on, off16, on16) for r in runs),
    }


def _prompt_tokens(model_dir: Path, prompts: list[str]) -> float:
    """Mean prompt length in tokens of the model's tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return statistics.mean(len(tok(p)["input_ids"]) for p in prompts)


#: name -> function(opts, **kw) -> result dict. Scenarios in other modules add themselves here.
SCENARIOS = {"batching": batching, "speculative": speculative}

#: What `make bench` runs: (scenario, model) pairs, in order.
ALL_RUNS = [("batching", "target-large"), ("batching", "target"), ("speculative", "target-large"), ("soak", "target"),
            ("parallel", "target-large")]


def registry() -> dict:
    """Every scenario, those defined in their own modules included."""
    import importlib

    for module in ("services.bench.router_scenario", "services.bench.autoscale", "services.bench.soak",
                   "services.bench.openai_scenario", "services.bench.prefix",
                   "services.bench.parallel_scenario"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    return SCENARIOS
