"""A service's load report (``llmesh.v1.LoadReport``) as one plain Python type.

Every reader (the router's routing, the monitor's store) and every writer
(the model services' and the router's own reports) uses :class:`LoadReport`
(its latencies are the windowed metrics' :class:`~services.common.metrics.Latency`);
:mod:`services.common.load_codec` converts it to and from the protobuf
message field by field through its names, and ``tests/test_load_report.py``
checks the names, kinds and enum values against the message's descriptor, so
a field added to ``stats.proto`` and not here fails a test. Pure: no gRPC,
no stubs, no clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from services.common.metrics import Latency, MetricsSnapshot

__all__ = ["DEFAULT_POOL", "Latency", "LoadReport", "Role", "UtilizationSource", "windowed"]

#: The pool of an instance registered without one (router and scaler).
DEFAULT_POOL = "default"


class Role(enum.Enum):
    """What kind of service an instance is (llmesh.v1.Role)."""

    UNSPECIFIED = "unspecified"
    TARGET = "target"
    DRAFT = "draft"
    ROUTER = "router"
    MONITOR = "monitor"
    SCALER = "scaler"


class UtilizationSource(enum.Enum):
    """Where ``accelerator_utilization`` comes from (llmesh.v1.UtilizationSource)."""

    UNSPECIFIED = "unspecified"
    ENGINE_BUSY = "engine_busy"
    NVML = "nvml"


@dataclass(frozen=True, slots=True)
class LoadReport:
    """A service's load at one moment; the fields of llmesh.v1.LoadReport, same names, same meaning.

    ``timestamp`` is the sender's wall clock (seconds since the epoch). Rates
    and latencies cover the last ``window_s`` seconds; ``*_total`` counters
    are cumulative since the sender started.
    """

    instance_id: str = ""
    role: Role = Role.UNSPECIFIED
    timestamp: float = 0.0
    window_s: float = 0.0
    queue_length: int = 0
    running: int = 0
    in_flight: int = 0
    max_batch_size: int = 0
    mean_batch_size: float = 0.0
    #: mean_batch_size / max_batch_size over the window.
    batch_fill: float = 0.0
    token_efficiency: float = 0.0
    accelerator_utilization: float = 0.0
    utilization_source: UtilizationSource = UtilizationSource.UNSPECIFIED
    kv_cache_used_tokens: int = 0
    kv_cache_capacity_tokens: int = 0
    kv_cache_usage: float = 0.0
    ttft: Latency = Latency()
    tpot: Latency = Latency()
    e2e: Latency = Latency()
    queue_time: Latency = Latency()
    tokens_per_second: float = 0.0
    requests_per_second: float = 0.0
    acceptance_rate: float = 0.0
    mean_accepted_length: float = 0.0
    requests_total: int = 0
    tokens_generated_total: int = 0
    errors_total: int = 0
    rejected_total: int = 0
    proposed_tokens_total: int = 0
    accepted_tokens_total: int = 0
    speculation_rounds_total: int = 0
    steps_total: int = 0
    prefix_cache_queries_total: int = 0
    prefix_cache_hits_total: int = 0
    preemptions_total: int = 0


def windowed(m: MetricsSnapshot, **fields) -> LoadReport:
    """A report of what ``m`` measured over its window (rates, latencies, speculation,
    counters), with ``fields`` (identity, gauges, overrides) on top.

    Raises TypeError for a name that is not a LoadReport field."""
    return LoadReport(**{
        "window_s": m.window_s, "mean_batch_size": m.mean_batch_size, "token_efficiency": m.token_efficiency,
        "ttft": m.ttft_ms, "tpot": m.tpot_ms, "e2e": m.e2e_ms, "queue_time": m.queue_ms, "tokens_per_second": m.tokens_per_second,
        "requests_per_second": m.requests_per_second, "acceptance_rate": m.acceptance_rate,
        "mean_accepted_length": m.mean_accepted_length, **m.counters, **fields})
