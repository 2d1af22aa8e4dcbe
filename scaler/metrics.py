"""The scaler's Prometheus gauges: instances per pool as the scaler counts them.

The loop publishes the pools' views (an immutable list swapped in whole, on
the event loop); the exporter's HTTP thread reads the last one. Names carry
the ``llmesh:`` prefix of the model services' vLLM-style metrics; vLLM has no
scaler, so these are llmesh's own (``pool`` and ``role`` labels).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from scaler.state import PoolView

LABELS = ["pool", "role"]


class ScalerMetrics(Collector):
    """``llmesh:scaler_instances`` (serving, neither starting nor draining),
    ``llmesh:scaler_desired_instances``, ``llmesh:scaler_starting_instances`` and
    ``llmesh:scaler_draining_instances`` per pool and role, on :attr:`registry`."""

    def __init__(self) -> None:
        self._views: tuple[PoolView, ...] = ()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def publish(self, views: list[PoolView]) -> None:
        """The pools as they are now (event loop)."""
        self._views = tuple(views)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        views = self._views
        for name, doc, get in (
                ("scaler_instances", "Instances taking traffic (neither starting nor draining).",
                 lambda v: v.current),
                ("scaler_desired_instances", "Instances the scaler wants (policy decision or manual count).",
                 lambda v: v.desired),
                ("scaler_starting_instances", "Instances started, not yet SERVING and registered.",
                 lambda v: v.starting),
                ("scaler_draining_instances", "Instances draining before they stop.", lambda v: v.draining)):
            family = GaugeMetricFamily(f"llmesh:{name}", doc, labels=LABELS)
            for v in views:
                family.add_metric([v.pool, v.role.value], float(get(v)))
            yield family
