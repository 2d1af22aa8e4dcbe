"""The load generator's closed loop: the steady phase a sweep point is measured in."""

from __future__ import annotations

import asyncio

from services.bench.loadgen import RequestResult, RunResult, closed_loop
from services.common.stubs import generation_pb2 as gen


def test_steady_throughput_counts_the_tokens_that_came_before_the_first_worker_ran_out():
    fast = RequestResult(ok=True, tokens=[1, 2], arrivals=[(1.0, 1), (2.0, 1)])
    straggler = RequestResult(ok=True, tokens=[1, 2, 3, 4, 5], arrivals=[(1.5, 2), (5.0, 3)])
    failed = RequestResult(ok=False, tokens=[9], arrivals=[(0.5, 1)])
    run = RunResult([fast, straggler, failed], wall_s=5.0, started_at=0.0, steady_until=2.0)
    assert run.tokens_per_s == 7 / 5.0  # the whole run, the drain included
    assert run.steady_tokens_per_s == (1 + 1 + 2) / 2.0  # the straggler's last 3 tokens came in the drain
    assert RunResult([fast], wall_s=2.0).steady_tokens_per_s is None  # an open loop has no steady phase
    assert RunResult([fast], 2.0, started_at=1.0, steady_until=1.0).steady_tokens_per_s is None


class UnequalStub:
    """Generate streams request i's ``sizes[i]`` tokens, one chunk per event-loop turn."""

    def __init__(self, sizes):
        self.sizes = sizes

    def Generate(self, request, timeout=None):  # noqa: N802 - the gRPC method's name
        n = self.sizes[request.sampling.max_new_tokens]

        async def chunks():
            for k in range(n):
                await asyncio.sleep(0)
                yield gen.GenerateChunk(token_ids=[k], finish_reason=gen.FINISH_REASON_LENGTH if k == n - 1 else 0)
        return chunks()


async def test_a_closed_loop_ends_its_steady_phase_when_the_first_worker_has_nothing_left_to_send():
    sizes = [2, 40, 2, 2]  # worker 1 holds the long request; worker 0 runs out after the three short ones
    make = lambda i: gen.GenerateRequest(sampling=gen.SamplingParams(max_new_tokens=i))  # noqa: E731
    run = await closed_loop(UnequalStub(sizes), make, concurrency=2, total=4, progress=False)
    assert run.tokens == sum(sizes) and run.errors == 0
    last = max(t for r in run.results for t, _ in r.arrivals)
    short_done = max(t for r in run.results if len(r.tokens) == 2 for t, _ in r.arrivals)
    assert run.started_at < short_done <= run.steady_until < last
    steady = sum(n for r in run.results for t, n in r.arrivals if t <= run.steady_until)
    assert steady < run.tokens  # the long request's tail came after the first worker ran out
    alone = await closed_loop(UnequalStub(sizes), make, concurrency=1, total=4, progress=False)
    assert alone.steady_until >= max(t for r in alone.results for t, _ in r.arrivals)  # one worker: no drain
    few = await closed_loop(UnequalStub(sizes), make, concurrency=8, total=2, progress=False)
    assert few.steady_until is not None and few.steady_tokens_per_s > 0  # idle workers end nothing


def test_sweep_lengths_spread_around_the_mean_and_do_not_depend_on_the_arm():
    from services.bench.scenarios import sweep_length

    lengths = [sweep_length(i, 64) for i in range(64)]
    assert min(lengths) == 32 and max(lengths) == 95 and sum(lengths) / 64 == 63.5
    assert len(set(lengths)) == 64  # every length once: no two streams in lockstep by construction


def test_a_sweep_point_says_whether_speculation_ran_not_only_whether_it_paid():
    from services.bench.scenarios import _proposals

    spoke = RequestResult(ok=True, tokens=list(range(10)), proposed=8, accepted=6, rounds=2)
    silent = RequestResult(ok=True, tokens=list(range(10)))
    failed = RequestResult(ok=False, tokens=[1], proposed=50, accepted=0, rounds=10)
    runs = [RunResult([spoke, failed], 1.0), RunResult([silent], 1.0)]
    assert _proposals("on", runs) == {"on_proposed_per_token": 0.4, "on_acceptance": 0.75}
    # A cost model that judged every step a loss proposed nothing: 0, and no acceptance to speak of.
    assert _proposals("on", [RunResult([silent], 1.0)]) == {"on_proposed_per_token": 0.0, "on_acceptance": None}
