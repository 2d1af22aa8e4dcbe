"""Scaling policy: its defaults, validation and bounds (pure: no gRPC, no stubs, no clock).

Automatic scaling (``ScalingPolicy.decide(snapshot, state, now)`` from the
monitor's throughput) arrives in a later issue; for now a pool's desired
count is its manual count when ScaleTo set one, else its current count kept
within the policy's bounds.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from services.common.errors import InvalidArgument

DEFAULT_TARGET_UTILIZATION = 0.7
DEFAULT_TOLERANCE = 0.1
DEFAULT_SCALE_UP_WINDOW_S = 30.0
DEFAULT_SCALE_DOWN_WINDOW_S = 300.0
DEFAULT_DRAIN_TIMEOUT_S = 60.0
#: No pool is ever asked for more instances than this, whatever the policy says.
MAX_INSTANCES = 1024


@dataclass(frozen=True)
class Policy:
    """llmesh.v1.ScalingPolicy with its defaults applied."""

    min_instances: int = 1
    max_instances: int = 8
    target_utilization: float = DEFAULT_TARGET_UTILIZATION
    tolerance: float = DEFAULT_TOLERANCE
    scale_up_window_s: float = DEFAULT_SCALE_UP_WINDOW_S
    scale_down_window_s: float = DEFAULT_SCALE_DOWN_WINDOW_S
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    #: A fixed count set by ScaleTo; 0: automatic.
    manual_instances: int = 0


#: Fields whose 0 (proto3's "unset") means the documented default.
_DEFAULTS = {"target_utilization": DEFAULT_TARGET_UTILIZATION, "tolerance": DEFAULT_TOLERANCE,
             "scale_up_window_s": DEFAULT_SCALE_UP_WINDOW_S, "scale_down_window_s": DEFAULT_SCALE_DOWN_WINDOW_S,
             "drain_timeout_s": DEFAULT_DRAIN_TIMEOUT_S}


def checked(policy: Policy, prefix: str = "policy.") -> Policy:
    """The policy with defaults for its zero fields; InvalidArgument names the first bad field."""
    p = dataclasses.replace(policy, **{k: v for k, v in _DEFAULTS.items() if getattr(policy, k) == 0})

    def bad(name: str, message: str) -> InvalidArgument:
        return InvalidArgument(prefix + name, f"{message}, got {getattr(p, name)}")

    if not 0 <= p.min_instances <= MAX_INSTANCES:
        raise bad("min_instances", f"must be in [0, {MAX_INSTANCES}]")
    if not 1 <= p.max_instances <= MAX_INSTANCES:
        raise bad("max_instances", f"must be in [1, {MAX_INSTANCES}]")
    if p.max_instances < p.min_instances:
        raise bad("max_instances", f"must be >= min_instances ({p.min_instances})")
    if not (math.isfinite(p.target_utilization) and 0 < p.target_utilization <= 1):
        raise bad("target_utilization", "must be in (0, 1] (0 means the default 0.7)")
    if not (math.isfinite(p.tolerance) and 0 <= p.tolerance < 1):
        raise bad("tolerance", "must be in [0, 1) (0 means the default 0.1)")
    for name in ("scale_up_window_s", "scale_down_window_s", "drain_timeout_s"):
        value = getattr(p, name)
        if not (math.isfinite(value) and value > 0):
            raise bad(name, "must be a finite number of seconds > 0 (0 means the default)")
    check_manual(p.manual_instances, p, prefix + "manual_instances")
    return p


def check_manual(instances: int, policy: Policy, name: str = "instances") -> None:
    """A manual count must be 0 (automatic) or within the policy's bounds."""
    if instances == 0:
        return
    if not policy.min_instances <= instances <= policy.max_instances:
        raise InvalidArgument(name, f"must be 0 (automatic) or within the pool's bounds "
                                    f"[{policy.min_instances}, {policy.max_instances}], got {instances}")


def bounded(n: int, policy: Policy) -> int:
    return max(policy.min_instances, min(policy.max_instances, n))


def desired(current: int, policy: Policy) -> tuple[int, str]:
    """The count a pool should have and why (no automatic policy yet)."""
    if policy.manual_instances:
        return policy.manual_instances, f"manual: ScaleTo {policy.manual_instances}"
    n = bounded(current, policy)
    if n > current:
        return n, f"below min_instances {policy.min_instances}"
    if n < current:
        return n, f"above max_instances {policy.max_instances}"
    return n, "no automatic policy yet: desired = current"
