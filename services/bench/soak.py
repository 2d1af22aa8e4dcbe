"""`llmesh bench --scenario soak`: the whole suite under mixed load, then back to rest.

Starts the five services as `llmesh up` does (its plan, on free ports; the
scaler pinned to one target so the processes stay the same), then runs
``streams`` closed-loop workers for ``duration_s`` seconds (default 32 and
600). Each request is, at random (seeded): a normal one (greedy or seeded
sampling, speculation on or off, sometimes a stop string), one the client
cancels after a few chunks, one with a deadline short enough to expire
mid-stream, or one with a long prompt. Cancellations and expired deadlines
are what those requests ask for; anything else that is not a finished
stream counts in ``errors``.

It samples every service's resident memory (``VmRSS``) through the run:
``rss_start_mib`` after a warm-up (the first tenth of the run, at most 60 s:
lazily allocated caches and arenas are not leaks), ``rss_end_mib`` once the
load has stopped and the suite is at rest. ``rss_growth_max`` is the largest
relative growth over the services (goal < 0.05). ``drained`` is true when,
after the load, every instance's load report (through the router's
ListInstances) shows nothing running, queued or in flight and an empty KV
cache, within ``DRAIN_TIMEOUT_S``. Clocks: time.monotonic() seconds.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc

from services.bench import local_suite
from services.bench.scenarios import SCENARIOS, BenchOptions
from services.common.processes import busy_ports
from services.common.stubs import generation_pb2 as gen
from services.common.stubs import router_pb2, router_pb2_grpc
from services.common.suite import ServiceSpec, UpOptions, plan, ports
from services.models.corpus import heldout_prompts

RSS_SAMPLE_S = 5.0
DRAIN_TIMEOUT_S = 30.0
KINDS = ("normal", "cancel", "deadline", "long_prompt")
#: How often each kind is drawn.
WEIGHTS = (0.5, 0.2, 0.2, 0.1)


@dataclass
class Tally:
    """What the workers saw, by kind of request."""

    sent: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    finished: int = 0
    cancelled: int = 0
    expired: int = 0
    tokens: int = 0
    errors: list[str] = field(default_factory=list)


def rss_mib(pid: int) -> float | None:
    """Resident memory of a process in MiB (``VmRSS``), None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return None


def growth(start: dict[str, float], end: dict[str, float]) -> dict[str, float]:
    """Relative growth of each service's RSS (end / start - 1); a service
    missing at the end (it died) counts as infinite growth."""
    return {name: (end[name] / start[name] - 1.0) if end.get(name) else float("inf")
            for name in start if start[name]}


def at_rest(instances) -> bool:
    """Whether every listed instance reports nothing running, queued or in flight and an empty KV cache."""
    return bool(instances) and all(
        i.in_flight == 0 and i.HasField("load") and i.load.running == 0 and i.load.queue_length == 0
        and i.load.kv_cache_used_tokens == 0 for i in instances)


def free_base_port(rng: random.Random) -> int:
    """A base port whose whole suite (router + 40, Prometheus + 31) is free on loopback."""
    for _ in range(200):
        base = rng.randrange(20000, 40000, 100)
        if not busy_ports("127.0.0.1", list(ports(base).values())):
            return base
    raise OSError("no free range of ports for a suite")


def _request(kind: str, rng: random.Random, prompts: list[str]) -> tuple[gen.GenerateRequest, float | None, int]:
    """A request of ``kind``: (request, deadline in seconds or None, chunks after which to cancel or 0)."""
    prompt = rng.choice(prompts)
    if kind == "long_prompt":
        prompt = " ".join(rng.choice(prompts) for _ in range(rng.randint(4, 10)))
    sampling = gen.SamplingParams(max_new_tokens=rng.randint(8, 64))
    if rng.random() < 0.5:
        sampling.temperature = rng.choice((0.7, 1.0))
        sampling.seed = rng.getrandbits(32)
    if kind == "normal" and rng.random() < 0.2:
        sampling.stop.append(rng.choice((".", "\n", " the")))
    req = gen.GenerateRequest(prompt=gen.Prompt(text=prompt), sampling=sampling)
    req.speculation.enabled = rng.random() < 0.5
    deadline = rng.uniform(0.05, 0.4) if kind == "deadline" else None
    cancel_after = rng.randint(1, 5) if kind == "cancel" else 0
    return req, deadline, cancel_after


async def _one(stub, kind: str, rng: random.Random, prompts: list[str], tally: Tally) -> None:
    req, deadline, cancel_after = _request(kind, rng, prompts)
    tally.sent[kind] += 1
    call = stub.Generate(req, timeout=deadline if deadline is not None else 120.0)
    chunks, finished = 0, False
    try:
        async for chunk in call:
            chunks += 1
            tally.tokens += len(chunk.token_ids)
            finished = finished or chunk.finish_reason != gen.FINISH_REASON_UNSPECIFIED
            if cancel_after and chunks >= cancel_after:
                call.cancel()
                tally.cancelled += 1
                return
        if finished:
            tally.finished += 1
        else:
            tally.errors.append(f"{kind}: the stream ended without a finish reason")
    except grpc.aio.AioRpcError as exc:
        if kind == "deadline" and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            tally.expired += 1
        elif cancel_after and exc.code() == grpc.StatusCode.CANCELLED:
            tally.cancelled += 1
        else:
            tally.errors.append(f"{kind}: {exc.code().name}: {exc.details()}")


