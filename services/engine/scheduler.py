"""Iteration-level scheduling: which sequences run in the next step.

Pure Python over a heap and lists (no torch). At every step: drop cancelled
and expired sequences (their slots are free for this very step), give each
running sequence its row (one token when decoding, a chunk when it has
several pending: a prefill, or tokens appended to a paused draft stream),
then admit waiting requests by priority (higher first, then arrival) while
the batch has room, slots are free, the token budget lasts and the paged
KV cache has blocks for them (a prompt's cached prefix is shared, not
recomputed: :class:`~services.engine.block_manager.BlockManager`). A lone
request waits up to ``max_wait_ms`` for companions before its prefill is
forced, unless enough are waiting to fill the batch. When the best waiting
request cannot be admitted (no room, no budget or no blocks) and a running
sequence has a strictly lower priority, that one gives its place up
(:func:`slot_victim`), preempted as below.

When a running row needs a block and the pool has none, a sequence is
preempted: the lowest priority (then the latest arrival) among the paused,
the running ones not yet given a row this step, and the one asking. Its
blocks go back to the pool (their registered prefix stays cached); a running
one goes back to the waiting queue, in its place by priority and arrival
(ahead of those that came after it, as vLLM V1's priority queue orders it by
its arrival time), and recomputes its tokens when admitted again (vLLM's recompute
preemption); a paused one recomputes when resumed.
A speculating sequence's round under way is abandoned (``spec.preempted()``).
Nothing is dropped; each preemption is counted.

While a speculating sequence waits for its draft's proposal (up to what
its ``spec.hold(now)`` says), the whole step waits with it. A forward pass costs
about the same for one row as for twenty when it is bound by reading the
weights, so running the ready rows now would cost a full pass and leave the
late sequence a pass of its own; waiting keeps every sequence's verification
in one pass, and keeps the target off the CPU while a draft that shares it
computes. It never holds back waiting requests: when any are queued, the
step runs (and admits them) at once. A sequence's speculation state is
consulted only through ``services.engine.speculation.SequenceSpeculation``.

Engine thread only; every ``now`` is the engine's clock (time.monotonic()
seconds unless injected). Model: nano-vllm's ``scheduler.py``.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

from services.engine.block_manager import BlockManager
from services.engine.sequence import FinishReason, Sequence, Status
from services.engine.settings import EngineSettings


def preemption_order(seq: Sequence) -> tuple[int, float]:
    """Sorts sequences by who gives way first: the lowest priority, then the latest arrival."""
    return seq.priority, -seq.arrival


def slot_victim(waiting: Sequence, running: Iterable[Sequence]) -> Sequence | None:
    """The running sequence whose place ``waiting`` (the best waiting sequence,
    which cannot be admitted otherwise: the batch is at ``max_batch_size``, no
    slot is free, or the token budget or the KV pool refuses it) takes, or None.

    The rule: the candidate is the first of ``running`` in
    :func:`preemption_order` (the lowest priority, then the latest arrival, as
    KV preemption chooses); it gives way only when ``waiting``'s priority is
    strictly higher. So equal priorities never preempt each other (no
    thrashing: the preempted one can never take its place back), and a lower
    priority never preempts a higher one. The caller passes only the running
    sequences that may be taken. Pure (reads priorities and arrivals); called
    on the engine thread.

    Source: vLLM's priority scheduling policy (``--scheduling-policy
    priority``): when a higher-priority request waits and the running batch
    cannot take it, the lowest-priority running request is preempted
    (``Scheduler._schedule_priority_preemption``, vllm/core/scheduler.py; the
    V1 scheduler, vllm/v1/core/sched/scheduler.py, orders its waiting queue and
    picks KV victims by the same (priority, arrival) key). vLLM compares
    (priority, arrival) pairs, so an earlier request also preempts a later one
    of the same priority; here only a strictly higher priority does.
    """
    victim = min(running, key=preemption_order, default=None)
    return victim if victim is not None and waiting.priority > victim.priority else None


class SlotAllocator:
    """Hands out KV-cache slots, lowest first (keeps the batch's slots compact).
    ``allocate`` raises IndexError when none is free."""

    def __init__(self, num_slots: int) -> None:
        self._free = list(range(num_slots))
        heapq.heapify(self._free)

    @property
    def free(self) -> int:
        """Slots not handed out."""
        return len(self._free)

    def allocate(self) -> int:
        """The lowest free slot."""
        return heapq.heappop(self._free)

    def release(self, slot: int) -> None:
        """Gives a slot back."""
        heapq.heappush(self._free, slot)


@dataclass
class Row:
    """One sequence's part of a step: ``chunk`` tokens from position ``start``,
    then the ``proposal`` to score (speculative decoding: the forward keeps
    logits for its ``len(proposal) + 1`` last positions)."""

    seq: Sequence
    start: int
    chunk: int
    #: Proposed draft tokens to verify after the chunk (speculative decoding).
    proposal: list[int] = field(default_factory=list)
    #: Seconds of the forward pass this row rode in (set by the engine).
    forward_s: float = 0.0

    @property
    def completes(self) -> bool:
        """True when this chunk feeds every pending token, so a next token is sampled."""
        return self.start + self.chunk == len(self.seq.tokens)


@dataclass
class StepPlan:
    """What one step runs, and what the schedule decided on the way."""

    rows: list[Row] = field(default_factory=list)
    #: Sequences dropped this step (cancelled or past their deadline).
    dropped: list[Sequence] = field(default_factory=list)
    #: Sequences admitted from the waiting queue this step.
    admitted: list[Sequence] = field(default_factory=list)
    #: Running sequences sent back to the waiting queue this step (KV blocks ran
    #: out, or a waiting sequence of higher priority took their place).
    preempted: list[Sequence] = field(default_factory=list)
    #: When to look again if nothing runs now (a lone request's max_wait).
    wake_at: float | None = None

    @property
    def tokens(self) -> int:
        """Tokens fed to the model this step (chunks and proposals)."""
        return sum(r.chunk + len(r.proposal) for r in self.rows)


class Scheduler:
    """Which sequences run in each step (see the module docstring). Owns the
    waiting queue, the running and paused lists, the slots and the block
    manager (default: 2048 tokens per slot, in blocks of 16). Engine thread only."""

    def __init__(self, settings: EngineSettings, kv: BlockManager | None = None) -> None:
        self.settings = settings
        self.slots = SlotAllocator(settings.num_slots)
        self.kv = kv if kv is not None else BlockManager(settings.num_slots * 128 + 1, 16)
        self._waiting: list[tuple[int, float, int, Sequence]] = []
        self._order = itertools.count()
        self.running: list[Sequence] = []
        self.paused: list[Sequence] = []

    # -- queue --------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        """Sequences queued for admission."""
        return len(self._waiting)

    def add(self, seq: Sequence) -> None:
        """Queues a sequence for admission (by priority, then arrival: a
        preempted one goes back to its place, ahead of those that came after it)."""
        seq.status = Status.WAITING
        seq.queued = True
        heapq.heappush(self._waiting, (-seq.priority, seq.arrival, next(self._order), seq))

    def has_work(self) -> bool:
        """Whether a sequence waits or runs."""
        return bool(self._waiting or self.running)

    @property
    def idle(self) -> bool:
        """No sequence waits, runs or is paused."""
        return not (self._waiting or self.running or self.paused)

    def in_flight(self) -> list[Sequence]:
        """Every sequence the scheduler holds: waiting, running and paused."""
        return [e[-1] for e in self._waiting] + self.running + self.paused

    # -- the step -----------------------------------------------------------
    def schedule(self, now: float) -> StepPlan:
        """The next step's rows; drops, admits and holds as the module docstring says."""
        plan = StepPlan()
        self._drop_dead(now, plan)
        hold = self._draft_hold(now)
        if hold is not None:
            plan.wake_at = hold
            return plan
        budget = self.settings.max_batch_tokens
        # Decode rows first: they are cheap and keep every stream moving.
        for seq in sorted(self.running, key=lambda s: s.pending):
            if budget <= 0:
                break
            if seq.status is not Status.RUNNING or self._awaits_draft(seq, now, plan):
                continue  # preempted for an earlier row this step, or waiting for its draft
            chunk = min(seq.pending, budget)
            if chunk <= 0:
                continue
            row = Row(seq, seq.num_cached, chunk)
            if seq.spec is not None and chunk == seq.pending:
                row.proposal = seq.spec.take_proposal()
            if not self._reserve(seq, row.start + chunk + len(row.proposal), plan):
                continue
            plan.rows.append(row)
            budget -= chunk + len(row.proposal)
        self._admit(now, plan, budget)
        return plan

    def _reserve(self, seq: Sequence, num_tokens: int, plan: StepPlan) -> bool:
        """Blocks for ``seq``'s positions below ``num_tokens``, preempting
        others (or ``seq`` itself, then False) while the pool is short."""
        while not self.kv.ensure(seq, num_tokens):
            rowed = {id(r.seq) for r in plan.rows}
            candidates = [s for s in self.paused if s.block_table] + [
                s for s in self.running if id(s) not in rowed and s.block_table]
            victim = min(candidates, key=lambda s: (*preemption_order(s), s is not seq), default=seq)
            self.preempt(victim, plan)
            if victim is seq:
                return False
        return True

    def preempt(self, seq: Sequence, plan: StepPlan) -> None:
        """Takes back ``seq``'s blocks: a running sequence returns to the
        waiting queue (and its slot is freed), a paused one stays paused; both
        recompute their tokens when they run again. A speculating sequence's
        round under way is abandoned: its proposal would be for positions its
        recompute moves past."""
        self.kv.free_all(seq)
        seq.num_cached = 0
        seq.preemptions += 1
        self.kv.stats.preemptions += 1
        if seq.spec is not None:
            seq.spec.preempted()
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            if seq.slot is not None:
                self.slots.release(seq.slot)
                seq.slot = None
            self.add(seq)
            plan.preempted.append(seq)

    def _draft_hold(self, now: float) -> float | None:
        """Until when the step waits for outstanding draft proposals, or None."""
        if self._waiting:
            return None
        holds = [h for s in self.running if s.spec is not None and (h := s.spec.hold(now)) is not None]
        return min(holds) if holds else None

    @staticmethod
    def _awaits_draft(seq: Sequence, now: float, plan: StepPlan) -> bool:
        """A speculating sequence waits for its proposal until the round's deadline,
        then decodes without it."""
        if seq.spec is None:
            return False
        deadline = seq.spec.awaits(now)
        if deadline is None:
            return False
        plan.wake_at = deadline if plan.wake_at is None else min(plan.wake_at, deadline)
        return True

    def _drop_dead(self, now: float, plan: StepPlan) -> None:
        if any(s.cancelled or s.expired(now) for *_, s in self._waiting):
            keep = [e for e in self._waiting if not (e[-1].cancelled or e[-1].expired(now))]
            plan.dropped += [e[-1] for e in self._waiting if e not in keep]
            self._waiting = keep
            heapq.heapify(self._waiting)
        for group in (self.running, self.paused):
            for seq in [s for s in group if s.cancelled or s.expired(now)]:
                self.finish(seq)
                plan.dropped.append(seq)
        for seq in plan.dropped:
            seq.status = Status.FINISHED

    def _admit(self, now: float, plan: StepPlan, budget: int) -> None:
        """Admits waiting sequences, best first, while room, budget and blocks
        last; one that cannot be admitted takes a lower-priority running
        sequence's place (:func:`slot_victim`), else it and those behind it wait."""
        if not self._waiting:
            return
        room = min(self.settings.max_batch_size - len(self.running), self.slots.free)
        if room > 0 and budget > 0:
            oldest = min(e[-1].arrival for e in self._waiting)
            waited_enough = (now - oldest) * 1000.0 >= self.settings.max_wait_ms
            if not waited_enough and len(self._waiting) < room:
                wake = oldest + self.settings.max_wait_ms / 1000.0
                plan.wake_at = wake if plan.wake_at is None else min(plan.wake_at, wake)
                return
        while self._waiting:
            seq = self._waiting[0][-1]
            room = min(self.settings.max_batch_size - len(self.running), self.slots.free)
            if room > 0 and budget > 0 and self.kv.admit(seq, budget):
                budget -= self._start(seq, now, plan, budget)
                continue
            # A persistent sequence (a draft's stream) is never taken: a target's round waits on it.
            victim = slot_victim(seq, [s for s in self.running if not s.request.persistent])
            if victim is None:
                break  # it waits for a place, tokens or blocks to come back
            budget += self._unrow(victim, plan)
            self.preempt(victim, plan)

    def _start(self, seq: Sequence, now: float, plan: StepPlan, budget: int) -> int:
        """``seq`` (admitted by the block manager) leaves the queue and runs its
        first chunk in this step; returns the chunk's tokens."""
        heapq.heappop(self._waiting)
        seq.slot = self.slots.allocate()
        seq.status = Status.RUNNING
        seq.queued = False
        if seq.admitted_at is None:
            seq.admitted_at = now
        self.running.append(seq)
        plan.admitted.append(seq)
        chunk = min(seq.pending, budget)
        plan.rows.append(Row(seq, seq.num_cached, chunk))
        return chunk

    @staticmethod
    def _unrow(seq: Sequence, plan: StepPlan) -> int:
        """Takes ``seq``'s row (if it has one) out of the plan; returns its tokens."""
        for i, row in enumerate(plan.rows):
            if row.seq is seq:
                del plan.rows[i]
                return row.chunk + len(row.proposal)
        return 0

    # -- transitions ----------------------------------------------------------
    def finish(self, seq: Sequence) -> None:
        """Removes a running or paused sequence and frees its slot and blocks
        (its computed full blocks join the prefix cache first)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.paused:
            self.paused.remove(seq)
        if seq.block_table:
            self.kv.commit(seq)
            self.kv.free_all(seq)
        if seq.slot is not None:
            self.slots.release(seq.slot)
            seq.slot = None
        seq.status = Status.FINISHED

    def pause(self, seq: Sequence) -> None:
        """A running persistent sequence stops being scheduled; it keeps its slot."""
        self.running.remove(seq)
        self.paused.append(seq)
        seq.status = Status.PAUSED

    def resume(self, seq: Sequence) -> None:
        """A paused sequence runs again (it keeps its slot: no admission needed)."""
        self.paused.remove(seq)
        self.running.append(seq)
        seq.status = Status.RUNNING

    def after_step(self, seq: Sequence) -> None:
        """``seq`` took its step's tokens: its full blocks join the prefix
        cache and blocks past its cached tokens (rejected proposals) go back."""
        if seq.block_table:
            self.kv.commit(seq)
            self.kv.trim(seq)

    @property
    def cached_tokens(self) -> int:
        """Tokens in the KV cache, over running and paused sequences."""
        return sum(s.num_cached for s in self.running) + sum(s.num_cached for s in self.paused)


__all__ = ["FinishReason", "Row", "Scheduler", "SlotAllocator", "StepPlan", "preemption_order", "slot_victim"]
