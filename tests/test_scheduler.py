"""The scheduler alone: pure Python, no model, no clock patching (``now`` is passed)."""

from __future__ import annotations

import pytest

from services.engine.scheduler import Scheduler, slot_victim
from services.engine.sequence import GenerationRequest, SamplingOptions, Sequence, Status
from services.engine.settings import EngineSettings
from services.speculative.gamma import GammaController
from services.speculative.state import SpecState


def seq(prompt_len=4, priority=0, arrival=0.0, max_new=8):
    req = GenerationRequest(prompt_ids=list(range(1, prompt_len + 1)), priority=priority,
                            sampling=SamplingOptions(max_new_tokens=max_new))
    return Sequence(request=req, sink=lambda ev: None, arrival=arrival)


def settings(**kw):
    base = dict(max_batch_size=4, max_wait_ms=0.0, max_batch_tokens=64, max_queue=100, num_slots=8)
    base.update(kw)
    return EngineSettings(**base)


def test_priority_then_arrival_order():
    s = Scheduler(settings(max_batch_size=1))
    low, high, normal, high2 = seq(priority=1, arrival=0), seq(priority=3, arrival=1), seq(priority=2, arrival=2), \
        seq(priority=3, arrival=3)
    for x in (low, high, normal, high2):
        s.add(x)
    order = []
    for _ in range(4):
        plan = s.schedule(now=10.0)
        (row,) = plan.rows
        order.append(row.seq)
        s.finish(row.seq)
    assert order == [high, high2, normal, low]


def test_batch_size_and_slots_bound_the_running_set():
    s = Scheduler(settings(max_batch_size=3, num_slots=8))
    seqs = [seq(arrival=i) for i in range(5)]
    for x in seqs:
        s.add(x)
    plan = s.schedule(now=1.0)
    assert len(plan.rows) == 3 and len(s.running) == 3 and s.num_waiting == 2
    assert sorted(r.seq.slot for r in plan.rows) == [0, 1, 2]


def test_token_budget_chunks_long_prefills():
    s = Scheduler(settings(max_batch_tokens=10, max_batch_size=4))
    long, short = seq(prompt_len=25, arrival=0), seq(prompt_len=3, arrival=1)
    s.add(long)
    s.add(short)
    plan = s.schedule(now=1.0)
    assert [(r.seq, r.chunk) for r in plan.rows] == [(long, 10)]
    assert not plan.rows[0].completes
    long.num_cached = 10  # as the engine records after the forward
    plan = s.schedule(now=1.1)
    assert [(r.seq, r.start, r.chunk) for r in plan.rows] == [(long, 10, 10)]
    long.num_cached = 20
    plan = s.schedule(now=1.2)
    assert [(r.seq, r.chunk) for r in plan.rows] == [(long, 5), (short, 3)]
    assert all(r.completes for r in plan.rows)


def test_lone_request_waits_max_wait_for_companions():
    s = Scheduler(settings(max_wait_ms=5.0, max_batch_size=4))
    a = seq(arrival=0.0)
    s.add(a)
    plan = s.schedule(now=0.001)
    assert not plan.rows and plan.wake_at == 0.005
    s.add(seq(arrival=0.002))
    assert not s.schedule(now=0.003).rows
    plan = s.schedule(now=0.0051)
    assert len(plan.rows) == 2


def test_a_full_batch_of_waiters_does_not_wait():
    s = Scheduler(settings(max_wait_ms=1000.0, max_batch_size=2))
    s.add(seq(arrival=0.0))
    s.add(seq(arrival=0.0))
    assert len(s.schedule(now=0.0).rows) == 2


def test_cancelled_and_expired_sequences_leave_and_free_their_slot():
    s = Scheduler(settings(max_batch_size=2, num_slots=2))
    a, b, c = seq(arrival=0), seq(arrival=1), seq(arrival=2)
    c.request.deadline = 5.0
    for x in (a, b, c):
        s.add(x)
    s.schedule(now=1.0)
    assert s.slots.free == 0
    a.cancelled = True
    plan = s.schedule(now=2.0)
    assert a in plan.dropped and a.status is Status.FINISHED and a.slot is None
    assert c in [r.seq for r in plan.rows]  # c took a's slot in the same step
    plan = s.schedule(now=6.0)  # c's deadline passed
    assert c in plan.dropped and s.slots.free == 1


def test_paused_sequences_keep_their_slot_and_resume():
    s = Scheduler(settings())
    a = seq()
    s.add(a)
    s.schedule(now=1.0)
    slot = a.slot
    s.pause(a)
    assert not s.schedule(now=1.1).rows and a.slot == slot and s.slots.free == 7
    a.tokens.append(5)
    s.resume(a)
    plan = s.schedule(now=1.2)
    assert [r.seq for r in plan.rows] == [a] and a.slot == slot


