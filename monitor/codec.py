"""The monitor's protobuf ⇄ domain translations (no I/O)."""

from __future__ import annotations

from monitor.analysis import Alert, Recommendation, Severity
from monitor.metrics import Scope, Throughput, ThroughputResult
from monitor.store import InstanceInfo, Report
from services.common import load_codec
from services.common.load_codec import SOURCE_PB, latency_pb, role_of
from services.common.errors import InvalidArgument
from services.common.validation import check_printable
from services.common.stubs import monitor_pb2, router_pb2, stats_pb2


def report_of(pb: stats_pb2.LoadReport, received_at: float) -> Report:
    """A report as the monitor keeps it; ``received_at`` is the monitor's ``time.time()``.
    A sender without a clock reading is placed at its arrival."""
    return load_codec.report_of(pb, Report, timestamp=pb.timestamp or received_at, received_at=received_at)


STATES = {router_pb2.INSTANCE_STATE_ACTIVE: "active", router_pb2.INSTANCE_STATE_DRAINING: "draining",
          router_pb2.INSTANCE_STATE_EJECTED: "ejected"}


def instance_of(pb: router_pb2.InstanceStatus) -> InstanceInfo:
    spec = pb.spec
    serving = pb.health == router_pb2.INSTANCE_HEALTH_SERVING
    return InstanceInfo(
        key=spec.id or spec.address, address=spec.address, role=role_of(spec.role),
        pool=spec.pool or "default", healthy=serving and pb.state == router_pb2.INSTANCE_STATE_ACTIVE,
        state=STATES.get(pb.state, "unspecified"), serving=serving, consecutive_failures=pb.consecutive_failures,
    )


#: Longest instance id or pool name in a scope.
MAX_NAME_CHARS = 256


def scope_of(pb: monitor_pb2.Scope) -> Scope:
    """The scope a request names; InvalidArgument for an empty or overlong name."""
    which = pb.WhichOneof("target")
    if which is not None and len(getattr(pb, which)) > MAX_NAME_CHARS:
        raise InvalidArgument(f"scope.{which}", f"must be at most {MAX_NAME_CHARS} characters")
    if which is not None:
        check_printable(f"scope.{which}", getattr(pb, which))
    if which == "instance_id":
        if not pb.instance_id:
            raise InvalidArgument("scope.instance_id", "must not be empty when set")
        return Scope(instance_id=pb.instance_id)
    if which == "pool":
        if not pb.pool:
            raise InvalidArgument("scope.pool", "must not be empty when set")
        return Scope(pool=pb.pool)
    return Scope()


#: The fields of llmesh.v1.ThroughputMetrics, all named as in :class:`Throughput` (a test checks it).
THROUGHPUT_FIELDS = tuple(f.name for f in monitor_pb2.ThroughputMetrics.DESCRIPTOR.fields)


def throughput_pb(m: Throughput) -> monitor_pb2.ThroughputMetrics:
    """Every wire field of ``m`` (the figures only the analysis reads stay behind)."""
    values = {name: getattr(m, name) for name in THROUGHPUT_FIELDS}
    values["utilization_source"] = SOURCE_PB[m.utilization_source]
    for name in ("ttft", "tpot", "e2e", "queue_time"):
        values[name] = latency_pb(values[name])
    return monitor_pb2.ThroughputMetrics(**values)


def throughput_response(result: ThroughputResult, scope: Scope,
                        windows: list[Throughput] = ()) -> monitor_pb2.GetThroughputResponse:
    reply = monitor_pb2.GetThroughputResponse(metrics=throughput_pb(result.metrics),
                                              windows=[throughput_pb(w) for w in windows])
    if not scope.instance_id:
        for key, m in result.per_instance.items():
            reply.per_instance[key].CopyFrom(throughput_pb(m))
    return reply


def recommendation_pb(r: Recommendation) -> monitor_pb2.Recommendation:
    return monitor_pb2.Recommendation(rule=r.rule, severity=int(r.severity), bottleneck=r.bottleneck,
                                      evidence=r.evidence, action=r.action, expected_effect=r.expected_effect,
                                      subject=r.subject)


def severity_of(value: int) -> Severity | None:
    """The minimum severity a WatchAlerts request asks for (None: all)."""
    if value == monitor_pb2.SEVERITY_UNSPECIFIED:
        return None
    if value not in monitor_pb2.Severity.values():
        raise InvalidArgument("min_severity", f"unknown value {value}; use one of "
                              + ", ".join(monitor_pb2.Severity.keys()))
    return Severity(value)


def alert_pb(a: Alert) -> monitor_pb2.Alert:
    return monitor_pb2.Alert(rule=a.rule, severity=int(a.severity), firing=a.firing, subject=a.subject,
                             value=a.value, threshold=a.threshold, message=a.message, timestamp=a.timestamp)
