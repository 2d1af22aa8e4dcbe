"""The engine with a tiny model, driven step by step (no thread, no sleeps)."""

from __future__ import annotations

import pytest
import torch

from services.common.errors import ResourceExhausted
from services.engine.build import build_engine
from services.engine.engine import retry_hint
from services.engine.sequence import FinishReason, GenerationRequest, SamplingOptions, Status
from services.engine.settings import EngineSettings
from services.speculative.gamma import SpeculationSettings
from services.speculative.speculator import Speculator
from services.speculative.state import Proposal, SpeculationRequest
from tests.conftest import hf_greedy


class Recorder:
    def __init__(self):
        self.tokens, self.finish = [], None

    def __call__(self, ev):
        self.tokens += ev.token_ids
        if ev.finish_reason is not None:
            self.finish = ev.finish_reason


def make_engine(tiny_models, **kw):
    base = dict(max_batch_size=4, max_wait_ms=0.0, max_batch_tokens=256, max_queue=64, num_slots=8)
    base.update(kw)
    return build_engine(str(tiny_models.target), EngineSettings(**base)).engine


def greedy(prompt, n, **kw):
    return GenerationRequest(prompt_ids=prompt, sampling=SamplingOptions(max_new_tokens=n, ignore_eos=True), **kw)


def drain(engine, limit=500):
    for _ in range(limit):
        if not engine.run_once() and not engine.scheduler.has_work():
            return
    raise AssertionError("engine did not finish")


def test_batch_invariant_with_staggered_arrivals(tiny_models, reference_model):
    """Greedy tokens of each request equal its solo run, whatever joins or leaves."""
    engine = make_engine(tiny_models, max_batch_size=3, max_batch_tokens=12)  # chunked prefills too
    prompts = [[(7 * i + j) % 300 + 1 for j in range(3 + (5 * i) % 17)] for i in range(9)]
    lengths = [3 + (4 * i) % 13 for i in range(9)]
    recs = [Recorder() for _ in prompts]
    pending = list(zip(prompts, lengths, recs))
    steps = 0
    while pending or engine.scheduler.has_work():
        if pending and steps % 2 == 0:  # a new arrival every other step
            p, n, r = pending.pop(0)
            engine.submit(greedy(p, n), r)
        engine.run_once()
        steps += 1
        assert len(engine.scheduler.running) <= 3
    for p, n, r in zip(prompts, lengths, recs):
        assert r.tokens == hf_greedy(reference_model, p, n)
        assert r.finish is FinishReason.LENGTH


def test_join_at_step_boundary_and_leave_frees_cache(tiny_models):
    engine = make_engine(tiny_models)
    a, b = Recorder(), Recorder()
    engine.submit(greedy([1, 2, 3], 6), a)
    engine.run_once()
    assert len(engine.scheduler.running) == 1
    engine.submit(greedy([4, 5, 6], 2), b)
    engine.run_once()
    assert len(engine.scheduler.running) == 2  # b joined while a was decoding
    while b.finish is None:
        engine.run_once()
    assert len(engine.scheduler.running) == 1  # b left in the step it finished
    assert engine.scheduler.slots.free == 7
    drain(engine)
    assert engine.scheduler.slots.free == 8 and engine.scheduler.cached_tokens == 0


def test_cancel_leaves_the_batch_next_step_and_frees_its_slot(tiny_models):
    engine = make_engine(tiny_models)
    recs = [Recorder() for _ in range(3)]
    seqs = [engine.submit(greedy([9, 8, 7 + i], 50), r) for i, r in enumerate(recs)]
    engine.run_once()
    engine.run_once()
    assert len(engine.scheduler.running) == 3 and engine.scheduler.slots.free == 5
    engine.cancel(seqs[1])
    engine.run_once()
    assert len(engine.scheduler.running) == 2 and engine.scheduler.slots.free == 6
    assert recs[1].finish is FinishReason.CANCELLED


