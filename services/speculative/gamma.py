"""Speculation knobs and per-sequence control: adaptive gamma and switching itself off.

By default gamma is the cost model's (:mod:`services.speculative.cost_model`),
for the whole batch at each step; with a static ``disable_by_batch_size``, gamma adapts by a simple rule in the spirit of transformers' assisted
generation (``AssistedCandidateGenerator.update_candidate_strategy``: +1 when
every proposal was accepted, fewer when most were rejected). Pure Python;
engine thread only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.speculative.cost_model import Acceptance


@dataclass
class SpeculationSettings:
    """Engine-wide speculation knobs (times in milliseconds)."""

    #: Longest wait for a draft round before the sequence decodes without it.
    draft_timeout_ms: float = 500.0
    #: Longest the whole batch waits for outstanding proposals, so that they are
    #: verified in the same forward as everything else (0: never wait).
    draft_hold_ms: float = 50.0
    #: 0 (the default): gamma, and whether to speculate at all, is chosen at
    #: every step by the measured cost model (:mod:`services.speculative.cost_model`).
    #: Above 0, a static override: no speculation while more sequences than this
    #: are running or waiting (vLLM's ``disable_by_batch_size``), and gamma
    #: adapts per sequence (:class:`GammaController`).
    disable_by_batch_size: int = 0
    #: With the cost model: a batch-size bucket where it chose not to speculate
    #: tries one round again after this many seconds, so that its measured
    #: costs follow the machine (a neighbour's load, a warmer cache); each
    #: round that finds it still does not pay there doubles the wait, up to
    #: ``speculator.MAX_EXPLORE_BACKOFF`` times this.
    explore_s: float = 10.0
    #: A sequence whose acceptance (moving average) falls below this after
    #: ``min_rounds`` rounds falls back to n-gram lookup, or stops speculating
    #: (:func:`services.speculative.fallback.review`).
    min_acceptance: float = 0.25
    min_rounds: int = 4


@dataclass
class GammaController:
    """Gamma for the next round from the last ones (more when all were
    accepted, fewer when few were), within ``[lo, hi]``. ``fixed`` pins it."""

    gamma: int
    lo: int
    hi: int
    fixed: bool = False
    ema: float = 1.0
    rounds: int = 0
    #: The per-token acceptance estimate the cost model reads.
    acceptance: Acceptance = field(default_factory=Acceptance)
    _alpha: float = field(default=0.3, repr=False)
    #: The gamma it started with.
    start: int = field(init=False)

    def __post_init__(self) -> None:
        self.start = self.gamma

    def restart(self) -> "GammaController":
        """A fresh controller (gamma back at its start, no rounds, no acceptance
        measured) with the same bounds: for a new proposal method."""
        return GammaController(self.start, self.lo, self.hi, self.fixed)

    def update(self, accepted: int, proposed: int) -> None:
        """One verified round: ``accepted`` of ``proposed`` tokens kept."""
        self.rounds += 1
        self.acceptance.update(accepted, proposed)
        rate = accepted / proposed if proposed else 0.0
        self.ema = (1 - self._alpha) * self.ema + self._alpha * rate
        if self.fixed:
            return
        if accepted == proposed:
            self.gamma = min(self.hi, self.gamma + 1)
        elif accepted < proposed / 2:
            self.gamma = max(self.lo, self.gamma - 1)
