"""What the scaler knows: the fleet as the router last listed it, the policies, the history.

No gRPC and no stubs: the servicer fills :meth:`ScalerState.set_fleet` from
the router's registry and encodes :class:`PoolView` and :class:`Event`.
Every method takes ``now`` where time matters.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
from collections import deque
from dataclasses import dataclass, field

from scaler import policy as policies
from scaler.policy import Policy


class Role(enum.Enum):
    UNSPECIFIED = "unspecified"
    TARGET = "target"
    DRAFT = "draft"


class ManagedState(enum.Enum):
    STARTING = "starting"
    WARMING = "warming"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"
    #: Registered with the router but not started by this scaler.
    EXTERNAL = "external"


@dataclass(frozen=True)
class Instance:
    id: str
    address: str
    role: Role
    pool: str
    state: ManagedState = ManagedState.EXTERNAL
    backend_ref: str = ""
    started_at: float = 0.0
    #: Takes new requests (the router's state is ACTIVE): counted in ``current``.
    active: bool = True


@dataclass(frozen=True)
class PoolView:
    pool: str
    role: Role
    desired: int
    current: int
    reason: str
    policy: Policy
    instances: tuple[Instance, ...] = ()


@dataclass(frozen=True)
class Event:
    """One scaling decision or lifecycle step (llmesh.v1.ScalingEvent)."""

    timestamp: float
    pool: str
    from_instances: int
    to_instances: int
    reason: str
    kind: str
    figures: dict[str, float] = field(default_factory=dict)
    instance_id: str = ""


class ScalerState:
    def __init__(self, default_policy: Policy, backend: str, history_limit: int = 10_000) -> None:
        self.default_policy = default_policy
        self.backend = backend
        self.policies: dict[str, Policy] = {}
        self.fleet: tuple[Instance, ...] = ()
        self.fleet_at: float | None = None
        self.fleet_error = ""
        self._history: deque[Event] = deque(maxlen=history_limit)
        self._watchers: set[asyncio.Queue[Event]] = set()

    # -- the fleet ----------------------------------------------------------
    def set_fleet(self, instances: list[Instance], now: float) -> None:
        self.fleet, self.fleet_at, self.fleet_error = tuple(instances), now, ""

    def fleet_failed(self, error: str) -> None:
        """The router did not answer; the last list stays, marked stale in every reason."""
        self.fleet_error = error

    # -- pools --------------------------------------------------------------
    def policy(self, pool: str) -> Policy:
        return self.policies.get(pool, self.default_policy)

    def pools(self, now: float) -> list[PoolView]:
        """One view per (pool, role) with instances, and one per pool that only has a policy."""
        groups: dict[tuple[str, Role], list[Instance]] = {}
        for i in self.fleet:
            groups.setdefault((i.pool, i.role), []).append(i)
        for pool in self.policies:
            if not any(p == pool for p, _ in groups):
                groups[(pool, Role.UNSPECIFIED)] = []
        return [self._view(pool, role, members, now) for (pool, role), members in sorted(
            groups.items(), key=lambda kv: (kv[0][0], kv[0][1].value))]

    def pool(self, name: str, now: float) -> PoolView:
        """The view of the role a pool's policy governs: its targets, else its drafts."""
        views = [v for v in self.pools(now) if v.pool == name]
        for role in (Role.TARGET, Role.DRAFT):
            for v in views:
                if v.role == role:
                    return v
        return views[0] if views else self._view(name, Role.UNSPECIFIED, [], now)

    def _governed(self, pool: str, role: Role) -> bool:
        roles = {i.role for i in self.fleet if i.pool == pool}
        return role == Role.TARGET or (role != Role.TARGET and Role.TARGET not in roles)

    def _view(self, pool: str, role: Role, members: list[Instance], now: float) -> PoolView:
        p = self.policy(pool)
        current = sum(i.active for i in members)
        if self._governed(pool, role):
            desired, reason = policies.desired(current, p)
            if desired != current:
                reason += f"; the {self.backend} backend does not start or stop instances yet"
        else:
            desired, reason = current, f"not scaled on its own: pool {pool}'s policy governs its targets"
        if pool not in self.policies:
            reason += " (default policy)"
        if self.fleet_error:
            listed = (f"instances as listed {now - self.fleet_at:.0f} s ago" if self.fleet_at is not None
                      else "no instance list yet")
            reason += f"; router unreachable ({self.fleet_error}), {listed}"
        return PoolView(pool, role, desired, current, reason, p, tuple(sorted(members, key=lambda i: i.id)))

    # -- changes --------------------------------------------------------------
    def set_policy(self, pool: str, policy: Policy, now: float) -> PoolView:
        """Replaces a pool's policy (manual count included) with a checked one."""
        before = self.pool(pool, now)
        self.policies[pool] = policy
        after = self.pool(pool, now)
        self.record(Event(now, pool, before.current, after.desired, kind="decision",
                          reason=f"policy set: instances in [{policy.min_instances}, {policy.max_instances}], "
                                 f"target utilisation {policy.target_utilization:g}; automatic scaling arrives "
                                 "in a later issue",
                          figures={"min_instances": float(policy.min_instances),
                                   "max_instances": float(policy.max_instances),
                                   "target_utilization": policy.target_utilization,
                                   "tolerance": policy.tolerance,
                                   "manual_instances": float(policy.manual_instances)}))
        return after

    def scale_to(self, pool: str, instances: int, now: float) -> PoolView:
        """Sets (or with 0 clears) a pool's manual count; InvalidArgument outside the bounds."""
        p = self.policy(pool)
        policies.check_manual(instances, p)
        before = self.pool(pool, now)
        self.policies[pool] = dataclasses.replace(p, manual_instances=instances)
        after = self.pool(pool, now)
        reason = (f"manual: ScaleTo {instances}" if instances else "ScaleTo 0: back to automatic") \
            + f"; the {self.backend} backend does not start or stop instances yet"
        self.record(Event(now, pool, before.current, after.desired, kind="decision", reason=reason,
                          figures={"instances": float(instances), "current": float(before.current)}))
        return after

    # -- history --------------------------------------------------------------
    def record(self, event: Event) -> None:
        self._history.append(event)
        for queue in list(self._watchers):
            queue.put_nowait(event)

    def history(self, pool: str = "", since: float = 0.0) -> list[Event]:
        return [e for e in self._history if (not pool or e.pool == pool) and e.timestamp > since]

    async def watch(self, pool: str = ""):
        """Yields every event recorded from now on (only ``pool``'s when given)."""
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._watchers.add(queue)
        try:
            while True:
                event = await queue.get()
                if not pool or event.pool == pool:
                    yield event
        finally:
            self._watchers.discard(queue)