def test_deadline_passed_cancels(tiny_models):
    engine = make_engine(tiny_models)
    rec = Recorder()
    now = engine.clock()
    engine.submit(greedy([1, 2], 50, deadline=now + 3600), rec)
    engine.run_once()
    engine.scheduler.running[0].request.deadline = engine.clock()  # expires now
    engine.run_once()
    assert rec.finish is FinishReason.CANCELLED and not engine.scheduler.running


def test_priority_orders_admission(tiny_models):
    engine = make_engine(tiny_models, max_batch_size=1)
    order = []

    def rec(name):
        def sink(ev):
            if ev.finish_reason is not None:
                order.append(name)
        return sink

    for name, prio in [("batch", 1), ("normal", 2), ("interactive", 3), ("normal2", 2)]:
        engine.submit(greedy([1, 2, 3], 2, priority=prio), rec(name))
    drain(engine)
    assert order == ["interactive", "normal", "normal2", "batch"]


def test_an_interactive_request_takes_a_full_batchs_place_at_the_next_step_and_outputs_stay_exact(
        tiny_models, reference_model):
    engine = make_engine(tiny_models, max_batch_size=2)
    prompts, lengths = [[3, 1, 4, 1, 5], [9, 2, 6, 5], [8, 9, 7, 9]], [12, 12, 4]
    recs = [Recorder() for _ in prompts]
    normals = [engine.submit(greedy(p, n, priority=2), r) for p, n, r in zip(prompts[:2], lengths, recs)]
    for _ in range(4):
        engine.run_once()
    assert all(len(r.tokens) >= 3 for r in recs[:2])  # the batch is full, both mid-stream
    urgent = engine.submit(greedy(prompts[2], lengths[2], priority=3), recs[2])
    engine.run_once()
    assert urgent in engine.scheduler.running and len(recs[2].tokens) == 1  # admitted and prefilled at once
    assert [s.preemptions for s in normals] == [0, 1] and normals[1].status is Status.WAITING  # the later one
    assert engine.load().preemptions == 1
    drain(engine)
    # The preempted one recomputed and went on: every stream is its solo run, nothing repeated or dropped.
    assert [r.tokens for r in recs] == [hf_greedy(reference_model, p, n) for p, n in zip(prompts, lengths)]
    assert all(r.finish is FinishReason.LENGTH for r in recs)
    assert engine.load().preemptions == 1 and engine.load().queue_length == 0


def test_queue_bound_refuses_at_once_and_keeps_accepted(tiny_models):
    engine = make_engine(tiny_models, max_queue=2, max_batch_size=1)
    accepted = [Recorder(), Recorder()]
    for r in accepted:
        engine.submit(greedy([1, 2], 3), r)
    with pytest.raises(ResourceExhausted) as err:
        engine.submit(greedy([1, 2], 3), Recorder())
    assert err.value.retry_after_s > 0
    drain(engine)
    assert all(r.finish is FinishReason.LENGTH and len(r.tokens) == 3 for r in accepted)


@pytest.mark.parametrize("rate, hint", [(0.0, 1.0), (8.5, 1 / 8.5), (100.0, 0.1), (0.01, 30.0)])
def test_a_full_queue_says_when_one_place_frees_not_when_it_drains(rate, hint):
    """Retry-After for a full queue: one request's turn at the measured rate (8.5 requests/s: 0.12 s),
    not max_queue of them (256 / 8.5 = 30 s, which the openai SDK waits out)."""
    assert retry_hint(rate) == pytest.approx(hint)


def test_eos_ends_the_sequence_unless_ignored(tiny_models, reference_model):
    engine = make_engine(tiny_models)
    prompt = [10, 20, 30]
    first = hf_greedy(reference_model, prompt, 1)[0]
    engine.eos_token_ids = {first}
    stopped, ignored = Recorder(), Recorder()
    engine.submit(GenerationRequest(prompt_ids=prompt, sampling=SamplingOptions(max_new_tokens=5)), stopped)
    engine.submit(greedy(prompt, 5), ignored)
    drain(engine)
    assert stopped.finish is FinishReason.EOS and stopped.tokens == []
    assert ignored.tokens == hf_greedy(reference_model, prompt, 5)


