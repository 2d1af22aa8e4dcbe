"""`llmesh bench --scenario router`: what the router costs, and what failover saves.

Same run, same target process, direct vs through the router:

- latency: unary requests of ``new_tokens`` greedy tokens at concurrency 1.
  The target has no Complete RPC, so the direct call is a Generate stream
  consumed to its end; through the router it is timed both as
  ``Router.Generate`` consumed to its end (the like-for-like pair that gives
  ``added_latency_*``) and as ``Router.Complete``. The three calls are
  interleaved, in rotating order, so that drift hits them alike.
- throughput: streams of ``stream_new_tokens`` tokens at concurrency 32,
  direct and through the router in alternating runs.
- failover: two targets behind the router, 16 greedy streams, one target
  SIGKILLed once every stream has a few tokens; every output is compared with
  a reference run of the same streams.
- the floor: a pass-through proxy (:mod:`services.bench.passthrough`, a
  grpcio hop that relays bytes and does nothing else) takes part in the same
  interleaved latency calls and alternating throughput runs, so that the
  router's added latency splits into what any grpcio hop costs on this machine
  (``proxy_added_latency_p50_ms``) and the router's own work
  (``router_over_proxy_paired_p50_ms``), and its throughput ratio has the
  proxy's beside it (``proxy_throughput_ratio``).

The target gets at most one core fewer than the machine has (``--threads``
capped at cores - 1): a target whose threads use every core measures how the
router's CPU slows the target's forward passes, not what the router adds. The
scenario starts its own processes (``--router`` is ignored): it needs the
target's address and the power to kill one.

Importing this module registers the scenario (``SCENARIOS["router"]``) and
adds it to ``make bench`` (``ALL_RUNS``).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import grpc

from services.bench import local_suite
from services.bench.loadgen import RunResult, alternating_runs, greedy_request, interleaved_latency
from services.bench.scenarios import ALL_RUNS, SCENARIOS, BenchOptions, median
from services.common import lifeline
from services.common.suite import ServiceSpec
from services.common.stubs import model_pb2_grpc, router_pb2_grpc
from services.common.metrics import percentile
from services.models.corpus import heldout_prompts

STREAM_CONCURRENCY = 32
FAILOVER_STREAMS = 16
#: Tokens every failover stream must have before the target is killed.
KILL_AFTER_TOKENS = 4


def router_spec(targets: list[str], *flags: str) -> ServiceSpec:
    """The router (no response cache: every request must reach a target)."""
    return local_suite.router_spec(targets, flags=flags)


@contextmanager
def running(specs: list[ServiceSpec]):
    """The suite's ProcessGroup (its children's processes are what the failover run kills)."""
    with local_suite.started(specs, Path(tempfile.mkdtemp(prefix="llmesh-bench-router-"))) as group:
        yield group


@contextmanager
def passthrough(target: str, log_dir: Path, timeout_s: float = 30.0):
    """A pass-through proxy to ``target`` in a process of its own (bound to
    this one's life; its output in ``log_dir/passthrough.log``); yields its
    address. RuntimeError, with the log's tail, if it is not listening
    within ``timeout_s``."""
    port = local_suite.free_port()
    log_path = log_dir / "passthrough.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "services.bench.passthrough", "--port", str(port),
                                 "--target", target], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **lifeline.launcher_env()})
    try:
        deadline = time.monotonic() + timeout_s
        while "passthrough ready" not in log_path.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text()[-2000:]
                raise RuntimeError(f"the pass-through proxy did not start (exit {proc.poll()}): {tail}")
            time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout_s)


def _ms(values: list[float], q: float) -> float:
    return percentile(sorted(values), q) * 1000.0


# -- latency and throughput -------------------------------------------------------
async def _latency(target: str, router: str, proxy: str, prompts: list[str], n: int, new_tokens: int
                   ) -> dict[str, list[float]]:
    """Seconds per call of each kind, n calls each, interleaved in rotating order."""
    async with (grpc.aio.insecure_channel(target) as tc, grpc.aio.insecure_channel(router) as rc,
                grpc.aio.insecure_channel(proxy) as pc):
        direct, routed = model_pb2_grpc.TargetModelStub(tc), router_pb2_grpc.RouterStub(rc)
        proxied = router_pb2_grpc.RouterStub(pc)

        async def generate(stub, req):
            async for _ in stub.Generate(req):
                pass

        kinds = {"direct": lambda req: generate(direct, req), "router_generate": lambda req: generate(routed, req),
                 "router_complete": lambda req: routed.Complete(req), "proxy_generate": lambda req: generate(proxied, req)}
        make = lambda i: greedy_request(prompts[i % len(prompts)], new_tokens, speculate=False)  # noqa: E731
        return await interleaved_latency(kinds, make, n)


async def _throughput(target: str, router: str, proxy: str, prompts: list[str], new_tokens: int, total: int,
                      repeats: int, progress: bool) -> dict[str, list[RunResult]]:
    """Alternating closed-loop runs at concurrency 32: direct, through the router, through the proxy."""
    make = lambda i: greedy_request(prompts[i % len(prompts)], new_tokens, speculate=False)  # noqa: E731
    async with (grpc.aio.insecure_channel(target) as tc, grpc.aio.insecure_channel(router) as rc,
                grpc.aio.insecure_channel(proxy) as pc):
        stubs = {"direct": model_pb2_grpc.TargetModelStub(tc), "router": router_pb2_grpc.RouterStub(rc),
                 "proxy": router_pb2_grpc.RouterStub(pc)}
        return await alternating_runs(stubs, make, STREAM_CONCURRENCY, total, repeats, progress)


# -- failover -------------------------------------------------------------------
async def _streams(router: str, prompts: list[str], new_tokens: int, kill=None) -> list[dict]:
    """Every prompt as one greedy stream, all at once; with ``kill``, it is
    called once every stream has KILL_AFTER_TOKENS tokens."""
    everyone_going = asyncio.Event()
    going = 0

    async def one(stub, prompt: str) -> dict:
        nonlocal going
        out = {"tokens": [], "instances": [], "error": ""}
        try:
            async for chunk in stub.Generate(greedy_request(prompt, new_tokens, speculate=False), timeout=120):
                before = len(out["tokens"])
                out["tokens"].extend(chunk.token_ids)
                if chunk.instance_id and (not out["instances"] or out["instances"][-1] != chunk.instance_id):
                    out["instances"].append(chunk.instance_id)
                if before < KILL_AFTER_TOKENS <= len(out["tokens"]):
                    going += 1
                    if going == len(prompts):
                        everyone_going.set()
        except grpc.aio.AioRpcError as exc:
            out["error"] = f"{exc.code().name}: {exc.details()}"
        return out

    async with grpc.aio.insecure_channel(router) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        tasks = [asyncio.create_task(one(stub, p)) for p in prompts]
        if kill is not None:
            waiter = asyncio.create_task(everyone_going.wait())
            await asyncio.wait([waiter, asyncio.gather(*tasks)], return_when=asyncio.FIRST_COMPLETED)
            if everyone_going.is_set():
                kill()
            waiter.cancel()
        return list(await asyncio.gather(*tasks))


def target_threads(opts: BenchOptions) -> int:
    """``opts.threads``, leaving a core to the router and the load generator."""
    return max(1, min(opts.threads, (os.cpu_count() or 2) - 1))


def _failover(opts: BenchOptions, prompts: list[str], new_tokens: int) -> dict:
    model_dir = opts.model_dir(opts.model)
    threads = max(1, target_threads(opts) // 2)
    targets = [local_suite.target_spec(model_dir, threads, name=f"target-{k}", max_batch_size=FAILOVER_STREAMS)
               for k in "ab"]
    # Round robin puts half of the streams on the target that dies.
    specs = [*targets, router_spec([t.address for t in targets], "--policy", "round_robin")]
    with running(specs) as group:
        router = group.specs[-1].address
        reference = asyncio.run(_streams(router, prompts, new_tokens))
        victim = group.children[0]
        killed_at: list[float] = []

        def kill() -> None:
            victim.proc.kill()  # SIGKILL: no goodbye, connections just break
            killed_at.append(time.monotonic())

        run = asyncio.run(_streams(router, prompts, new_tokens, kill))
    on_victim = [s for s in run if s["instances"] and s["instances"][0] == victim.spec.address]
    return {
        "streams": len(prompts), "new_tokens": new_tokens, "killed": victim.spec.name if killed_at else "nobody",
        "started": sum(bool(s["tokens"]) for s in run),
        "failed": sum(bool(s["error"]) for s in run),
        "on_killed_target": len(on_victim),
        "resumed": sum(len(s["instances"]) > 1 for s in run),
        "all_outputs_match": all(not s["error"] for s in run + reference)
                             and [s["tokens"] for s in run] == [s["tokens"] for s in reference],
        "reference_errors": sum(bool(s["error"]) for s in reference),
        "error_samples": [s["error"] for s in run if s["error"]][:3],
    }


# -- the scenario -------------------------------------------------------------------
def router_bench(opts: BenchOptions, new_tokens: int = 8, stream_new_tokens: int = 64,
                 latency_requests: int = 50, failover_new_tokens: int = 64) -> dict:
    """Added latency and throughput ratio of the router vs the target directly, and
    a failover run that kills a target under 16 streams."""
    prompts = heldout_prompts(256, seed=0)
    model_dir = opts.model_dir(opts.model)
    threads = target_threads(opts)
    target = local_suite.target_spec(model_dir, threads, max_batch_size=STREAM_CONCURRENCY)
    specs = [target, router_spec([target.address])]
    log_dir = Path(tempfile.mkdtemp(prefix="llmesh-bench-router-proxy-"))
    with running(specs) as group, passthrough(target.address, log_dir) as proxy:
        router = group.specs[-1].address
        lat = asyncio.run(_latency(target.address, router, proxy, prompts, latency_requests * opts.repeats,
                                   new_tokens))
        tput = asyncio.run(_throughput(target.address, router, proxy, prompts, stream_new_tokens,
                                       2 * STREAM_CONCURRENCY, opts.repeats, opts.progress))
    failover = _failover(opts, prompts[:FAILOVER_STREAMS], failover_new_tokens)

    direct_tps = [r.tokens_per_s for r in tput["direct"]]
    router_tps = [r.tokens_per_s for r in tput["router"]]
    proxy_tps = [r.tokens_per_s for r in tput["proxy"]]
    p = {kind: (_ms(v, 50), _ms(v, 99)) for kind, v in lat.items()}
    paired = [r - d for r, d in zip(lat["router_generate"], lat["direct"])]
    over_proxy = [r - x for r, x in zip(lat["router_generate"], lat["proxy_generate"])]
    ratio = median(router_tps) / median(direct_tps) if median(direct_tps) else None
    proxy_ratio = median(proxy_tps) / median(direct_tps) if median(direct_tps) else None
    errors = sum(r.errors for runs in tput.values() for r in runs) + failover["failed"]
    result = {
        "scenario": "router", "model": opts.model, "new_tokens": new_tokens, "repeats": opts.repeats,
        "target_threads": threads, "latency_requests": len(lat["direct"]),
        "direct_p50_ms": round(p["direct"][0], 3), "direct_p99_ms": round(p["direct"][1], 3),
        "router_generate_p50_ms": round(p["router_generate"][0], 3),
        "router_generate_p99_ms": round(p["router_generate"][1], 3),
        "router_complete_p50_ms": round(p["router_complete"][0], 3),
        "router_complete_p99_ms": round(p["router_complete"][1], 3),
        "added_latency_p50_ms": round(p["router_generate"][0] - p["direct"][0], 3),
        "added_latency_p99_ms": round(p["router_generate"][1] - p["direct"][1], 3),
        "added_latency_paired_p50_ms": round(_ms(paired, 50), 3),
        "proxy_generate_p50_ms": round(p["proxy_generate"][0], 3),
        "proxy_generate_p99_ms": round(p["proxy_generate"][1], 3),
        "proxy_added_latency_p50_ms": round(p["proxy_generate"][0] - p["direct"][0], 3),
        "router_over_proxy_paired_p50_ms": round(_ms(over_proxy, 50), 3),
        "complete_added_latency_p50_ms": round(p["router_complete"][0] - p["direct"][0], 3),
        "complete_added_latency_p99_ms": round(p["router_complete"][1] - p["direct"][1], 3),
        "stream_concurrency": STREAM_CONCURRENCY, "stream_new_tokens": stream_new_tokens,
        "direct_tps": round(median(direct_tps), 1), "router_tps": round(median(router_tps), 1),
        "direct_tps_runs": [round(x, 1) for x in direct_tps], "router_tps_runs": [round(x, 1) for x in router_tps],
        "throughput_ratio": round(ratio, 4) if ratio is not None else None,
        "proxy_tps": round(median(proxy_tps), 1), "proxy_tps_runs": [round(x, 1) for x in proxy_tps],
        "proxy_throughput_ratio": round(proxy_ratio, 4) if proxy_ratio is not None else None,
        "errors": errors,
        "failover": failover,
    }
    if opts.router:
        result["note"] = f"--router {opts.router} ignored: this scenario starts its own processes"
    result["goals_met"] = {
        "added_latency_p50_ms<=1": result["added_latency_p50_ms"] <= 1.0,
        "throughput_ratio>=0.97": ratio is not None and ratio >= 0.97,
        "failover_no_failed_request": failover["failed"] == 0 and failover["started"] == FAILOVER_STREAMS,
        "failover_outputs_match": failover["all_outputs_match"],
    }
    return result


SCENARIOS["router"] = router_bench
if ("router", "target") not in ALL_RUNS:
    ALL_RUNS.append(("router", "target"))
