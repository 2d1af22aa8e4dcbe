"""`llmesh bench --scenario prefix`: automatic prefix caching and KV-aware routing.

A shared-prefix workload: ``GROUPS`` groups of ``PER_GROUP`` requests, each
group sharing a ``PREFIX_TOKENS``-token prefix with a short distinct suffix
(token-id prompts, so every arm and the router see the same ids), greedy,
``new_tokens`` each, sent open loop (Poisson arrivals at ``RATE`` requests/s for one target,
``ROUTED_RATE`` for the routed arms; the same arrival times in every arm of a kind). Arms, each on freshly started
processes (cold caches):

- one target, prefix cache off (``--no-prefix-cache``) vs on;
- two targets behind the router, ``round_robin`` vs ``prefix_affinity`` vs
  ``kv_aware``, each target's cache holding about half the groups' prefixes
  (``--kv-cache-memory ROUTED_KV_MEMORY``): a router that splits the groups
  between the targets keeps their prefixes cached; one that spreads every
  group over both evicts them (SGLang's cache-aware router, NVIDIA Dynamo's
  KV router).

The routed arms run ``--repeats`` times each, interleaved, and report each
figure's median (every run is in ``runs``). Per arm: TTFT p50/p90, throughput (generated tokens / wall time, the last
answer included), prefix-cache hit rate (hit tokens / looked-up tokens, from
the targets' load reports, per instance too). Every arm's greedy tokens must
equal the cache-off arm's (``identical_greedy``). Importing this module
registers the scenario.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import tempfile
from pathlib import Path

import grpc

from services.bench import local_suite
from services.bench.loadgen import RunResult, open_loop
from services.bench.scenarios import SCENARIOS, BenchOptions
from services.common.stubs import generation_pb2 as gen
from services.common.stubs import model_pb2_grpc, router_pb2_grpc, stats_pb2, stats_pb2_grpc

GROUPS = 8
PER_GROUP = 4
PREFIX_TOKENS = 1000
#: Requests per second of the open loop: 0.25 keeps one cached target of target-large
#: (2 cores) out of saturation. At 1.0 every single-target arm is saturated on 2 cores
#: and TTFT measures the queue, not the prefill (see BENCHMARKS.md: one such run).
RATE = 0.25
#: Requests per second of the routed arms' open loop: 2.0 is more than two targets
#: (one thread each) serve under any policy here, so every routed arm is saturated and
#: its throughput is its capacity: what a policy's cache hits buy. Below saturation every
#: arm's throughput is the offered load and the ratio is 1.0 by construction; near it,
#: the ratio is capped by the offered load (1.0 req/s gave 1.21 with kv_aware's p90 at
#: 0.38 of round robin's). BENCHMARKS.md has both.
ROUTED_RATE = 2.0
#: Each routed target's KV-cache memory: about 5 prefixes of 1,000 tokens on target-large (48 KiB a token).
ROUTED_KV_MEMORY = "256MiB"
ROUTED_TARGETS = 2


def workload(seed: int = 0, vocab: int = 4000) -> list[list[int]]:
    """The prompts, in arrival order: groups interleaved at random."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(10, vocab) for _ in range(PREFIX_TOKENS)] for _ in range(GROUPS)]
    prompts = [p + [rng.randrange(10, vocab) for _ in range(rng.randrange(8, 24))]
               for p in prefixes for _ in range(PER_GROUP)]
    rng.shuffle(prompts)
    return prompts


def _request(ids: list[int], new_tokens: int) -> gen.GenerateRequest:
    return gen.GenerateRequest(prompt=gen.Prompt(tokens=gen.TokenIds(ids=ids)),
                               sampling=gen.SamplingParams(max_new_tokens=new_tokens, ignore_eos=True),
                               speculation=gen.SpeculationParams(enabled=False))


async def _prefix_counters(address: str) -> tuple[int, int]:
    """(hit tokens, looked-up tokens) of a target, from its first load report."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = stats_pb2_grpc.StatsStub(channel).Watch(stats_pb2.WatchStatsRequest())
        report = await call.read()
        call.cancel()
    return report.prefix_cache_hits_total, report.prefix_cache_queries_total


async def _arm(entry: str, stub_of, targets: list[str], prompts: list[list[int]], new_tokens: int,
               label: str, progress: bool, rate: float) -> tuple[RunResult, list[tuple[int, int]]]:
    """The open-loop run through ``entry`` at ``rate`` requests/s, and each target's (hits, queries) after it."""
    async with grpc.aio.insecure_channel(entry) as channel:
        run = await open_loop(stub_of(channel), lambda i: _request(prompts[i], new_tokens), rate, len(prompts),
                              seed=1, label=label, progress=progress)
    return run, [await _prefix_counters(t) for t in targets]