def decoding(s: Scheduler, *seqs: Sequence) -> None:
    """Admits ``seqs`` and brings each to one pending decode token."""
    for x in seqs:
        s.add(x)
    s.schedule(now=0.0)
    for x in seqs:
        x.num_cached = len(x.tokens)
        x.tokens.append(9)


def awaiting_draft(x: Sequence, requested_at: float, hold_s: float, timeout_s: float = 0.5) -> None:
    x.spec = SpecState(proposer=None, control=GammaController(4, 1, 8))
    x.spec.waiting = True
    x.spec.deadline = requested_at + timeout_s
    x.spec.hold_until = requested_at + hold_s


def test_the_step_waits_for_an_outstanding_proposal_then_verifies_it_with_the_rest():
    s = Scheduler(settings())
    a, b = seq(), seq()
    decoding(s, a, b)
    awaiting_draft(a, requested_at=1.0, hold_s=0.05)
    plan = s.schedule(now=1.01)
    assert plan.rows == [] and plan.wake_at == 1.05  # b waits too: one forward will serve both
    a.spec.waiting, a.spec.proposal = False, [4, 5, 6]  # the proposal arrives
    plan = s.schedule(now=1.02)
    assert {r.seq for r in plan.rows} == {a, b}
    assert next(r for r in plan.rows if r.seq is a).proposal == [4, 5, 6]


def test_a_late_draft_holds_the_batch_only_until_its_hold():
    s = Scheduler(settings())
    a, b = seq(), seq()
    decoding(s, a, b)
    awaiting_draft(a, requested_at=1.0, hold_s=0.05, timeout_s=0.5)
    plan = s.schedule(now=1.06)  # past the hold, before the round's deadline
    assert [r.seq for r in plan.rows] == [b]  # the others go on; a still waits for its draft
    assert plan.wake_at == 1.5
    plan = s.schedule(now=1.6)  # past the deadline: a decodes without the draft
    assert {r.seq for r in plan.rows} == {a, b} and a.spec.stats.draft_timeouts == 1


def test_a_draft_hold_never_delays_admitting_new_requests():
    s = Scheduler(settings())
    a = seq()
    decoding(s, a)
    awaiting_draft(a, requested_at=1.0, hold_s=0.05)
    newcomer = seq(arrival=1.0)
    s.add(newcomer)
    plan = s.schedule(now=1.01)
    assert [r.seq for r in plan.rows] == [newcomer] and plan.admitted == [newcomer]


def test_dropping_a_round_abandons_only_a_round_under_way():
    spec = SpecState(proposer=None, control=GammaController(4, 1, 8))
    assert spec.drop_round() is False and spec.stats.dropped_by_batch_size == 0  # nothing under way
    spec.proposal, spec.sync.asked = [4, 5, 6], 3
    assert spec.drop_round() is True
    assert spec.proposal is None and not spec.waiting and spec.stats.dropped_by_batch_size == 1
    assert spec.sync.asked - spec.sync.kept == 3  # the next round tells the draft to discard all three
    assert spec.sync.next_round([1, 2], 2).discard == 3
    spec.waiting = True
    assert spec.drop_round() is True and not spec.waiting and spec.stats.dropped_by_batch_size == 2


# Priority preemption of batch places (priorities as the wire's: 1 batch, 2 normal, 3 interactive).
def test_slot_victim_is_the_lowest_then_latest_running_one_and_only_for_a_strictly_higher_priority():
    early, late, batch = seq(priority=2, arrival=0), seq(priority=2, arrival=1), seq(priority=1, arrival=2)
    assert slot_victim(seq(priority=3), [early, late]) is late
    assert slot_victim(seq(priority=3), [early, batch, late]) is batch
    assert slot_victim(seq(priority=2), [early, batch]) is batch
    assert slot_victim(seq(priority=2), [early, late]) is None  # equal priorities
    assert slot_victim(seq(priority=1), [early]) is None  # a lower one
    assert slot_victim(seq(priority=3), []) is None