def test_seeded_sampling_is_batch_invariant(tiny_models):
    def run(batch_mates):
        engine = make_engine(tiny_models)
        target = Recorder()
        opts = SamplingOptions(temperature=1.0, top_p=0.9, max_new_tokens=12, seed=42, ignore_eos=True)
        engine.submit(GenerationRequest(prompt_ids=[3, 1, 4], sampling=opts), target)
        for i in range(batch_mates):
            engine.submit(greedy([i + 1] * (i + 2), 8), Recorder())
        drain(engine)
        return target.tokens

    assert run(0) == run(3)


def test_metrics_report_batches_and_tokens(tiny_models):
    engine = make_engine(tiny_models)
    for i in range(4):
        engine.submit(greedy([i + 1, 2, 3], 5), Recorder())
    drain(engine)
    load = engine.load()
    m = load.metrics
    assert m.counters["tokens_generated_total"] == 20 and m.counters["requests_total"] == 4
    assert m.mean_batch_size > 1 and 0 < m.busy_fraction <= 1
    assert m.ttft_ms.count == 4 and m.tpot_ms.p50_ms > 0


def test_forward_error_fans_out_and_engine_keeps_serving(tiny_models, monkeypatch):
    engine = make_engine(tiny_models)
    recs = [Recorder(), Recorder()]
    for r in recs:
        engine.submit(greedy([1, 2, 3], 4), r)
    original = engine.runner.timed_forward
    monkeypatch.setattr(engine.runner, "timed_forward", lambda rows: (_ for _ in ()).throw(RuntimeError("boom")))
    engine.run_once()
    assert all(r.finish is FinishReason.ERROR for r in recs) and engine.scheduler.slots.free == 8
    monkeypatch.setattr(engine.runner, "timed_forward", original)
    after = Recorder()
    engine.submit(greedy([1, 2, 3], 4), after)
    drain(engine)
    assert after.finish is FinishReason.LENGTH


def test_stale_cache_memory_never_leaks_into_outputs(tiny_models, reference_model):
    """Rows of different lengths read each other's window (masked), and blocks
    past a row's length (the null block, a block's unwritten tail); memory the
    cache was given (never zeroed by it yet) may hold NaN, and must not matter."""
    engine = make_engine(tiny_models)
    for k, v in engine.runner.cache.layers:
        k.fill_(float("nan"))
        v.fill_(float("nan"))
    engine.runner.cache._clean = 0  # as given by torch.empty: nothing zeroed yet
    short, long = Recorder(), Recorder()
    engine.submit(greedy([5, 6], 6), short)
    engine.submit(greedy(list(range(1, 30)), 6), long)
    drain(engine)
    assert short.tokens == hf_greedy(reference_model, [5, 6], 6)
    assert long.tokens == hf_greedy(reference_model, list(range(1, 30)), 6)


class CountingProposer:
    """A proposer that answers at once with a fixed (mostly wrong) proposal."""

    def __init__(self):
        self.rounds = 0

    def propose(self, round_, on_result):
        self.rounds += 1
        on_result(Proposal([1] * round_.gamma), None)

    def close(self):
        pass


def test_speculation_waits_out_a_batch_above_the_break_even_queued_requests_included(tiny_models, reference_model):
    engine = build_engine(str(tiny_models.target), EngineSettings(max_batch_size=1, max_wait_ms=0.0, num_slots=4),
                          speculation=Speculator(SpeculationSettings(disable_by_batch_size=1, min_acceptance=0.0))).engine
    first, second = CountingProposer(), CountingProposer()
    recs = [Recorder(), Recorder()]
    # One runs while the other queues (max_batch_size 1): two sequences want the
    # engine, more than disable_by_batch_size, so neither speculates.
    engine.submit(greedy([5, 6, 7], 12, speculation=SpeculationRequest(first)), recs[0])
    engine.submit(greedy([8, 9], 6, speculation=SpeculationRequest(second)), recs[1])
    drain(engine)
    assert first.rounds == 0
    # The second ran its last tokens alone: it may speculate then, and stays exact.
    assert recs[0].tokens == hf_greedy(reference_model, [5, 6, 7], 12)
    assert recs[1].tokens == hf_greedy(reference_model, [8, 9], 6)
    alone, rec = CountingProposer(), Recorder()
    engine.submit(greedy([5, 6, 7], 12, speculation=SpeculationRequest(alone)), rec)
    drain(engine)
    assert alone.rounds > 0 and rec.tokens == hf_greedy(reference_model, [5, 6, 7], 12)


