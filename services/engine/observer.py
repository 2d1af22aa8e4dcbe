"""The engine's per-request observations, for exporters that need every sample (histograms).

The windowed metrics (:mod:`services.common.metrics`) summarise a sliding
window for load reports; Prometheus histograms and counters need each
observation instead. The engine thread calls an :class:`EngineObserver` at
named points; the base class ignores them (an engine with no exporter), and
:class:`services.serving.prometheus_metrics.ServingMetrics` exports them under
vLLM's metric names. Observers run on the engine thread, so they must be
quick and must not block (prometheus-client's counters take a lock for
nanoseconds).
"""

from __future__ import annotations

from typing import Any


class EngineObserver:
    """Hooks the engine thread calls; times are seconds of the engine's clock."""

    def tokens(self, generated: int) -> None:
        """One step generated ``generated`` tokens over all its sequences."""

    def inter_token(self, seconds: float) -> None:
        """A sequence got new tokens ``seconds`` after its previous ones (one
        observation per step and sequence, as vLLM v1 counts inter-token
        latency: the tokens of one verified speculation round arrive together)."""

    def speculation_round(self, proposed: int, accepted: int) -> None:
        """One verified draft (a speculation round): ``proposed`` draft tokens,
        the first ``accepted`` of them kept (acceptance is a prefix)."""

    def first_token(self, ttft_s: float) -> None:
        """A request's first token came ``ttft_s`` after it arrived (observed as
        it comes, not when the request ends, as vLLM's histogram is)."""

    def finished(self, *, tpot_s: float | None, e2e_s: float, queue_s: float,
                 prompt_tokens: int, generation_tokens: int, reason: str, speculation: Any = None) -> None:
        """A request ended: its mean time per output token (None when it had
        fewer than two; its first token went to :meth:`first_token`), arrival to end, arrival to
        admission, its prompt and generated token counts, why it ended
        (a :class:`services.engine.sequence.FinishReason` value) and its
        speculation statistics (the strategy's own type, None when it did
        not speculate)."""