def test_a_higher_priority_request_takes_the_place_of_the_lowest_then_latest_running_one():
    s = Scheduler(settings(max_batch_size=3))
    batch, early, late = seq(priority=1, arrival=0), seq(priority=2, arrival=1), seq(priority=2, arrival=2)
    decoding(s, batch, early, late)
    urgent = seq(priority=3, arrival=3)
    s.add(urgent)
    slot = batch.slot
    plan = s.schedule(now=1.0)
    assert plan.admitted == [urgent] and plan.preempted == [batch]  # the lowest priority, though the earliest
    assert {r.seq for r in plan.rows} == {early, late, urgent} and urgent.slot == slot
    assert batch.status is Status.WAITING and batch.slot is None and not batch.block_table and batch.num_cached == 0
    assert batch.preemptions == 1 and s.kv.stats.preemptions == 1
    urgent2 = seq(priority=3, arrival=4)
    s.add(urgent2)
    plan = s.schedule(now=2.0)
    assert plan.admitted == [urgent2] and plan.preempted == [late]  # then the latest arrival
    assert set(s.running) == {early, urgent, urgent2} and s.num_waiting == 2


@pytest.mark.parametrize("kept_p, victim_p, same_p, higher_p", [(2, 2, 2, 3), (2, 1, 1, 2)],
                         ids=["equal priorities never preempt each other", "a batch request never preempts a normal one"])
def test_only_a_strictly_higher_priority_takes_a_place(kept_p, victim_p, same_p, higher_p):
    """The waiting request of a strictly higher priority takes the lowest (then latest) running one's place;
    after that, the waiting ones (the preempted one and one of its own priority) wait: neither takes the place
    of a running one of an equal or higher priority."""
    s = Scheduler(settings(max_batch_size=2))
    kept, victim = seq(priority=kept_p, arrival=0), seq(priority=victim_p, arrival=1)
    decoding(s, kept, victim)
    same, higher = seq(priority=same_p, arrival=2), seq(priority=higher_p, arrival=3)
    s.add(same)
    s.add(higher)
    plan = s.schedule(now=1.0)
    assert plan.admitted == [higher] and plan.preempted == [victim]
    for t in range(2, 6):
        plan = s.schedule(now=float(t))
        assert not plan.preempted and not plan.admitted
    assert s.running == [kept, higher] and s.num_waiting == 2 and s.kv.stats.preemptions == 1


def test_a_persistent_sequence_never_gives_its_place_up():
    """A draft's stream (persistent, priority 0: the default) is what a target's round waits on."""
    s = Scheduler(settings(max_batch_size=2))
    plain, stream = seq(priority=0, arrival=0), seq(priority=0, arrival=1)
    stream.request.persistent = True
    decoding(s, plain, stream)
    s.add(seq(priority=2, arrival=2))
    plan = s.schedule(now=1.0)
    assert plan.preempted == [plain]  # though the stream is the later arrival
    s.add(seq(priority=2, arrival=3))
    plan = s.schedule(now=2.0)
    assert not plan.preempted and stream.status is Status.RUNNING


def test_a_preempted_row_gives_its_tokens_back_and_its_round_is_abandoned():
    s = Scheduler(settings(max_batch_size=2))
    a, b = seq(priority=2, arrival=0), seq(priority=2, arrival=1)
    decoding(s, a, b)
    s.settings = settings(max_batch_size=2, max_batch_tokens=6)
    b.spec = SpecState(proposer=None, control=GammaController(4, 1, 8))
    b.spec.proposal, b.spec.sync.asked = [4, 5, 6], 3
    urgent = seq(priority=3, arrival=2)
    s.add(urgent)
    plan = s.schedule(now=1.0)  # b's row (1 + 3 proposed tokens) leaves the budget 1 token: it goes back
    assert plan.preempted == [b] and [(r.seq, r.chunk) for r in plan.rows] == [(a, 1), (urgent, 4)]
    assert b.spec.proposal is None and not b.spec.waiting
    assert b.spec.sync.next_round(b.tokens, 2).discard == 3  # the draft discards the unverified proposal
    awaiting_draft(a, requested_at=1.0, hold_s=0.05)  # a round under way: abandoned with the cache
    s.add(seq(priority=3, arrival=3))
    plan = s.schedule(now=1.01)
    assert plan.preempted == [a] and not a.spec.waiting and a.spec.stats.draft_timeouts == 0


def test_a_preempted_sequence_resumes_before_later_arrivals_of_its_priority():
    s = Scheduler(settings(max_batch_size=2))
    a, b = seq(priority=2, arrival=0), seq(priority=2, arrival=1)
    decoding(s, a, b)
    later, urgent = seq(priority=2, arrival=2), seq(priority=3, arrival=3)
    s.add(later)
    s.add(urgent)
    assert s.schedule(now=1.0).preempted == [b]
    s.finish(urgent)
    plan = s.schedule(now=2.0)
    assert plan.admitted == [b] and s.num_waiting == 1  # back in its place, ahead of the later arrival
