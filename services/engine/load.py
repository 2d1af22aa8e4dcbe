"""What the engine thread publishes for the others: an immutable EngineLoad after each step.

The engine thread owns the windowed metrics and the scheduler; other threads
(the event loop's load reports, admission's retry hint) read only the last
:class:`EngineLoad` published, an object never changed once it is out.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.metrics import MetricsSnapshot, WindowedMetrics
from services.engine.block_manager import BlockManager


@dataclass(frozen=True)
class EngineLoad:
    """The engine's state after one step, for load reports (counts of
    sequences and tokens). Never changed once published: any thread may read it."""

    queue_length: int
    running: int
    paused: int
    max_batch_size: int
    kv_used_tokens: int
    kv_capacity_tokens: int
    metrics: MetricsSnapshot
    #: Fraction of the paged cache's blocks some sequence holds.
    kv_usage: float = 0.0
    #: Prefix cache since start: prompt tokens looked up, and of them found cached.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    #: Sequences preempted since start (their blocks taken back; recomputed later).
    preemptions: int = 0


class LoadPublisher:
    """Builds the engine's EngineLoad snapshots (engine thread) and holds the
    latest (:attr:`latest`, any thread).

    Counts are published after every step. The windowed metrics, whose
    summary walks the whole window, are recomputed every ``interval_s``
    seconds and once as soon as the engine is idle after work, so a report
    read right after a request finished includes it. Times are seconds of the
    engine's clock.
    """

    def __init__(self, metrics: WindowedMetrics, interval_s: float, now: float, kv_capacity_tokens: int) -> None:
        self.metrics = metrics
        self.interval_s = interval_s
        self._kv_capacity = kv_capacity_tokens
        self._metrics_at = self.last_step_at = -float("inf")
        self.latest = EngineLoad(0, 0, 0, 0, 0, kv_capacity_tokens, metrics.snapshot(now))  # until the first publish

    def publish(self, now: float, stepped: bool, idle: bool, queue_length: int, running: int, paused: int,
                max_batch_size: int, kv_used_tokens: int, kv: BlockManager) -> None:
        """Swaps in a new EngineLoad (engine thread). ``stepped``: a step ran
        rows just now; ``idle``: nothing waits, runs or is paused; ``kv``: the
        block manager whose usage and counters are reported."""
        if stepped:
            self.last_step_at = now
            idle = False
        metrics = self.latest.metrics
        if now - self._metrics_at >= self.interval_s or (idle and self.last_step_at > self._metrics_at):
            metrics, self._metrics_at = self.metrics.snapshot(now), now
        self.latest = EngineLoad(queue_length, running, paused, max_batch_size, kv_used_tokens, self._kv_capacity,
                                 metrics, kv.usage, kv.stats.queries, kv.stats.hits, kv.stats.preemptions)

    def refresh_at(self, now: float) -> float | None:
        """When an idle engine should wake to republish (its windowed rates decay
        with time), or None once the window holds no step."""
        return now + self.interval_s if now - self.last_step_at < self.metrics.window_s else None
