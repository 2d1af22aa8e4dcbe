"""A sequence's speculation state on the target, and what a proposer is.

All of it is owned by the engine thread: the engine (through the
scheduler and :class:`services.speculative.speculator.Speculator`) is the
only caller of :class:`SpecState`'s methods. A proposer answers on its own
thread; its answer reaches the engine thread through the engine's ``post``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from services.engine.speculation import Post
from services.speculative.gamma import GammaController
from services.speculative.sync import DraftSync, Round


@dataclass
class Proposal:
    """A proposer's answer: ``tokens`` (a sampled request's drawn with the
    request's seed, see :mod:`services.speculative.rejection_sampler`) and the
    milliseconds the draft spent computing them."""

    tokens: list[int]
    compute_ms: float = 0.0


#: ``on_result(proposal, None)`` or ``on_result(None, error)``, called once per
#: round from the proposer's own thread.
ProposalCallback = Callable[["Proposal | None", "BaseException | None"], None]


class Proposer(Protocol):
    """Proposes draft tokens for one sequence (vLLM's proposer). Non-blocking:
    :meth:`propose` returns at once and the proposal comes back through
    ``on_result`` from whatever thread the proposer uses. Rounds are answered
    in order. Called from the engine thread."""

    def propose(self, round_: Round, on_result: ProposalCallback) -> None:
        """Sends ``round_`` (see :mod:`services.speculative.sync`) and asks for
        ``round_.gamma`` tokens."""

    def close(self) -> None:
        """No more rounds: end the conversation and free the draft's cache."""

    # Optional: ``max_context``, the most tokens (context + proposal) the
    # proposer's model holds, None while unknown; the target stops asking for
    # rounds before the draft's context ends (see SpecState.draft_context);
    # ``kind``, "draft_model" (the default) or "ngram": how it proposes.


@dataclass
class SpecStats:
    """Speculation counts of one request (tokens, rounds; times in ms). Token
    counts are of emitted tokens only (``services.engine.speculation.RoundCounts``):
    proposals for positions past the sequence's end never count."""

    rounds: int = 0
    proposed: int = 0
    accepted: int = 0
    #: Tokens the verified rounds emitted (accepted ones and the target's own).
    emitted: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    disabled_reason: str = ""
    draft_wait_ms: float = 0.0
    draft_compute_ms: float = 0.0
    verify_ms: float = 0.0
    draft_timeouts: int = 0
    #: Rounds dropped unverified because the batch stopped speculating while
    #: they were under way (the cost model chose gamma 0, or the batch grew
    #: past a static ``disable_by_batch_size``).
    dropped_by_batch_size: int = 0
    #: Decode steps in which its batch did not speculate while it could (the cost
    #: model chose gamma 0, or the batch was past a static ``disable_by_batch_size``),
    #: and why, in words, as of the last such step.
    steps_not_speculated: int = 0
    not_speculated_reason: str = ""
    #: The method the request proposed with last: "draft_model" or "ngram".
    method: str = "draft_model"
    #: Why it switched from the draft model to n-gram lookup ("" if it did not):
    #: a :class:`services.speculative.fallback.Fallback` value, and in words.
    fallback: str = ""
    fallback_reason: str = ""

    def record(self, accepted: int, proposed: int, emitted: int | None = None) -> None:
        """One verified round: ``accepted`` of ``proposed`` tokens kept, and
        ``emitted`` tokens added (default ``accepted + 1``: the target's own too)."""
        self.rounds += 1
        self.proposed += proposed
        self.accepted += accepted
        self.emitted += accepted + 1 if emitted is None else emitted
        if len(self.accepted_per_position) < proposed:
            self.accepted_per_position += [0] * (proposed - len(self.accepted_per_position))
        for i in range(accepted):
            self.accepted_per_position[i] += 1

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verified round (accepted + the target's own); 0 before any."""
        return self.emitted / self.rounds if self.rounds else 0.0


@dataclass
class SpecState:
    """One speculating sequence on the target: its proposer, the round under
    way, what the draft holds (``sync``) and its adaptive gamma. Implements
    ``services.engine.speculation.SequenceSpeculation``. Times are seconds of
    the engine's clock."""

    proposer: Proposer
    control: GammaController
    #: Delivers proposals to the engine thread (the engine's ``post``).
    post: Post | None = None
    sync: DraftSync = field(default_factory=DraftSync)
    round_id: int = 0
    #: A round is under way: asked, not answered yet.
    waiting: bool = False
    requested_at: float = 0.0
    #: Until when the sequence waits for this round's proposal (then decodes without).
    deadline: float = 0.0
    #: Until when the whole batch may wait for this round's proposal (see the scheduler).
    hold_until: float = 0.0
    #: An answered proposal not yet scored.
    proposal: list[int] | None = None
    active: bool = True
    #: Rounds given up at their deadline since the draft last answered one in time.
    timeouts_in_a_row: int = 0
    stats: SpecStats = field(default_factory=SpecStats)
    #: Makes the proposer this sequence falls back to (None: it cannot, or did).
    fallback: Callable[[], Proposer] | None = None
    #: (verified rounds, batch-size bucket, method) at the last review that kept the method: the review
    #: would say the same again until one of them changes (costs are kept per bucket; the Speculator's,
    #: engine thread only).
    reviewed: tuple[int, int, str] | None = None

    @property
    def method(self) -> str:
        """How the sequence proposes now: "draft_model" or "ngram"."""
        return self.stats.method

    @property
    def draft_context(self) -> int | None:
        """The proposer's ``max_context`` (tokens), None when it does not say (yet)."""
        return getattr(self.proposer, "max_context", None)

    # -- what the scheduler asks ----------------------------------------------
    def hold(self, now: float) -> float | None:
        """Until when the batch may wait for this round's proposal, or None."""
        return self.hold_until if self.waiting and now < self.hold_until else None

    def awaits(self, now: float) -> float | None:
        """The round's deadline while it is under way and not due, else None;
        a round past its deadline is given up (counted in ``draft_timeouts``)."""
        if not self.waiting:
            return None
        if now < self.deadline:
            return self.deadline
        self.waiting = False  # too late: decode without it (kept stays 0: the draft discards it)
        self.stats.draft_timeouts += 1
        self.timeouts_in_a_row += 1
        return None

    def take_proposal(self) -> list[int]:
        """The answered proposal, once; ``[]`` when there is none."""
        tokens = self.proposal or []
        self.proposal = None
        return tokens

    # -- transitions ----------------------------------------------------------------
    def drop_round(self, reason: str = "") -> bool:
        """The batch does not speculate in this step (``reason``, in words, is
        kept in the stats for an active sequence): abandons the round under way
        (waiting, or holding a proposal not yet verified); the draft discards
        its tokens at the next round, since ``sync.kept`` stays 0. Returns
        whether there was one."""
        if self.active and reason:
            self.stats.steps_not_speculated += 1
            self.stats.not_speculated_reason = reason
        if not (self.waiting or self.proposal):
            return False
        self.waiting = False
        self.take_proposal()
        self.stats.dropped_by_batch_size += 1
        return True

    def preempted(self) -> None:
        """The sequence was preempted and will recompute its tokens: the round
        under way (waiting, or holding a proposal not yet verified) is
        abandoned, as at a timeout but not counted as one (the draft did
        nothing wrong). A late answer is ignored (``waiting`` is off, and a
        later round has a new id); the draft discards its tokens at the next
        round, since ``sync.kept`` stays 0."""
        self.waiting = False
        self.proposal = None

    def switch(self, proposer: Proposer, cause: str, reason: str) -> None:
        """The sequence proposes with ``proposer`` (its fallback) from its next
        round on: the old proposer is closed (the draft frees its cache), the
        round under way abandoned (a late answer to it is ignored: the round
        id moves on), the sync starts over (the first round carries the whole
        sequence) and the acceptance estimate too (it is the new method's)."""
        self.proposer.close()
        self.proposer, self.fallback = proposer, None
        self.sync = DraftSync()
        self.round_id += 1
        self.waiting = False
        self.proposal = None
        self.timeouts_in_a_row = 0
        self.control = self.control.restart()
        self.stats.method = getattr(proposer, "kind", "draft_model")
        self.stats.fallback, self.stats.fallback_reason = cause, reason

    def disable(self, reason: str) -> None:
        """Speculation ends for this sequence (it decodes on alone)."""
        if self.active:
            self.active = False
            self.waiting = False
            self.proposal = None
            self.stats.disabled_reason = reason
            self.proposer.close()

    def close(self) -> None:
        """The sequence finished: closes the proposer, keeps any disabled reason."""
        self.disable(self.stats.disabled_reason)


@dataclass
class SpeculationRequest:
    """What a caller asks: speculate with ``proposer``, starting at ``gamma``
    (adapting within [gamma_min, gamma_max] unless ``fixed``). ``fallback``
    makes the proposer to fall back to (:mod:`services.speculative.fallback`);
    with no ``proposer`` (no draft for this request) the sequence starts with it."""

    proposer: Proposer | None
    gamma: int = 4
    gamma_min: int = 1
    gamma_max: int = 8
    fixed: bool = False
    fallback: Callable[[], Proposer] | None = None
