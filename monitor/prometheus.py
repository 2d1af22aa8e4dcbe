"""Prometheus exposition of the fleet, computed from the store at each scrape.

A custom collector on the exporter's own registry (never the process-global
one) turns a store snapshot into metric families, so an instance that leaves
the fleet leaves the exposition too. Names are prefixed ``llmesh_``; every
instance series carries ``instance``, ``pool`` and ``role`` labels. Because
Prometheus sets its own ``instance`` label (the scrape target), scrape the
monitor with ``honor_labels: true``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from monitor.analysis import Alert
from monitor.metrics import Scope, Throughput, throughput
from monitor.store import COUNTERS, Snapshot
from services.common.exposition import MetricsEndpoint

LABELS = ["instance", "pool", "role"]
_GAUGES: list[tuple[str, str, Callable[[Throughput], float]]] = [
    ("requests_per_second", "Finished requests per second over the window.", lambda m: m.requests_per_second),
    ("tokens_per_second", "Generated tokens per second over the window.", lambda m: m.tokens_per_second),
    ("in_flight", "Requests in flight (queued + running).", lambda m: m.in_flight),
    ("queue_length", "Requests waiting to be admitted.", lambda m: m.queue_length),
    ("running", "Sequences in the running batch.", lambda m: m.running),
    ("batch_fill", "Mean batch size / max batch size over the window.", lambda m: m.batch_fill),
    ("accelerator_utilization", "Accelerator utilisation in [0, 1] over the window.",
     lambda m: m.accelerator_utilization),
    ("kv_cache_usage", "Fraction of the paged KV cache's blocks in use.", lambda m: m.kv_cache_usage),
    ("saturation", "Fraction of the window's reports in which the instance was saturated.",
     lambda m: m.saturation),
    ("acceptance_rate", "Accepted / proposed draft tokens over the window.", lambda m: m.acceptance_rate),
    ("error_rate", "Errors / finished requests over the window.", lambda m: m.error_rate),
]
_LATENCIES = [("ttft", "Time to first token"), ("tpot", "Time per output token after the first"),
              ("e2e", "Arrival to last token"), ("queue_time", "Arrival to admission")]


class PrometheusCollector(Collector):
    """Metric families of every instance in the store, computed at each scrape
    (on the exporter's HTTP thread, from an immutable store snapshot)."""

    def __init__(self, snapshot: Callable[[], Snapshot], window_s: float, clock: Callable[[], float],
                 firing: Callable[[], list[Alert]] = list) -> None:
        self._snapshot = snapshot
        self._window_s = window_s
        self._clock = clock
        self._firing = firing

    def collect(self) -> Iterator:
        snap = self._snapshot()
        result = throughput(snap, self._window_s, Scope(), self._clock())

        def labels(key: str) -> list[str]:
            info = snap.instances[key]
            return [key, info.pool, info.role.value]

        up = GaugeMetricFamily("llmesh_up", f"1 when the instance reported in the last {self._window_s:g} s.",
                               labels=LABELS)
        for key in sorted(snap.instances):
            up.add_metric(labels(key), 1.0 if key in result.per_instance else 0.0)
        yield up
        for name, doc, get in _GAUGES:
            family = GaugeMetricFamily(f"llmesh_{name}", doc, labels=LABELS)
            for key, m in sorted(result.per_instance.items()):
                family.add_metric(labels(key), float(get(m)))
            yield family
        for name, doc in _LATENCIES:
            family = GaugeMetricFamily(f"llmesh_{name}_seconds", f"{doc}, as the instance's percentiles over "
                                       "the window (NaN when no request finished in it; keep `x == x` before avg or sum).",
                                       labels=[*LABELS, "quantile"])
            for key, m in sorted(result.per_instance.items()):
                s = getattr(m, name)
                for q, value in (("0.5", s.p50_ms), ("0.95", s.p95_ms), ("0.99", s.p99_ms)):
                    # No request in the window: no percentile (NaN, as a Prometheus summary
                    # says it), not 0 s, which reads as instant and drags averages down.
                    family.add_metric([*labels(key), q], value / 1000.0 if s.count else math.nan)
            yield family
        for counter in COUNTERS:
            family = CounterMetricFamily(f"llmesh_{counter}", f"Cumulative {counter.removesuffix('_total')} "
                                         "since the instance started.", labels=LABELS)
            for key in sorted(result.per_instance):
                family.add_metric(labels(key), float(getattr(snap.reports[key][-1], counter)))
            yield family
        alerts = GaugeMetricFamily("llmesh_alert_firing", "1 for each firing alert.",
                                   labels=["rule", "subject", "severity"])
        for a in self._firing():
            alerts.add_metric([a.rule, a.subject, a.severity.name.lower()], 1.0)
        yield alerts


class PrometheusExporter(MetricsEndpoint):
    """Serves the fleet's ``/metrics`` (``collector`` on a registry of its own)."""

    def __init__(self, collector: Collector) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        super().__init__(registry)
