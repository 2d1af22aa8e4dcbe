"""Load generation: closed loop at a concurrency, or open loop at a request rate.

Each request is timed from the client's side: time to first token, time per
output token after the first, end to end. Works against anything that serves
``Generate`` (the router or a target directly).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from tqdm import tqdm

from services.common.stubs import generation_pb2 as gen
from services.common.metrics import percentile


@dataclass
class RequestResult:
    ok: bool
    tokens: list[int] = field(default_factory=list)
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    error: str = ""
    accepted: int = 0
    proposed: int = 0
    rounds: int = 0
    #: Speculation's time, summed over the request's rounds (from its stats).
    draft_wait_ms: float = 0.0
    draft_compute_ms: float = 0.0
    verify_ms: float = 0.0
    #: Why it fell back from the draft model to ngram ("" if it did not; SpeculationStats.fallback_reason).
    fallback_reason: str = ""
    #: When each chunk with tokens came (``time.perf_counter`` seconds) and how many tokens it held.
    arrivals: list[tuple[float, int]] = field(default_factory=list)

    @property
    def tpot_s(self) -> float | None:
        n = len(self.tokens)
        return (self.e2e_s - self.ttft_s) / (n - 1) if n > 1 else None


@dataclass
class RunResult:
    """One measured run: its requests and wall time; for a closed loop, also
    when it started and when its first worker found no request left to send
    (``time.perf_counter`` seconds), the end of its steady phase."""

    results: list[RequestResult]
    wall_s: float
    started_at: float | None = None
    steady_until: float | None = None

    @property
    def errors(self) -> int:
        return sum(not r.ok for r in self.results)

    @property
    def tokens(self) -> int:
        return sum(len(r.tokens) for r in self.results if r.ok)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def steady_tokens_per_s(self) -> float | None:
        """Tokens/s while every worker still had a request to send: tokens that
        arrived between the start and :attr:`steady_until`, over that time.
        A closed loop of ``total`` requests ends with a drain in which fewer
        than ``concurrency`` streams run; when requests take unequal times (as
        speculation makes them: each one's acceptance differs) that drain is
        long and runs small batches, so the whole-run figure
        (:attr:`tokens_per_s`, the makespan's) measures stragglers as much as
        the concurrency asked for. None when the run has no steady phase."""
        if self.started_at is None or self.steady_until is None or self.steady_until <= self.started_at:
            return None
        tokens = sum(n for r in self.results if r.ok for t, n in r.arrivals if t <= self.steady_until)
        return tokens / (self.steady_until - self.started_at)

    def pct(self, attr: str, q: float) -> float:
        values = sorted(v for r in self.results if r.ok and (v := getattr(r, attr)) is not None)
        return percentile(values, q) * 1000.0

    def summary(self) -> dict:
        ok = [r for r in self.results if r.ok]
        proposed = sum(r.proposed for r in ok)
        rounds = sum(r.rounds for r in ok)
        return {"requests": len(self.results), "errors": self.errors, "tokens": self.tokens,
                "wall_s": round(self.wall_s, 3), "tokens_per_s": round(self.tokens_per_s, 1),
                "ttft_p50_ms": round(self.pct("ttft_s", 50), 2), "ttft_p99_ms": round(self.pct("ttft_s", 99), 2),
                "tpot_p50_ms": round(self.pct("tpot_s", 50), 2), "tpot_p99_ms": round(self.pct("tpot_s", 99), 2),
                "e2e_p50_ms": round(self.pct("e2e_s", 50), 2), "e2e_p99_ms": round(self.pct("e2e_s", 99), 2),
                "acceptance_rate": round(sum(r.accepted for r in ok) / proposed, 4) if proposed else None,
                "mean_accepted_len": round((sum(r.accepted for r in ok) + rounds) / rounds, 3) if rounds else None,
                "fallbacks": sum(bool(r.fallback_reason) for r in ok),
                # Where a round goes: waiting for the draft (its compute included) and verifying.
                **{f"round_{name}": round(sum(getattr(r, name) for r in ok) / rounds, 2) if rounds else None
                   for name in ("draft_wait_ms", "draft_compute_ms", "verify_ms")}}


async def one_request(stub, request: gen.GenerateRequest, timeout_s: float | None = None) -> RequestResult:
    started = time.perf_counter()
    result = RequestResult(ok=False)
    try:
        async for chunk in stub.Generate(request, timeout=timeout_s):
            if chunk.token_ids:
                now = time.perf_counter()
                if not result.tokens:
                    result.ttft_s = now - started
                result.arrivals.append((now, len(chunk.token_ids)))
            result.tokens.extend(chunk.token_ids)
            if chunk.finish_reason:
                s = chunk.speculation
                result.accepted, result.proposed, result.rounds = s.accepted_tokens, s.proposed_tokens, s.rounds
                result.draft_wait_ms, result.draft_compute_ms = s.draft_wait_ms, s.draft_compute_ms
                result.verify_ms, result.fallback_reason = s.verify_ms, s.fallback_reason
        result.ok = True
    except grpc.aio.AioRpcError as exc:
        result.error = f"{exc.code().name}: {exc.details()}"
    result.e2e_s = time.perf_counter() - started
    return result


async def closed_loop(stub, make_request: Callable[[int], gen.GenerateRequest], concurrency: int, total: int,
                      label: str = "", progress: bool = True) -> RunResult:
    """``concurrency`` workers, each sending its next request when the last one
    ends; the result knows when the first worker ran out of requests (the end
    of the steady phase, :attr:`RunResult.steady_tokens_per_s`)."""
    results: list[RequestResult | None] = [None] * total
    counter = iter(range(total))
    bar = tqdm(total=total, desc=label or f"c={concurrency}", leave=False, disable=not progress, unit="req")
    ran_out: list[float] = []

    async def worker() -> None:
        sent = False
        for i in counter:
            results[i] = await one_request(stub, make_request(i))
            bar.update(1)
            sent = True
        if sent:  # a worker that never had a request (total < concurrency) ends no steady phase
            ran_out.append(time.perf_counter())

    started = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    wall = time.perf_counter() - started
    bar.close()
    return RunResult([r for r in results if r is not None], wall, started, min(ran_out, default=None))


async def open_loop(stub, make_request: Callable[[int], gen.GenerateRequest], rate: float, total: int,
                    seed: int = 0, label: str = "", progress: bool = True) -> RunResult:
    """Poisson arrivals at ``rate`` requests/s, whatever the latency."""
    rng = random.Random(seed)
    bar = tqdm(total=total, desc=label or f"rate={rate}/s", leave=False, disable=not progress, unit="req")

    async def timed(i: int) -> RequestResult:
        r = await one_request(stub, make_request(i))
        bar.update(1)
        return r

    started = time.perf_counter()
    tasks = []
    for i in range(total):
        tasks.append(asyncio.create_task(timed(i)))
        await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    wall = time.perf_counter() - started
    bar.close()
    return RunResult(list(results), wall)


def greedy_request(prompt: str, new_tokens: int, speculate: bool | None = None, gamma: int | None = None,
                   request_id: str = "", method: int | None = None) -> gen.GenerateRequest:
    req = gen.GenerateRequest(request_id=request_id, prompt=gen.Prompt(text=prompt),
                              sampling=gen.SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    if speculate is not None:
        req.speculation.enabled = speculate
    if gamma is not None:
        req.speculation.gamma = gamma
    if method is not None:
        req.speculation.method = method
    return req


async def interleaved_latency(kinds: dict[str, Callable], make_request: Callable[[int], gen.GenerateRequest],
                              n: int, warmup: int = 4) -> dict[str, list[float]]:
    """Seconds per call of each kind (``kinds``: name -> async call of one
    request, awaited to its end), ``n`` calls each at concurrency 1, the kinds
    interleaved in rotating order so that drift hits them alike; after
    ``warmup`` untimed rounds (channels, caches, first choices). Wall clock:
    ``time.perf_counter``."""
    for i in range(warmup):
        for call in kinds.values():
            await call(make_request(i))
    times: dict[str, list[float]] = {k: [] for k in kinds}
    order = list(kinds)
    for i in range(n):
        req = make_request(i)
        for kind in order[i % len(order):] + order[:i % len(order)]:
            started = time.perf_counter()
            await kinds[kind](req)
            times[kind].append(time.perf_counter() - started)
    return times


async def alternating_runs(stubs: dict, make_request: Callable[[int], gen.GenerateRequest], concurrency: int,
                           total: int, repeats: int, progress: bool) -> dict[str, list[RunResult]]:
    """``repeats`` closed-loop runs of each stub (name -> stub), alternating
    stub by stub, after one untimed warm-up run of ``concurrency`` requests each."""
    for stub in stubs.values():
        await closed_loop(stub, make_request, concurrency, concurrency, progress=False)
    runs: dict[str, list[RunResult]] = {k: [] for k in stubs}
    for r in range(repeats):
        for kind, stub in stubs.items():
            runs[kind].append(await closed_loop(stub, make_request, concurrency, total,
                                                label=f"{kind} c{concurrency} run {r + 1}", progress=progress))
    return runs