class SilentProposer(CountingProposer):
    """A proposer whose answers the test delivers by hand."""

    def __init__(self):
        super().__init__()
        self.pending = []

    def propose(self, round_, on_result):
        self.rounds += 1
        self.pending.append((round_.gamma, on_result))


def test_rounds_under_way_are_dropped_when_the_batch_grows_past_disable_by_batch_size(tiny_models, reference_model):
    engine = build_engine(str(tiny_models.target), EngineSettings(max_batch_size=4, max_wait_ms=0.0, num_slots=4),
                          speculation=Speculator(SpeculationSettings(
                              disable_by_batch_size=1, min_acceptance=0.0,
                              draft_timeout_ms=60_000, draft_hold_ms=60_000))).engine
    proposer, rec = SilentProposer(), Recorder()
    seq = engine.submit(greedy([5, 6, 7], 10, speculation=SpeculationRequest(proposer)), rec)
    while not proposer.pending:
        engine.run_once()
    assert seq.spec.waiting  # alone: it asked its draft and waits for the answer
    other = Recorder()
    engine.submit(greedy([8, 9], 10), other)  # now two want the engine: past disable_by_batch_size 1
    engine.run_once()
    assert not seq.spec.waiting and seq.spec.stats.dropped_by_batch_size == 1
    assert seq.spec.stats.not_speculated_reason == "2 sequences running, past --speculative-disable-by-batch-size 1"
    gamma, on_result = proposer.pending.pop()
    on_result(Proposal([1] * gamma), None)  # the late answer is ignored
    drain(engine)
    assert rec.tokens == hf_greedy(reference_model, [5, 6, 7], 10)
    assert other.tokens == hf_greedy(reference_model, [8, 9], 10)
    assert seq.spec.stats.rounds == 0


def test_a_preempted_speculating_sequence_abandons_its_round_and_stays_exact(tiny_models, reference_model):
    engine = build_engine(str(tiny_models.target), EngineSettings(max_batch_size=1, max_wait_ms=0.0, num_slots=4),
                          speculation=Speculator(SpeculationSettings(
                              disable_by_batch_size=8, min_acceptance=0.0,
                              draft_timeout_ms=60_000, draft_hold_ms=60_000))).engine
    proposer, rec, urgent = SilentProposer(), Recorder(), Recorder()
    seq = engine.submit(greedy([5, 6, 7], 10, priority=2, speculation=SpeculationRequest(proposer)), rec)
    while not proposer.pending:
        engine.run_once()
    assert seq.spec.waiting  # it asked its draft and waits for the answer
    engine.submit(greedy([8, 9], 4, priority=3), urgent)
    engine.run_once()
    assert seq.preemptions == 1 and not seq.spec.waiting  # its round went with its cache
    gamma, on_result = proposer.pending.pop()
    on_result(Proposal([1] * gamma), None)  # the late answer is ignored
    for _ in range(500):
        while proposer.pending:  # later rounds are answered at once
            gamma, on_result = proposer.pending.pop()
            on_result(Proposal([1] * gamma), None)
        if not engine.run_once() and not engine.scheduler.has_work():
            break
    assert rec.tokens == hf_greedy(reference_model, [5, 6, 7], 10)
    assert urgent.tokens == hf_greedy(reference_model, [8, 9], 4)
    assert seq.spec.stats.rounds > 0 and seq.spec.stats.draft_timeouts == 0


