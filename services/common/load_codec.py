"""``llmesh.v1.LoadReport`` ⇄ :class:`services.common.load.LoadReport` (no I/O).

The conversion walks the dataclass's fields by name, so it cannot forget one;
``tests/test_load_report.py`` checks that those names are the message's.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

from services.common.load import Latency, LoadReport, Role, UtilizationSource
from services.common.stubs import stats_pb2

R = TypeVar("R", bound=LoadReport)

#: Each Role as its protobuf enum value (ROLE_<NAME>).
ROLE_PB = {r: stats_pb2.Role.Value(f"ROLE_{r.name}") for r in Role}
ROLE_OF_PB = {v: k for k, v in ROLE_PB.items()}
#: Each UtilizationSource as its protobuf enum value (UTILIZATION_SOURCE_<NAME>).
SOURCE_PB = {s: stats_pb2.UtilizationSource.Value(f"UTILIZATION_SOURCE_{s.name}") for s in UtilizationSource}
SOURCE_OF_PB = {v: k for k, v in SOURCE_PB.items()}

_FIELDS = tuple(f.name for f in dataclasses.fields(LoadReport))
_LATENCIES = frozenset(f.name for f in dataclasses.fields(LoadReport) if f.type == "Latency")


def role_of(value: int) -> Role:
    """A protobuf Role value as a Role; an unknown value is UNSPECIFIED."""
    return ROLE_OF_PB.get(value, Role.UNSPECIFIED)


def latency_of(pb: stats_pb2.LatencySummary) -> Latency:
    """Milliseconds in, milliseconds out."""
    return Latency(pb.p50_ms, pb.p95_ms, pb.p99_ms, pb.mean_ms, pb.count)


def latency_pb(s: Latency) -> stats_pb2.LatencySummary:
    """Milliseconds in, milliseconds out."""
    return stats_pb2.LatencySummary(p50_ms=s.p50_ms, p95_ms=s.p95_ms, p99_ms=s.p99_ms, mean_ms=s.mean_ms,
                                    count=s.count)


def report_of(pb: stats_pb2.LoadReport, cls: type[R] = LoadReport, **extra) -> R:
    """Every field of ``pb`` as a ``cls`` (LoadReport or a subclass whose own fields come in ``extra``).
    Unknown enum values become UNSPECIFIED; an ``extra`` name that is a report field overrides it."""
    values = {}
    for name in _FIELDS:
        value = getattr(pb, name)
        if name in _LATENCIES:
            value = latency_of(value)
        elif name == "role":
            value = role_of(value)
        elif name == "utilization_source":
            value = SOURCE_OF_PB.get(value, UtilizationSource.UNSPECIFIED)
        values[name] = value
    return cls(**{**values, **extra})


def report_pb(r: LoadReport) -> stats_pb2.LoadReport:
    """Every field of ``r`` (a subclass's own fields are left out) as the protobuf message."""
    values = {}
    for name in _FIELDS:
        value = getattr(r, name)
        if name in _LATENCIES:
            if value == Latency():
                continue  # left unset, as a sender that measured nothing leaves it
            value = latency_pb(value)
        elif name == "role":
            value = ROLE_PB[value]
        elif name == "utilization_source":
            value = SOURCE_PB[value]
        values[name] = value
    return stats_pb2.LoadReport(**values)
