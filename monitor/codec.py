"""The monitor's protobuf ⇄ domain translations (no I/O)."""

from __future__ import annotations

from monitor.analysis import Alert, Recommendation, Severity
from monitor.metrics import Scope, Throughput, ThroughputResult
from monitor.store import InstanceInfo, Latency, Report, Role, UtilizationSource
from services.common.errors import InvalidArgument
from services.common.stubs import monitor_pb2, router_pb2, stats_pb2

ROLES = {
    stats_pb2.ROLE_UNSPECIFIED: Role.UNSPECIFIED, stats_pb2.ROLE_TARGET: Role.TARGET,
    stats_pb2.ROLE_DRAFT: Role.DRAFT, stats_pb2.ROLE_ROUTER: Role.ROUTER,
    stats_pb2.ROLE_MONITOR: Role.MONITOR, stats_pb2.ROLE_SCALER: Role.SCALER,
}
SOURCES = {
    stats_pb2.UTILIZATION_SOURCE_UNSPECIFIED: UtilizationSource.UNSPECIFIED,
    stats_pb2.UTILIZATION_SOURCE_ENGINE_BUSY: UtilizationSource.ENGINE_BUSY,
    stats_pb2.UTILIZATION_SOURCE_NVML: UtilizationSource.NVML,
}
SOURCES_PB = {v: k for k, v in SOURCES.items()}


def latency_of(pb: stats_pb2.LatencySummary) -> Latency:
    return Latency(pb.p50_ms, pb.p95_ms, pb.p99_ms, pb.mean_ms, pb.count)


def latency_pb(s: Latency) -> stats_pb2.LatencySummary:
    return stats_pb2.LatencySummary(p50_ms=s.p50_ms, p95_ms=s.p95_ms, p99_ms=s.p99_ms, mean_ms=s.mean_ms,
                                    count=s.count)


def report_of(pb: stats_pb2.LoadReport, received_at: float) -> Report:
    return Report(
        instance_id=pb.instance_id, role=ROLES.get(pb.role, Role.UNSPECIFIED),
        # A sender without a clock reading is placed at its arrival.
        timestamp=pb.timestamp or received_at, received_at=received_at, window_s=pb.window_s,
        queue_length=pb.queue_length, running=pb.running, in_flight=pb.in_flight,
        max_batch_size=pb.max_batch_size, mean_batch_size=pb.mean_batch_size, batch_fill=pb.batch_fill,
        accelerator_utilization=pb.accelerator_utilization,
        utilization_source=SOURCES.get(pb.utilization_source, UtilizationSource.UNSPECIFIED),
        kv_cache_usage=pb.kv_cache_usage, ttft=latency_of(pb.ttft), tpot=latency_of(pb.tpot),
        e2e=latency_of(pb.e2e), queue_time=latency_of(pb.queue_time),
        tokens_per_second=pb.tokens_per_second, requests_per_second=pb.requests_per_second,
        acceptance_rate=pb.acceptance_rate, requests_total=pb.requests_total,
        tokens_generated_total=pb.tokens_generated_total, errors_total=pb.errors_total,
        rejected_total=pb.rejected_total, proposed_tokens_total=pb.proposed_tokens_total,
        accepted_tokens_total=pb.accepted_tokens_total,
    )


STATES = {router_pb2.INSTANCE_STATE_ACTIVE: "active", router_pb2.INSTANCE_STATE_DRAINING: "draining",
          router_pb2.INSTANCE_STATE_EJECTED: "ejected"}


def instance_of(pb: router_pb2.InstanceStatus) -> InstanceInfo:
    spec = pb.spec
    serving = pb.health == router_pb2.INSTANCE_HEALTH_SERVING
    return InstanceInfo(
        key=spec.id or spec.address, address=spec.address, role=ROLES.get(spec.role, Role.UNSPECIFIED),
        pool=spec.pool or "default", healthy=serving and pb.state == router_pb2.INSTANCE_STATE_ACTIVE,
        state=STATES.get(pb.state, "unspecified"), serving=serving, consecutive_failures=pb.consecutive_failures,
    )


def scope_of(pb: monitor_pb2.Scope) -> Scope:
    which = pb.WhichOneof("target")
    if which == "instance_id":
        if not pb.instance_id:
            raise InvalidArgument("scope.instance_id", "must not be empty when set")
        return Scope(instance_id=pb.instance_id)
    if which == "pool":
        if not pb.pool:
            raise InvalidArgument("scope.pool", "must not be empty when set")
        return Scope(pool=pb.pool)
    return Scope()


def throughput_pb(m: Throughput) -> monitor_pb2.ThroughputMetrics:
    return monitor_pb2.ThroughputMetrics(
        window_s=m.window_s, requests_per_second=m.requests_per_second, tokens_per_second=m.tokens_per_second,
        batch_efficiency=m.batch_efficiency, accelerator_utilization=m.accelerator_utilization,
        utilization_source=SOURCES_PB[m.utilization_source], concurrent_users=m.concurrent_users,
        ttft=latency_pb(m.ttft), tpot=latency_pb(m.tpot), e2e=latency_pb(m.e2e),
        queue_time=latency_pb(m.queue_time), acceptance_rate=m.acceptance_rate, error_rate=m.error_rate,
        instances=m.instances, queue_length=m.queue_length, running=m.running, kv_cache_usage=m.kv_cache_usage,
        saturation=m.saturation, queue_growth_per_second=m.queue_growth_per_second,
    )


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
