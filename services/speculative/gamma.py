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
    #: costs follow the machine (a neighbour's load, a warmer cache).
    explore_s: float = 10.0
    #: A sequence whose acceptance (moving average) falls below this after
    #: ``min_rounds`` rounds stops speculating.
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

    def worth_it(self, settings: SpeculationSettings) -> bool:
        """Whether to go on speculating: always for the first ``min_rounds``
        rounds, then while the acceptance moving average (``ema``) stays at or
        above ``min_acceptance``."""
        return self.rounds < settings.min_rounds or self.ema >= settings.min_acceptance
