"""`llmesh bench --scenario autoscale`: capacity follows a load step without a failed request.

The scenario starts one target, a router, a monitor and a scaler (local
backend, min 1, max 3 instances, short windows), then drives closed-loop
streams through the router: 1 stream, a step to 16, and back to 1. It
records when a new instance first serves traffic after the step
(``scale_up_s``), when the pool is back to one instance after the drop
(``scale_down_s``), the most instances seen, every failed request, the
scaler's history, the monitor's ThroughputMetrics before, during and after
the step, and a time series of load, instances and tokens/s for the plot.

Requests are sampled without a seed (never answered from the router's
response cache); targets run one thread each and at most 4 sequences per
batch, so 16 streams queue and saturate an instance (which is how the
scaler measures its capacity).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import json_format

from services.bench import local_suite
from services.bench.scenarios import ALL_RUNS, SCENARIOS, BenchOptions
from services.common.access import bearer_metadata
from services.common.suite import ServiceSpec
from services.common.stubs import generation_pb2 as gen
from services.common.stubs import (monitor_pb2, monitor_pb2_grpc, router_pb2, router_pb2_grpc, scaler_pb2,
                                   scaler_pb2_grpc, stats_pb2)
from services.models.corpus import heldout_prompts

POOL = "default"
#: Engine bounds of every target: 16 streams queue on one instance and saturate it.
TARGET_FLAGS = {"max_batch_size": 4, "max_queue": 64}
SAMPLE_S = 0.5
#: The clients' tokens/s in the time series is over this trailing window.
RATE_WINDOW_S = 2.0


@dataclass
class Phase:
    """A load level held from ``at`` (seconds since the run began)."""

    load: int
    at: float


@dataclass
class Run:
    """What the load generator and the sampler saw."""

    t0: float
    load: int = 1
    tokens: int = 0
    requests: int = 0
    failures: list[str] = field(default_factory=list)
    #: Instance ids that have served a request of this run (from the chunks' instance_id).
    served_by: dict[str, float] = field(default_factory=dict)
    timeline: list[dict] = field(default_factory=list)
    phases: list[Phase] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic() - self.t0


def _specs(opts: BenchOptions, log_dir: Path, windows: dict[str, float]) -> list[ServiceSpec]:
    model = opts.model_dir(opts.model)
    target = local_suite.target_spec(model, 1, **TARGET_FLAGS)
    router = local_suite.router_spec([target.address])
    mport, sport = local_suite.free_port(), local_suite.free_port()
    monitor = ServiceSpec("monitor", "monitor.main", mport, (
        "--port", str(mport), "--router", router.address, "--watch-interval-s", str(SAMPLE_S),
        "--list-interval-s", str(SAMPLE_S), "--prometheus-port", "0", "--log-level", "warning"),
        env={"OMP_NUM_THREADS": "1"})
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in TARGET_FLAGS.items())
    scaler = ServiceSpec("scaler", "scaler.main", sport, (
        "--port", str(sport), "--router", router.address, "--monitor", monitor.address,
        "--target-model", str(model), "--target-args", f"--threads 1 {flags} --log-level warning",
        "--log-dir", str(log_dir / "scaled"), "--interval-s", "1", "--metrics-window-s", str(windows["stable"]),
        "--panic-window-s", str(windows["panic"]), "--warmup-tokens", "4", "--log-level", "info"),
        env={"OMP_NUM_THREADS": "1"})
    return [target, router, monitor, scaler]


def _metrics_dict(m: monitor_pb2.ThroughputMetrics) -> dict:
    return json_format.MessageToDict(m, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


async def _stream(stub, run: Run, prompt: str, new_tokens: int) -> None:
    request = gen.GenerateRequest(prompt=gen.Prompt(text=prompt), sampling=gen.SamplingParams(
        max_new_tokens=new_tokens, temperature=1.0, ignore_eos=True))
    finished = False
    try:
        async for chunk in stub.Generate(request, timeout=120):
            run.tokens += len(chunk.token_ids)
            if chunk.instance_id and chunk.instance_id not in run.served_by:
                run.served_by[chunk.instance_id] = run.now()
            finished = finished or chunk.finish_reason == gen.FINISH_REASON_LENGTH
        if not finished:
            run.failures.append("stream ended without its finish reason")
    except grpc.aio.AioRpcError as exc:
        run.failures.append(f"{exc.code().name}: {exc.details()}")
    run.requests += 1


async def _worker(k: int, stub, run: Run, prompts: list[str], new_tokens: int, done: asyncio.Event) -> None:
    i = 0
    while not done.is_set():
        if k >= run.load:
            await asyncio.sleep(0.05)
            continue
        await _stream(stub, run, prompts[(k * 7 + i) % len(prompts)], new_tokens)
        i += 1


async def _sampler(router, monitor, run: Run, done: asyncio.Event) -> None:
    recent: deque[tuple[float, int]] = deque([(run.now(), run.tokens)], maxlen=round(RATE_WINDOW_S / SAMPLE_S) + 1)
    while not done.is_set():
        await asyncio.sleep(SAMPLE_S)
        t, tokens = run.now(), run.tokens
        recent.append((t, tokens))
        (last_t, last_tokens) = recent[0]
        listed = (await router.ListInstances(router_pb2.ListInstancesRequest(pool=POOL))).instances
        active = [i for i in listed if i.state == router_pb2.INSTANCE_STATE_ACTIVE]
        try:
            fleet_tps = (await monitor.GetThroughput(monitor_pb2.GetThroughputRequest(
                window_s=3, scope=monitor_pb2.Scope(pool=POOL)))).metrics.tokens_per_second
        except grpc.aio.AioRpcError:
            fleet_tps = 0.0
        run.timeline.append({"t": round(t, 2), "load": run.load, "instances": len(active),
                             "registered": len(listed), "tokens_per_s": round((tokens - last_tokens) / (t - last_t), 1),
                             "monitor_tokens_per_s": round(fleet_tps, 1),
                             "busy": sorted(i.spec.id for i in listed if i.in_flight > 0)})


async def _until(predicate, timeout_s: float, every_s: float = SAMPLE_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(every_s)
    return False


async def _drive(addresses: dict[str, str], initial: str, *, low: int, high: int, low_s: float, high_s: float,
                 settle_s: float, timeout_s: float, new_tokens: int, policy: scaler_pb2.ScalingPolicy,
                 progress: bool) -> dict:
    prompts = heldout_prompts(64, seed=1)
    say = print if progress else (lambda *a, **k: None)
    async with grpc.aio.insecure_channel(addresses["router"]) as rc, \
            grpc.aio.insecure_channel(addresses["monitor"]) as mc, \
            grpc.aio.insecure_channel(addresses["scaler"]) as sc:
        router, monitor = router_pb2_grpc.RouterStub(rc), monitor_pb2_grpc.MonitorStub(mc)
        scaler = scaler_pb2_grpc.ScalerStub(sc)
        # An admin RPC: the suite's admin token, when it has one (open on plaintext loopback otherwise).
        await scaler.SetPolicy(scaler_pb2.SetPolicyRequest(pool=POOL, policy=policy),
                               metadata=bearer_metadata(os.environ.get("LLMESH_ADMIN_TOKEN", "")) or None)

        async def throughput() -> dict:
            reply = await monitor.GetThroughput(monitor_pb2.GetThroughputRequest(
                window_s=10, scope=monitor_pb2.Scope(pool=POOL)))
            return _metrics_dict(reply.metrics)

        run = Run(time.monotonic(), load=low)
        started_at = time.time()  # the run's t = 0 on the wall clock of the scaler's events
        done = asyncio.Event()
        tasks = [asyncio.create_task(_worker(k, router, run, prompts, new_tokens, done)) for k in range(high)]
        tasks.append(asyncio.create_task(_sampler(router, monitor, run, done)))
        try:
            run.phases.append(Phase(low, 0.0))
            say(f"autoscale: {low} stream(s) for {low_s:g} s")
            await asyncio.sleep(low_s)
            before = await throughput()

            run.load = high
            t_up = run.now()
            run.phases.append(Phase(high, t_up))
            say(f"autoscale: {high} streams at t={t_up:.1f} s")
            new = lambda: any(i != initial and t >= t_up for i, t in run.served_by.items())  # noqa: E731
            await _until(new, timeout_s)
            scale_up_s = min((t for i, t in run.served_by.items() if i != initial and t >= t_up), default=None)
            scale_up_s = None if scale_up_s is None else scale_up_s - t_up
            say(f"autoscale: a new instance served traffic after {scale_up_s} s; holding the load")
            await asyncio.sleep(max(high_s - (run.now() - t_up), settle_s))
            during = await throughput()
            status_high = await scaler.GetStatus(scaler_pb2.GetStatusRequest())

            run.load = low
            t_down = run.now()
            run.phases.append(Phase(low, t_down))
            say(f"autoscale: back to {low} stream(s) at t={t_down:.1f} s")
            back = lambda: bool(run.timeline) and run.timeline[-1]["t"] > t_down and \
                run.timeline[-1]["registered"] == 1  # noqa: E731
            await _until(back, timeout_s)
            down_at = next((p["t"] for p in run.timeline if p["t"] > t_down and p["registered"] == 1), None)
            scale_down_s = None if down_at is None else down_at - t_down
            say(f"autoscale: back to one instance after {scale_down_s} s")
            await asyncio.sleep(settle_s)
            after = await throughput()
        finally:
            done.set()
            await asyncio.gather(*tasks, return_exceptions=True)
        history = (await scaler.GetHistory(scaler_pb2.GetHistoryRequest(pool=POOL))).events
        status = next((p for p in status_high.pools if p.pool == POOL and p.role == stats_pb2.ROLE_TARGET), None)
    return {
        "scale_up_s": None if scale_up_s is None else round(scale_up_s, 2),
        "scale_down_s": None if scale_down_s is None else round(scale_down_s, 2),
        "instances_max": max((p["instances"] for p in run.timeline), default=0),
        "failed_requests": len(run.failures), "failures": run.failures[:10], "requests": run.requests,
        "capacity_tokens_per_s": round(status.capacity_tokens_per_second, 1) if status else None,
        "capacity_measured": bool(status and status.capacity_measured),
        "throughput_before": before, "throughput_during": during, "throughput_after": after,
        "phases": [{"load": p.load, "at_s": round(p.at, 2)} for p in run.phases],
        "history": [{"t": round(e.timestamp - started_at, 2), "kind": e.kind, "from": e.from_instances,
                     "to": e.to_instances, "instance_id": e.instance_id, "reason": e.reason,
                     "figures": {k: round(v, 3) for k, v in sorted(e.figures.items())}} for e in history],
        "timeline": run.timeline,
    }


def autoscale(opts: BenchOptions, new_tokens: int = 32, low: int = 1, high: int = 16, low_s: float = 15.0,
              high_s: float = 45.0, settle_s: float = 5.0, timeout_s: float = 120.0) -> dict:
    """One target, a step from ``low`` to ``high`` streams and back; the scaler's local backend
    (min 1, max 3) follows. Takes about 1.5-2 minutes."""
    if opts.router:
        raise SystemExit("llmesh bench: the autoscale scenario starts its own router, monitor and scaler; "
                         "drop --router")
    windows = {"stable": 6.0, "panic": 2.0}
    policy = scaler_pb2.ScalingPolicy(min_instances=1, max_instances=3, target_utilization=0.7, tolerance=0.1,
                                      scale_up_window_s=5, scale_down_window_s=10, drain_timeout_s=30)
    log_dir = Path(tempfile.mkdtemp(prefix="llmesh-bench-autoscale-"))
    specs = _specs(opts, log_dir, windows)
    initial = specs[0].address  # the router registers --targets under their address
    with local_suite.running(specs, log_dir) as addresses:
        result = asyncio.run(_drive(addresses, initial, low=low, high=high, low_s=low_s, high_s=high_s,
                                    settle_s=settle_s, timeout_s=timeout_s, new_tokens=new_tokens, policy=policy,
                                    progress=opts.progress))
    return {
        "scenario": "autoscale", "model": opts.model, "new_tokens": new_tokens, "load_low": low, "load_high": high,
        "min_instances": policy.min_instances, "max_instances": policy.max_instances,
        "windows_s": {"stable": windows["stable"], "panic": windows["panic"], "scale_up": policy.scale_up_window_s,
                      "scale_down": policy.scale_down_window_s},
        "target_flags": dict(TARGET_FLAGS, threads=1), "logs": str(log_dir),
        **result,
        "errors": result["failed_requests"],
    }


SCENARIOS["autoscale"] = autoscale
if ("autoscale", "target") not in ALL_RUNS:
    ALL_RUNS.append(("autoscale", "target"))