async def _load(router: str, streams: int, duration_s: float, seed: int, tally: Tally) -> None:
    prompts = heldout_prompts(64, seed=seed)
    end = time.monotonic() + duration_s
    async with grpc.aio.insecure_channel(router) as channel:
        stub = router_pb2_grpc.RouterStub(channel)

        async def worker(k: int) -> None:
            rng = random.Random(seed * 1000 + k)
            while time.monotonic() < end:
                await _one(stub, rng.choices(KINDS, WEIGHTS)[0], rng, prompts, tally)

        await asyncio.gather(*(worker(k) for k in range(streams)))


async def _drained(router: str) -> tuple[bool, list[dict]]:
    """Polls ListInstances until the fleet is at rest (or DRAIN_TIMEOUT_S passes)."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    async with grpc.aio.insecure_channel(router) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        while True:
            listed = (await stub.ListInstances(router_pb2.ListInstancesRequest())).instances
            rest = at_rest(listed)
            if rest or time.monotonic() > deadline:
                return rest, [{"id": i.spec.id, "in_flight": i.in_flight, "running": i.load.running,
                               "queue_length": i.load.queue_length,
                               "kv_cache_used_tokens": i.load.kv_cache_used_tokens} for i in listed]
            await asyncio.sleep(0.5)


def soak(opts: BenchOptions, streams: int = 32, duration_s: float = 600.0, seed: int = 0) -> dict:
    """Runs the soak; returns the JSON-able result (see the module docstring)."""
    rng = random.Random(seed)
    options = UpOptions(home=opts.home, base_port=free_base_port(rng), target_model=opts.model_dir(opts.model),
                        draft_model=opts.model_dir(opts.draft), threads=opts.threads, log_level="warning")
    specs = [s if s.name != "scaler" else _pinned(s) for s in plan(options)]
    log_dir = Path(tempfile.mkdtemp(prefix="llmesh-soak-"))
    warmup_s = min(60.0, duration_s / 10)
    tally = Tally()
    series: list[dict] = []
    with local_suite.started(specs, log_dir) as group:
        pids = {c.name: c.proc.pid for c in group.children}
        router = next(s.address for s in specs if s.name == "router")
        t0 = time.monotonic()

        async def run() -> tuple[dict[str, float], bool, list[dict]]:
            load = asyncio.create_task(_load(router, streams, duration_s, seed, tally))
            start: dict[str, float] = {}
            while not load.done():
                t = time.monotonic() - t0
                sample = {name: rss_mib(pid) for name, pid in pids.items()}
                series.append({"t": round(t, 1), **{k: round(v, 1) for k, v in sample.items() if v}})
                if not start and t >= warmup_s:
                    start = {k: v for k, v in sample.items() if v}
                await asyncio.wait([load], timeout=RSS_SAMPLE_S)
            await load
            rest, fleet = await _drained(router)
            return start, rest, fleet

        start, drained, fleet = asyncio.run(run())
        end = {name: rss_mib(pid) for name, pid in pids.items()}
        series.append({"t": round(time.monotonic() - t0, 1), **{k: round(v, 1) for k, v in end.items() if v}})
        died = [c.name for c in group.exited()]
    grown = growth(start, end)
    return {
        "scenario": "soak", "model": opts.model, "draft": opts.draft, "streams": streams,
        "duration_s": duration_s, "warmup_s": warmup_s, "requests": sum(tally.sent.values()),
        "sent_by_kind": tally.sent, "finished": tally.finished, "cancelled": tally.cancelled,
        "deadline_expired": tally.expired, "tokens": tally.tokens,
        "errors": len(tally.errors), "error_examples": sorted(set(tally.errors))[:10],
        "services_died": died,
        "rss_start_mib": {k: round(v, 1) for k, v in start.items()},
        "rss_end_mib": {k: round(v, 1) for k, v in end.items() if v},
        "rss_growth": {k: round(v, 4) for k, v in grown.items()},
        "rss_growth_max": round(max(grown.values()), 4) if grown else None,
        "drained": drained, "fleet_after": fleet, "rss_series": series,
    }


def _pinned(scaler_spec: ServiceSpec) -> ServiceSpec:
    """The scaler of the plan, held at one target (the soak measures processes, not scaling)."""
    return replace(scaler_spec, args=(*scaler_spec.args, "--default-max-instances", "1"))


SCENARIOS["soak"] = soak