def test_ttft_and_tpot_have_one_definition():
    from services.common.metrics import ttft_tpot
    from services.engine.sequence import Timeline

    assert ttft_tpot(10.0, 10.5, 12.5, 5) == (0.5, 0.5)  # 4 gaps after the first token in 2 s
    assert ttft_tpot(10.0, 10.5, 10.5, 1) == (0.5, None)
    assert ttft_tpot(10.0, None, None, 0) == (None, None)
    assert Timeline(10.0, 10.1, 10.5, 13.0, 12.5, 5).ttft_tpot() == (0.5, 0.5)


def test_a_fault_in_the_engine_loop_fails_every_sequence_in_flight_and_refuses_new_ones(tiny_models):
    import threading

    from services.common.errors import Unavailable

    engine = make_engine(tiny_models, max_batch_size=1)
    running, waiting, paused = Recorder(), Recorder(), Recorder()
    events = []
    engine.submit(GenerationRequest(prompt_ids=[4, 5], sampling=SamplingOptions(max_new_tokens=2),
                                    persistent=True), lambda ev: (events.append(ev), paused(ev)))
    while not (events and events[-1].paused):
        engine.run_once()
    engine.submit(greedy([1, 2, 3], 50), running)
    engine.run_once()  # admitted: running alongside the paused one
    engine.submit(greedy([7, 8], 5), waiting)  # max_batch_size 1: this one waits
    engine.run_once()
    assert len(engine.scheduler.running) == 1 and len(engine.scheduler.paused) == 1
    assert engine.scheduler.num_waiting == 1
    late = Recorder()  # still in the command queue when the loop dies
    engine.submit(greedy([9], 3), late)

    def broken_schedule(now):
        raise RuntimeError("injected scheduler fault")

    engine.scheduler.schedule = broken_schedule
    died = threading.Event()
    seen = []
    engine.start(on_fatal=lambda exc: (seen.append(exc), died.set()))
    assert died.wait(10) and isinstance(seen[0], RuntimeError)
    engine.stop()
    for rec in (running, waiting, paused, late):
        assert rec.finish is FinishReason.ERROR
    assert isinstance(events[-1].error, Unavailable) and "the engine stopped" in str(events[-1].error)
    with pytest.raises(Unavailable, match="the engine stopped"):
        engine.submit(greedy([1, 2], 3), Recorder())


def test_load_is_an_immutable_snapshot_published_by_the_engine(tiny_models):
    import dataclasses

    engine = make_engine(tiny_models)
    before = engine.load()
    engine.submit(greedy([1, 2, 3], 4), Recorder())
    assert engine.load() is before  # nothing published until the engine steps
    engine.run_once()
    during = engine.load()
    assert during is not before and during.running == 1 and before.running == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        during.running = 5
    drain(engine)
    after = engine.load()  # idle after work: the windowed metrics are fresh
    assert after.running == 0 and after.metrics.counters["tokens_generated_total"] == 4


def test_an_empty_stop_sequence_is_refused_in_process_too(tiny_models):
    """An empty stop string would match before the first token: the engine's
    own validation (in-process callers) refuses it as the router and target do."""
    from services.common.errors import InvalidArgument

    engine = make_engine(tiny_models)
    with pytest.raises(InvalidArgument, match="stop sequence must not be empty"):
        engine.submit(GenerationRequest(prompt_ids=[1, 2], sampling=SamplingOptions(max_new_tokens=2, stop=("",))),
                      lambda ev: None)


def test_fit_context_lowers_only_a_bound_that_may_be_lowered():
    from services.engine.sequence import GenerationRequest, SamplingOptions
    from services.engine.validation import fit_context

    def fitted(prompt_len: int, max_new: int, fit: bool) -> int:
        req = GenerationRequest(prompt_ids=[1] * prompt_len,
                                sampling=SamplingOptions(max_new_tokens=max_new, fit_context=fit))
        fit_context(req, 256)
        return req.sampling.max_new_tokens

    assert fitted(250, 16, True) == 6  # what the context leaves
    assert fitted(10, 16, True) == 16  # fits: unchanged
    assert fitted(250, 16, False) == 16  # a bound the caller chose: validate refuses it
    assert fitted(256, 16, True) == 16  # no room at all: validate refuses the prompt