def _figures(run: RunResult, counters: list[tuple[int, int]]) -> dict:
    s = run.summary()
    hits, queries = sum(h for h, _ in counters), sum(q for _, q in counters)
    return {"ttft_p50_ms": round(run.pct("ttft_s", 50), 1), "ttft_p90_ms": round(run.pct("ttft_s", 90), 1),
            "throughput_tokens_per_s": s["tokens_per_s"], "wall_s": s["wall_s"], "errors": s["errors"],
            "prefix_hit_rate": round(hits / queries, 3) if queries else 0.0,
            "prefix_hit_rate_per_instance": [round(h / q, 3) if q else 0.0 for h, q in counters]}


def _median_figures(runs: list[dict]) -> dict:
    """Each numeric figure's median over the runs (lists: the median run's by
    throughput), but ``errors``: their sum (an error in any run counts)."""
    middle = sorted(runs, key=lambda f: f["throughput_tokens_per_s"])[len(runs) // 2]
    out = {k: (round(statistics.median(f[k] for f in runs), 3) if isinstance(v, (int, float)) else middle[k])
           for k, v in runs[0].items()}
    out["errors"] = sum(f["errors"] for f in runs)
    return out


def prefix(opts: BenchOptions, new_tokens: int = 16) -> dict:
    model = opts.model_dir(opts.model)
    prompts = workload()
    log_dir = Path(tempfile.mkdtemp(prefix="llmesh-bench-prefix-"))
    arms: dict[str, dict] = {}
    runs: dict[str, list[dict]] = {}
    tokens: dict[str, list[list[int]]] = {}

    def measure(name: str, specs, entry_name: str, stub_of, rate: float, label: str = "") -> None:
        label = label or name
        with local_suite.running(specs, log_dir / label) as addrs:
            targets = [spec.address for spec in specs if spec.name.startswith("target")]
            run, counters = asyncio.run(_arm(addrs[entry_name], stub_of, targets, prompts, new_tokens, label,
                                             opts.progress, rate))
        runs.setdefault(name, []).append(_figures(run, counters))
        arms[name] = _median_figures(runs[name])
        if tokens.setdefault(name, [r.tokens for r in run.results]) != [r.tokens for r in run.results]:
            tokens[name] = []  # two runs of one arm disagree: not identical

    target_stub = model_pb2_grpc.TargetModelStub
    for name, flags in (("cache_off", {"no_prefix_cache": "true"}), ("cache_on", {})):
        spec = local_suite.target_spec(model, opts.threads, max_batch_size=32, **flags)
        measure(name, [spec], "target", target_stub, RATE)
    threads = max(1, opts.threads // ROUTED_TARGETS)
    # The routed arms are short and sensitive to whatever else runs: ``opts.repeats``
    # runs of each, interleaved (round robin, prefix_affinity, kv_aware, round robin...),
    # each figure the median over the runs (each run in ``runs``).
    for r in range(opts.repeats):
        for policy in ("round_robin", "prefix_affinity", "kv_aware"):
            specs = [local_suite.target_spec(model, threads, name=f"target{k}", max_batch_size=32,
                                             kv_cache_memory=ROUTED_KV_MEMORY) for k in range(ROUTED_TARGETS)]
            router = local_suite.router_spec([s.address for s in specs], flags=("--policy", policy))
            measure(policy, [*specs, router], "router", router_pb2_grpc.RouterStub, ROUTED_RATE,
                    label=f"{policy} run {r + 1}")

    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 3) if b else None

    reference = tokens["cache_off"]
    return {
        "scenario": "prefix", "model": opts.model, "new_tokens": new_tokens, "groups": GROUPS,
        "requests_per_group": PER_GROUP, "prefix_tokens": PREFIX_TOKENS, "rate_per_s": RATE,
        "routed_rate_per_s": ROUTED_RATE, "routed_repeats": opts.repeats,
        "routed_targets": ROUTED_TARGETS, "routed_kv_cache_memory": ROUTED_KV_MEMORY, "arms": arms,
        "ttft_p50_ratio_cache_on_vs_off": ratio(arms["cache_on"]["ttft_p50_ms"], arms["cache_off"]["ttft_p50_ms"]),
        "ttft_p90_ratio_kv_aware_vs_round_robin": ratio(arms["kv_aware"]["ttft_p90_ms"],
                                                        arms["round_robin"]["ttft_p90_ms"]),
        "throughput_ratio_kv_aware_vs_round_robin": ratio(arms["kv_aware"]["throughput_tokens_per_s"],
                                                          arms["round_robin"]["throughput_tokens_per_s"]),
        "prefix_hit_rate": {name: a["prefix_hit_rate"] for name, a in arms.items()},
        "identical_greedy": all(t == reference for t in tokens.values()),
        "runs": {name: r for name, r in runs.items() if len(r) > 1},
        "errors": sum(a["errors"] for a in arms.values()),
    }


SCENARIOS["prefix"] = prefix
