"""The scaler's protobuf ⇄ domain translations (no I/O)."""

from __future__ import annotations

import math

from scaler.policy import InstanceLoad, Policy, WindowLoad
from scaler.state import Event, ManagedState, PoolMember, PoolView
from services.common.load import DEFAULT_POOL
from services.common.load_codec import ROLE_PB, role_of
from services.common.errors import InvalidArgument
from services.common.validation import check_printable
from services.common.stubs import monitor_pb2, router_pb2, scaler_pb2

STATES_PB = {
    ManagedState.STARTING: scaler_pb2.MANAGED_STATE_STARTING, ManagedState.WARMING: scaler_pb2.MANAGED_STATE_WARMING,
    ManagedState.SERVING: scaler_pb2.MANAGED_STATE_SERVING, ManagedState.DRAINING: scaler_pb2.MANAGED_STATE_DRAINING,
    ManagedState.STOPPED: scaler_pb2.MANAGED_STATE_STOPPED, ManagedState.EXTERNAL: scaler_pb2.MANAGED_STATE_EXTERNAL,
}


def instance_of(pb: router_pb2.InstanceStatus) -> PoolMember:
    """A registered instance as the router lists it (the state records whether the scaler started it)."""
    spec = pb.spec
    return PoolMember(id=spec.id or spec.address, address=spec.address,
                    role=role_of(spec.role), pool=spec.pool or DEFAULT_POOL,
                    state=ManagedState.EXTERNAL, active=pb.state == router_pb2.INSTANCE_STATE_ACTIVE,
                    draining=pb.state == router_pb2.INSTANCE_STATE_DRAINING, in_flight=pb.in_flight,
                    load_in_flight=pb.load.in_flight if pb.HasField("load") else 0)


def window_load(pb: monitor_pb2.ThroughputMetrics) -> WindowLoad:
    return WindowLoad(window_s=pb.window_s, tokens_per_second=pb.tokens_per_second,
                      in_flight=pb.in_flight, running=pb.running)


def instance_loads(reply: monitor_pb2.GetThroughputResponse, targets: set[str]) -> tuple[InstanceLoad, ...]:
    return tuple(InstanceLoad(key, m.tokens_per_second, m.saturation)
                 for key, m in sorted(reply.per_instance.items()) if key in targets)


#: Longest pool name.
MAX_POOL_CHARS = 256


def pool_name(value: str) -> str:
    """A pool named in a request: not empty, at most MAX_POOL_CHARS characters."""
    if not value.strip():
        raise InvalidArgument("pool", "must not be empty")
    if len(value) > MAX_POOL_CHARS:
        raise InvalidArgument("pool", f"must be at most {MAX_POOL_CHARS} characters, got {len(value)}")
    if value != value.strip():  # as the router takes pool names
        raise InvalidArgument("pool", f"must not start or end with spaces, got {value[:40]!r}")
    check_printable("pool", value)
    return value


def pool_filter(value: str) -> str:
    """A pool a request filters by (GetHistory, WatchEvents): empty for every
    pool, else a name as :func:`pool_name` takes it."""
    return pool_name(value) if value else value


def since_of(value: float) -> float:
    """GetHistory's ``since``: a finite time in seconds since the epoch (0: from the start)."""
    if not math.isfinite(value):
        raise InvalidArgument("since", f"must be a finite number of seconds since the epoch, got {value}")
    return value


def policy_of(pb: scaler_pb2.ScalingPolicy) -> Policy:
    """The fields as sent; :func:`scaler.policy.checked` applies defaults and validates."""
    return Policy(min_instances=pb.min_instances, max_instances=pb.max_instances,
                  target_utilization=pb.target_utilization, tolerance=pb.tolerance,
                  scale_up_window_s=pb.scale_up_window_s, scale_down_window_s=pb.scale_down_window_s,
                  drain_timeout_s=pb.drain_timeout_s, manual_instances=pb.manual_instances,
                  capacity_tokens_per_second=pb.capacity_tokens_per_second, panic_threshold=pb.panic_threshold)


def policy_pb(p: Policy) -> scaler_pb2.ScalingPolicy:
    return scaler_pb2.ScalingPolicy(
        min_instances=p.min_instances, max_instances=p.max_instances, target_utilization=p.target_utilization,
        tolerance=p.tolerance, scale_up_window_s=p.scale_up_window_s, scale_down_window_s=p.scale_down_window_s,
        drain_timeout_s=p.drain_timeout_s, manual_instances=p.manual_instances,
        capacity_tokens_per_second=p.capacity_tokens_per_second, panic_threshold=p.panic_threshold)


def instance_pb(i: PoolMember) -> scaler_pb2.ManagedInstance:
    return scaler_pb2.ManagedInstance(id=i.id, address=i.address, role=ROLE_PB[i.role], pool=i.pool,
                                      state=STATES_PB[i.state], backend_ref=i.backend_ref, started_at=i.started_at)


def pool_pb(v: PoolView) -> scaler_pb2.PoolStatus:
    d = v.decision
    return scaler_pb2.PoolStatus(
        pool=v.pool, role=ROLE_PB[v.role], desired=v.desired, current=v.current, reason=v.reason,
        policy=policy_pb(v.policy), instances=[instance_pb(i) for i in v.instances], starting=v.starting,
        draining=v.draining,
        capacity_tokens_per_second=d.capacity.tokens_per_second if d is not None and d.capacity else 0.0,
        capacity_measured=bool(d is not None and d.capacity and d.capacity.measured),
        panic=bool(d is not None and d.panic), figures=_figures(v))


def _figures(v: PoolView) -> dict[str, float]:
    """The latest decision's figures, and ``host_max_instances`` wherever the backend limits the pool
    (also in manual mode and before a decision)."""
    figures = dict(v.decision.figures) if v.decision is not None else {}
    if v.limit is not None:
        figures["host_max_instances"] = float(v.limit.instances)
    return figures


def event_pb(e: Event) -> scaler_pb2.ScalingEvent:
    return scaler_pb2.ScalingEvent(timestamp=e.timestamp, pool=e.pool, from_instances=e.from_instances,
                                   to_instances=e.to_instances, reason=e.reason, figures=e.figures, kind=e.kind,
                                   instance_id=e.instance_id)
