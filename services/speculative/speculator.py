"""Speculative decoding for one engine: the strategy the engine calls at named points.

Implements ``services.engine.speculation.Speculation``. Each round, for a
sequence that speculates: the proposer (the remote draft) proposes gamma
tokens; the engine scores them in its next batched forward pass (vLLM's
scorer: one row of gamma + 1 tokens); the rejection sampler keeps a prefix
and adds one token of the target's own (greedy: the argmax; sampled: the
Gumbel-coupled rule of :mod:`services.speculative.rejection_sampler`, with the
draft drawing from the same noise); the next round tells the draft how far to
roll back (:mod:`services.speculative.sync`). Output is token for token what
target-only decoding gives, greedy or seeded, and sampled output has the
target's distribution.

Speculation pays only while verifying costs less than it saves. By default
the Speculator decides at every step from a cost model it measures as the
engine runs (:mod:`services.speculative.cost_model`, after SmartSpec and
vLLM's dynamic speculation): the batch's gamma, 0 for none, maximises the
expected emitted tokens per second given each sequence's acceptance and the
measured step costs at this batch size; and where the steps that
speculated at this batch size with a proposer kind and a gamma delivered
fewer tokens per second than plain steps do, as counted, gammas from half
that one up are not tried there, whatever the model expects (a cost the
model does not see, such as the draft's compute taking the target's cores,
or acceptance that is not geometric), unless another gamma was measured to
deliver more (:func:`~services.speculative.cost_model.gate`); with none
left it stands down, measuring again after ``explore_s``, twice as long
after each loss measured. With a static
``disable_by_batch_size`` (an override), past that many sequences running or
waiting no round starts (vLLM's ``disable_by_batch_size``). Either way, when
the batch stops speculating, rounds under way are dropped. A sequence whose
drafts are mostly rejected, or whose draft fails, falls back to n-gram lookup
when its request allows it (:mod:`services.speculative.fallback`), else goes
on without speculation; so does one whose draft lets
:data:`MAX_CONSECUTIVE_TIMEOUTS` rounds in a row pass their deadline (alive
but silent: a stuck engine behind a SERVING health), and its proposer is told
(:class:`ReportsUnresponsive`), so that new sequences do not wait on that
draft until it answers again.

Every method runs on the engine thread except :meth:`Speculator.open`
(the submitting thread); times are seconds of the engine's clock.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from services.common.errors import InvalidArgument
from services.engine import sampler
from services.engine.scheduler import Row
from services.engine.sequence import Sequence, Status
from services.engine.speculation import Post, RoundCounts
from services.speculative.cost_model import (Acceptance, Speculating, StepCosts, bucket, choose_gamma, gate,
                                             realized_min_steps)
from services.speculative.fallback import NGRAM, NO_DRAFT_REASON, Action, Fallback, MethodRecord, Prospect, review
from services.speculative.gamma import GammaController, SpeculationSettings
from services.speculative.rejection_sampler import accept_gumbel, accept_greedy
from services.speculative.state import Proposal, SpecState, SpeculationRequest

log = logging.getLogger(__name__)

#: Rounds in a row that pass their deadline (``draft_timeout_ms``) after which
#: a sequence stops speculating: each costs the sequence the whole deadline,
#: and two in a row mean the draft has stopped answering rather than slowed
#: down (a slow round past its deadline is followed by an answered one).
MAX_CONSECUTIVE_TIMEOUTS = 2


#: The longest wait between exploring rounds of a batch size where speculation does not pay, as a multiple
#: of ``explore_s``: each round that finds it still does not pay doubles the wait, up to this.
MAX_EXPLORE_BACKOFF = 6


@runtime_checkable
class ReportsUnresponsive(Protocol):
    """A proposer that can be told its draft stopped answering (the remote
    proposer marks the draft's address, so that new sequences do not wait on
    it until it answers again). Any thread."""

    def unresponsive(self, reason: str) -> None:
        """The draft let :data:`MAX_CONSECUTIVE_TIMEOUTS` rounds in a row pass their deadline."""


def _kind(specs: list[SpecState]) -> str:
    """What a batch of these sequences waits for: "ngram" when every one looks
    its proposal up (no model), else "draft_model" (the slowest decides)."""
    kinds = {getattr(spec.proposer, "kind", "draft_model") for spec in specs}
    return "ngram" if kinds == {"ngram"} else "draft_model"


@dataclass
class _Decision:
    """The cost model's decision to speculate at a step: the sequences
    running (and how many there were), the proposer kind the batch waits for
    and the gamma chosen."""

    running: list[Sequence]
    batch: int
    kind: str
    gamma: int


@dataclass
class _Account:
    """What a speculating decode step delivered, counted as it runs."""

    decision: _Decision
    seconds: float
    tokens: int


class _EveryFewSeconds:
    """An INFO line per cause at most every ``every_s`` seconds (engine clock), with how many
    happened since the last: a draft that goes away makes every sequence fall back at once."""

    def __init__(self, what: str, every_s: float = 10.0) -> None:
        self.what, self.every_s = what, every_s
        self._last: dict[str, float] = {}
        self._since: dict[str, int] = {}

    def note(self, cause: str, reason: str, now: float) -> None:
        self._since[cause] = self._since.get(cause, 0) + 1
        last = self._last.get(cause)
        if last is not None and now - last < self.every_s:
            return
        log.info("%d %s (%s): %s", self._since.pop(cause), self.what, cause, reason)
        self._last[cause] = now


class Speculator:
    """Speculative decoding with per-sequence proposers, for one engine."""

    def __init__(self, settings: SpeculationSettings | None = None) -> None:
        self.settings = settings or SpeculationSettings()
        #: Measured step costs per batch size (the cost model's input).
        self.costs = StepCosts()
        #: Acceptance over every sequence, per method: the prior of a sequence's estimate.
        self.pools: defaultdict[str, Acceptance] = defaultdict(lambda: Acceptance(decay=0.98))
        #: Sequences running at the last step (the batch a request's review prices).
        self._batch = 0
        #: The cost model's gamma for the batch at this step (0: no speculation).
        self.gamma = 0
        self._last_end: float | None = None  # engine clock at the end of the last forward, None after idling
        self._now = 0.0
        self._exploring = False
        #: This step's decision to speculate (None: it does not; its batch size is ``_batch``, its gamma
        #: ``gamma``): what after_forward measures readiness and what the step delivers against.
        self._decision: _Decision | None = None
        #: Batch-size bucket -> exploring rounds, and losses measured again, after which speculation still
        #: did not pay there (each doubles the wait for the next, see MAX_EXPLORE_BACKOFF).
        self._explored: dict[int, int] = {}
        #: Buckets where what speculating steps delivered made the model stand down, until it measures a
        #: gain -> whether that loss is being measured again.
        self._stood_down: dict[int, bool] = {}
        #: Decode steps in a row in which the cost model speculated.
        self._speculating_steps = 0
        #: The decode step being counted for StepCosts.observe_realized (tokens come in after_verify).
        self._account: _Account | None = None
        #: Rounds asked of proposers and not answered yet (dropped ones included: the draft still computes
        #: them), and when the last was asked: while a draft computes, a step is not a plain one.
        self._rounds_in_flight = 0
        self._last_asked: float | None = None
        #: Whether a draft was still computing when this step started (its cost is not a plain step's).
        self._drafts_busy = False
        #: Forward shapes (rows x tokens per row) this process has run: the first of each is not a cost.
        self._shapes: set[tuple[int, int]] = set()
        self._fallback_log = _EveryFewSeconds("sequence(s) fell back from the draft model to ngram")

    @property
    def uses_cost_model(self) -> bool:
        """True unless a static ``disable_by_batch_size`` overrides the cost model."""
        return self.settings.disable_by_batch_size <= 0

    # -- named points ------------------------------------------------------------
    def open(self, request: SpeculationRequest, post: Post) -> SpecState:
        """A new sequence's state for ``request``. Any thread. Raises
        InvalidArgument for a request that is not a SpeculationRequest."""
        if not isinstance(request, SpeculationRequest):
            raise InvalidArgument("speculation", f"expected a SpeculationRequest, got {type(request).__name__}")
        if request.proposer is None and request.fallback is None:
            raise InvalidArgument("speculation", "a SpeculationRequest needs a proposer or a fallback")
        control = GammaController(request.gamma, request.gamma_min, request.gamma_max, request.fixed)
        if request.proposer is None:  # no draft for this request: n-gram lookup from the first round
            spec = SpecState(request.fallback(), control, post)
            spec.stats.fallback, spec.stats.fallback_reason = Fallback.NO_DRAFT.value, NO_DRAFT_REASON
        else:
            spec = SpecState(request.proposer, control, post, fallback=request.fallback)
        spec.stats.method = getattr(spec.proposer, "kind", "draft_model")
        return spec

    def before_schedule(self, running: list[Sequence], demand: int) -> None:
        """Decides whether (and, with the cost model, with what gamma) the
        batch speculates in this step. When it does not, rounds under way are
        dropped: their sequences stop waiting for drafts and proposals not yet
        verified are not scored, so that none sits out a step or widens every
        row of a big batch to gamma + 1 tokens. The draft discards them at the
        next round."""
        if (a := self._account) is not None:  # the last step's tokens are all in (after_verify)
            self.costs.observe_realized(a.decision.batch, a.decision.kind, a.decision.gamma, a.tokens, a.seconds,
                                        self._now)
            self._account = None
        if not running:
            self._last_end = None  # idle: the next gap is not a step's cost
        self._batch = len(running)
        self._decision = None
        self._drafts_busy = (self._rounds_in_flight > 0 and self._last_asked is not None
                             and self._now - self._last_asked < self.settings.draft_timeout_ms / 1000.0)
        if self.uses_cost_model:
            if self._exploring and not any(s.spec is not None and (s.spec.waiting or s.spec.proposal)
                                           for s in running):
                self._exploring = False
            self.gamma = self._decide(running)
            if self.gamma > 0 or self._exploring:  # an exploring round is verified, to be measured
                return
            why = f"the cost model judged that speculating would not pay with {len(running)} sequences running"
        elif demand <= self.settings.disable_by_batch_size:
            return
        else:
            why = (f"{demand} sequences running, past --speculative-disable-by-batch-size "
                   f"{self.settings.disable_by_batch_size}")
        for seq in running:
            if seq.spec is not None:  # a step of a sequence still prefilling is no decode step it missed
                seq.spec.drop_round(why if seq.first_token_at is not None else "")

    def _decide(self, running: list[Sequence]) -> int:
        """The cost model's gamma for a batch of ``running`` (0: none); when it
        is not 0, the decision is kept for :meth:`_measure_readiness`."""
        specs = [s.spec for s in running if s.spec is not None and s.spec.active]
        if not specs:
            return 0
        kind = _kind(specs)
        gamma_max = max(spec.control.hi for spec in specs)
        periods = self.costs.periods(len(running), gamma_max, kind)
        if periods is None:  # nothing measured at this batch size yet: try it
            self._exploring = True
            gamma = max(spec.control.gamma for spec in specs)
        else:
            plain = len(running) - len(specs)
            speculating = self._speculating(specs, len(running), gamma_max)
            gamma = modelled = choose_gamma(speculating, plain, periods)
            realized: dict[int, float] = {}
            where = bucket(len(running))
            wait = self.settings.explore_s * min(2 ** self._explored.get(where, 0), MAX_EXPLORE_BACKOFF)
            if gamma > 0:
                # What speculating steps delivered here, per gamma, as counted (older than the wait, it is
                # measured afresh): a gamma that lost caps the next at half of it, unless another was measured
                # to deliver more (cost_model.gate).
                steps = realized_min_steps(len(running))
                realized = {g: r for g in range(1, len(periods))
                            if (r := self.costs.realized(len(running), kind, g, self._now, max_age_s=wait,
                                                         min_steps=steps)) is not None}
                gamma = gate(gamma, speculating, plain, periods, realized)
                if gamma == 0:
                    if self._stood_down.get(where):  # measured again, and it still loses: wait twice as long
                        self._explored[where] = self._explored.get(where, 0) + 1
                    self._stood_down[where] = False
                elif gamma in realized:
                    self._stood_down.pop(where, None)  # measured to pay: back to the shortest wait
                    self._explored.pop(where, None)
                elif where in self._stood_down:
                    self._stood_down[where] = True  # the loss is being measured again
            elif where in self._stood_down:
                self._stood_down[where] = True
            plain_at = self.costs.plain_at(len(running))
            if gamma > 0 and (plain_at is None or self._now - plain_at >= wait):
                # Speculation is judged against plain steps: where none was measured yet (a bucket that began
                # by exploring) or after speculating for as long as the wait, plain steps measure them (from
                # the first that no draft computes beside); until then period(0) is the verify widths' line.
                gamma = 0
            last = self.costs.speculated_at(len(running))
            if gamma == 0 and (last is None or self._now - last >= wait):
                # Costs measured long ago may no longer hold: one round to measure them again. Each round
                # that finds speculation still does not pay here doubles the wait for the next one.
                self._exploring = True
                gamma = choose_gamma(speculating, plain, periods, lowest=1)
                if last is not None:
                    self._explored[where] = self._explored.get(where, 0) + 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug("cost model, %d running (%d %s, acceptance %s): period ms %s, modelled gamma %d, realized "
                          "tokens/s per sequence %s (plain %.1f), chose %d%s, next exploration in %.0f s; measured %s",
                          len(running), len(specs), kind, [round(a, 2) for g in speculating for a in g.acceptance],
                          [round(t * 1000, 1) for t in periods], modelled,
                          {g: round(r, 1) for g, r in realized.items()}, 1 / periods[0], gamma,
                          " (exploring)" if self._exploring else "", wait,
                          self.costs.table().get(bucket(len(running))))
        if gamma > 0:
            self._decision = _Decision(running, len(running), kind, gamma)
        return gamma

    def _speculating(self, specs: list[SpecState], batch: int, gamma_max: int) -> list[Speculating]:
        """``specs`` grouped by proposal method for :func:`choose_gamma`: each
        sequence's acceptance estimate, and what steps at this batch size
        found among sequences of its method."""
        by_method: defaultdict[str, list[float]] = defaultdict(list)
        for spec in specs:
            by_method[spec.method].append(self._alpha(spec))
        return [Speculating(alphas, *self.costs.readiness(batch, gamma_max, method))
                for method, alphas in by_method.items()]

    def after_forward(self, rows: list[Row], seconds: float, now: float) -> None:
        """Measures the step: its forward, the gap since the last one ended
        (waiting for drafts, the engine's own work) and, when the cost model
        chose to speculate, how the speculating sequences met it
        (:meth:`_measure_readiness`). Prefill passes only move the mark (their
        cost is not a decode step's).

        A step is filed as a plain one (gamma 0, what speculation is judged
        against) only where the batch did not speculate in it and no draft
        was computing when it started: a step the cost model chose to
        speculate in whose proposals were not in waited for the drafts (up to
        ``draft_hold_ms``), and the steps after standing down run beside the
        draft still computing the rounds asked before (on the same cores, on
        one machine); 2026-12-01, 32 streams: the first such step took 20 ms
        more gap and 7 ms more forward than plain ones, and such steps had
        made speculation look as if it paid where it lost 14 %. What they
        deliver is counted in :meth:`_count_realized` all the same. Rounds
        stop counting as computing ``draft_timeout_ms`` after the last one was
        asked (a silent draft does not take the cores), as of the previous
        step's end (``_now`` when :meth:`before_schedule` looks)."""
        self._now = now
        shape = (len(rows), max((r.chunk + len(r.proposal) for r in rows), default=0))
        first = shape not in self._shapes
        self._shapes.add(shape)
        if rows and all(r.chunk == 1 for r in rows):
            gamma = max(len(r.proposal) for r in rows)
            gap = None if self._last_end is None else now - seconds - self._last_end
            plain = self._decision is None and not self._drafts_busy
            self._count_realized(rows, seconds, None if first else gap)
            kind = _kind([r.seq.spec for r in rows if r.proposal])
            # Filed under the batch the decision saw (the sequences running), as it is looked up: a step
            # whose late sequences sat out has fewer rows, and is the cost of speculating at that batch.
            if (gamma > 0 or plain) and not first:
                self.costs.observe(max(len(rows), self._batch), gamma, seconds, gap, now, kind)
            self._measure_readiness(rows)
            if gamma > 0:
                self._exploring = False
        self._last_end = now

    def _count_realized(self, rows: list[Row], seconds: float, gap: float | None) -> None:
        """Starts counting what a decode step in which the cost model
        speculates delivers: the rows without a proposal emit one token each
        here, verified ones theirs in :meth:`after_verify`; the account goes to
        :meth:`StepCosts.observe_realized` at the next decision. The first
        step after turning speculation on (whose rounds are asked only after
        it), a step after idling (no gap) and a step of n-gram lookups that
        all found nothing (its rows are plain ones, no wider, and nothing
        waited for a draft) are not counted."""
        if self._decision is None:
            self._speculating_steps = 0
            return
        self._speculating_steps += 1
        if self._decision.kind == NGRAM and not any(r.proposal for r in rows):
            return  # lookups that found nothing: plain rows, no step of speculation to count
        if self._speculating_steps >= 2 and gap is not None:
            self._account = _Account(self._decision, seconds + gap, sum(1 for r in rows if not r.proposal))

    def _measure_readiness(self, rows: list[Row]) -> None:
        """At a decode pass of a step the cost model speculates in: of the
        speculating sequences, the fraction verified (a proposal in its row)
        and the fraction that sat the pass out, still waiting for its draft
        (the scheduler leaves it out until its proposal or its deadline);
        the others decoded one token. Recorded per proposal method (a lookup
        that found nothing is a miss of the lookup's, not of the draft's),
        under the batch size and gamma of the decision, once per step, unless no round was
        under way at all (the first step after the decision to speculate,
        whose rounds are asked only after it)."""
        if self._decision is None:
            return
        running = self._decision.running
        self._decision = None
        rowed = {id(r.seq) for r in rows}
        counts: defaultdict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # method -> verified, one, out
        for r in rows:
            if r.proposal:
                counts[r.seq.spec.method][0] += 1
            elif r.seq.spec is not None and r.seq.spec.active:
                counts[r.seq.spec.method][1] += 1
        for s in running:
            if id(s) not in rowed and s.spec is not None and s.spec.active and s.spec.waiting:
                counts[s.spec.method][2] += 1
        if not any(verified or out for verified, _, out in counts.values()):
            return  # no round was under way (the first step after turning speculation on)
        for method, (verified, one, out) in counts.items():
            total = verified + one + out
            self.costs.observe_readiness(self._batch, self.gamma, method, verified / total, out / total)

    def after_verify(self, seq: Sequence, row: Row, logits: torch.Tensor) -> list[int]:
        """The rejection sampler over the target's ``logits`` (``[gamma + 1,
        vocab]``) for ``row.proposal``; records the round. Returns the accepted
        proposals and the target's own next token."""
        spec: SpecState = seq.spec
        opts = seq.request.sampling
        gamma = len(row.proposal)
        if opts.greedy:
            n, token = accept_greedy(logits, row.proposal)
        else:
            n, token = accept_gumbel(sampler.warp_scores(logits, opts), row.proposal, seq.base_seed,
                                     len(seq.tokens))
        spec.sync.accepted(n)
        if self._account is not None:
            self._account.tokens += n + 1
        spec.stats.verify_ms += row.forward_s * 1000.0
        spec.control.update(n, gamma)
        self.pools[spec.method].update(n, gamma)
        return [*row.proposal[:n], token]

    def after_emit(self, seq: Sequence, counts: RoundCounts) -> None:
        """Records the round's figures (emitted tokens only) in the sequence's statistics."""
        seq.spec.stats.record(counts.accepted, counts.proposed, counts.emitted)

    def after_tokens(self, seq: Sequence, now: float, demand: int, room: int) -> None:
        """Asks the proposer for the next round, unless speculation does not pay now."""
        spec: SpecState = seq.spec
        if not spec.active or spec.waiting or spec.proposal:
            return
        s = self.settings
        action, reason = self._review(spec)
        if action is Action.STOP:
            spec.disable(reason)
            return
        if action is Action.FALL_BACK:
            self._fall_back(spec, Fallback.LOW_ACCEPTANCE, reason)
        missed = spec.timeouts_in_a_row
        if missed >= MAX_CONSECUTIVE_TIMEOUTS:
            reason = f"draft unresponsive: {missed} rounds in a row passed their {s.draft_timeout_ms:g} ms deadline"
            proposer = spec.proposer
            self._fall_back(spec, Fallback.DRAFT_FAILED, reason)
            if isinstance(proposer, ReportsUnresponsive):
                proposer.unresponsive(reason)
            if not spec.active:
                return
        self._now = now
        if self.uses_cost_model:
            if self.gamma < 1:
                return
            c = spec.control
            gamma = c.gamma if c.fixed else min(max(self.gamma, c.lo), c.hi)
        elif demand > s.disable_by_batch_size:
            return
        else:
            gamma = spec.control.gamma
        gamma = min(gamma, room)
        if gamma < 1:
            return
        if (limit := spec.draft_context) is not None:
            # The draft holds the whole sequence and then its proposal: stop before its context ends.
            if limit - len(seq.tokens) < 1:
                self._fall_back(spec, Fallback.DRAFT_FAILED, f"the draft's context ({limit} tokens) is full")
                if not spec.active or spec.draft_context is not None:
                    return
            else:
                gamma = min(gamma, limit - len(seq.tokens))
        round_ = spec.sync.next_round(seq.tokens, gamma)
        spec.round_id += 1
        spec.waiting = True
        spec.requested_at = now
        spec.deadline = now + s.draft_timeout_ms / 1000.0
        spec.hold_until = min(spec.deadline, now + s.draft_hold_ms / 1000.0)
        round_id, post = spec.round_id, spec.post
        self._rounds_in_flight += 1
        self._last_asked = now
        spec.proposer.propose(round_, lambda proposal, error: post(
            lambda at: self.on_proposal(seq, round_id, proposal, error, at)))

    def on_proposal(self, seq: Sequence, round_id: int, proposal: Proposal | None,
                    error: BaseException | None, now: float) -> None:
        """A proposal (or the proposer's failure) arrived, on the engine thread."""
        self._rounds_in_flight = max(0, self._rounds_in_flight - 1)
        spec: SpecState = seq.spec
        if round_id != spec.round_id or seq.status is not Status.RUNNING or not spec.waiting:
            return  # finished, or a late answer to a round that timed out or was dropped
        spec.waiting = False
        if error is not None:
            self._fall_back(spec, Fallback.DRAFT_FAILED, f"draft unavailable: {error}")
            return
        spec.timeouts_in_a_row = 0
        spec.stats.draft_wait_ms += (now - spec.requested_at) * 1000.0
        spec.stats.draft_compute_ms += proposal.compute_ms
        if not proposal.tokens:
            return
        if len(proposal.tokens) > spec.sync.asked:
            self._fall_back(spec, Fallback.DRAFT_FAILED,
                            f"the draft proposed {len(proposal.tokens)} tokens when asked for {spec.sync.asked}")
            return
        spec.proposal = list(proposal.tokens)

    # -- the method a sequence proposes with ------------------------------------------
    def _alpha(self, spec: SpecState) -> float:
        """The sequence's acceptance estimate, shrunk towards its method's engine-wide one."""
        return spec.control.acceptance.alpha(self.pools[spec.method].alpha(0.5))

    def _review(self, spec: SpecState) -> tuple[Action, str]:
        """:func:`services.speculative.fallback.review` for ``spec`` after a
        verified round, priced at the last step's batch size. A sequence
        reviewed since its last verified round, at a batch size of the same
        bucket (costs are kept per bucket, so the price is the same), keeps
        its method without being priced again: the review is asked for every
        sequence at every step, and pricing it cost 2.3 ms a step at 32
        sequences (2026-12-01), 2.5 % of the step, while the batch did not
        speculate at all. (Keyed on the exact batch size, every sequence was
        priced again whenever a stream ended or began, most steps of a served
        load: 1.25 ms a step at 31-32 sequences against 0.17 ms keyed on the
        bucket, ``benchmarks/speculator_step.py``.)"""
        c, s = spec.control, self.settings
        key = (c.rounds, bucket(self._batch), spec.method)
        if spec.reviewed == key:
            return Action.KEEP, ""
        can_fall_back = spec.fallback is not None
        alpha = self._alpha(spec)
        current = fallback = None
        if can_fall_back and c.rounds and self.uses_cost_model and self._batch:  # only a fallback reads them
            current = self._prospect(alpha, spec.method, c.hi)
            fallback = self._prospect(self.pools[NGRAM].alpha(0.5), NGRAM, c.hi)
        action, reason = review(MethodRecord(c.rounds, alpha, c.ema), max(0, self._batch - 1),
                                s.min_acceptance, s.min_rounds, can_fall_back, current, fallback)
        spec.reviewed = key if action is Action.KEEP else None
        return action, reason

    def _prospect(self, alpha: float, method: str, gamma_max: int) -> Prospect | None:
        """A sequence's prospect at ``alpha`` with ``method`` at the last step's
        batch size (None: no step measured there yet)."""
        periods = self.costs.periods(self._batch, gamma_max, method)
        if periods is None:
            return None
        return Prospect(alpha, periods, *self.costs.readiness(self._batch, gamma_max, method))

    def _fall_back(self, spec: SpecState, cause: Fallback, reason: str) -> None:
        """The draft model does not serve ``spec`` (``reason``): it proposes by
        n-gram lookup from its next round on, or, when its request cannot fall
        back (or did already), stops speculating."""
        if spec.fallback is None:
            spec.disable(reason)
            return
        self._fallback_log.note(cause.value, reason, self._now)
        spec.switch(spec.fallback(), cause.value, reason)
