"""A sequence's speculation state, owned by the engine thread (pure data)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.speculative.gamma import GammaController



@dataclass
class Proposal:
    """A drafter's answer: tokens, their distributions q (``[gamma, vocab]``, for
    sampled speculation) and the milliseconds it spent computing them."""

    tokens: list[int]
    q: Any = None
    compute_ms: float = 0.0


#: on_result(round_id, proposal or None, error or None)
ProposalCallback = Callable[[int, "Proposal | None", "BaseException | None"], None]


class DraftLink(Protocol):
    """A conversation with a drafter about one sequence. Non-blocking: the
    result comes back through ``on_result`` from whatever thread the link uses."""

    def propose(self, round_id: int, discard: int, append: list[int], gamma: int,
                on_result: ProposalCallback) -> None: ...

    def close(self) -> None: ...


@dataclass
class SpecStats:
    rounds: int = 0
    proposed: int = 0
    accepted: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    disabled_reason: str = ""
    draft_wait_ms: float = 0.0
    draft_compute_ms: float = 0.0
    verify_ms: float = 0.0
    draft_timeouts: int = 0
    #: Rounds dropped unverified because the batch grew past the break-even.
    stood_down: int = 0

    def record(self, accepted: int, proposed: int) -> None:
        self.rounds += 1
        self.proposed += proposed
        self.accepted += accepted
        if len(self.accepted_per_position) < proposed:
            self.accepted_per_position += [0] * (proposed - len(self.accepted_per_position))
        for i in range(accepted):
            self.accepted_per_position[i] += 1

    @property
    def mean_accepted_length(self) -> float:
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0


@dataclass
class SpecState:
    """What the draft holds: ``tokens[:synced]`` plus its last proposal of
    ``proposal_len`` tokens, of which ``kept`` were accepted."""

    link: DraftLink
    control: GammaController
    round_id: int = 0
    waiting: bool = False
    requested_at: float = 0.0
    deadline: float = 0.0
    #: Until when the whole batch may wait for this round's proposal (see the scheduler).
    hold_until: float = 0.0
    proposal: list[int] | None = None
    q: Any = None
    synced: int = 0
    proposal_len: int = 0
    kept: int = 0
    active: bool = True
    stats: SpecStats = field(default_factory=SpecStats)

    def disable(self, reason: str) -> None:
        if self.active:
            self.active = False
            self.waiting = False
            self.proposal = None
            self.stats.disabled_reason = reason
            self.link.close()

    def stand_down(self) -> bool:
        """Abandons the round under way (waiting, or holding a proposal not yet
        verified); the draft discards its tokens at the next round, since ``kept``
        stays 0. Returns whether there was one."""
        if not (self.waiting or self.proposal):
            return False
        self.waiting = False
        self.take_proposal()
        self.stats.stood_down += 1
        return True

    def take_proposal(self) -> tuple[list[int], Any]:
        tokens, q = self.proposal or [], self.q
        self.proposal, self.q = None, None
        return tokens, q


@dataclass
class SpeculationRequest:
    """What a caller asks: speculate through ``link``, starting at ``gamma``
    (adapting within [gamma_min, gamma_max] unless ``fixed``)."""

    link: DraftLink
    gamma: int = 4
    gamma_min: int = 1
    gamma_max: int = 8
    fixed: bool = False

    def state(self) -> SpecState:
        return SpecState(self.link, GammaController(self.gamma, self.gamma_min, self.gamma_max, self.fixed))
