"""What the scaler knows: the instances as the router last listed them, the instances it started
itself, the policies, each pool's latest decision, and the history.

No gRPC and no stubs: the router client fills :meth:`ScalerState.set_listing`
from the router's registry, the controller records managed instances and
decisions, the servicer encodes :class:`PoolView` and :class:`Event`. Every
method takes ``now`` where time matters.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
from collections import deque
from dataclasses import dataclass, field

from scaler import policy as policies
from scaler.policy import Decision, HostLimit, Memory, Policy
from services.common.errors import NotFound
from services.common.load import DEFAULT_POOL, Role


class ManagedState(enum.Enum):
    STARTING = "starting"
    WARMING = "warming"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"
    #: Registered with the router but not started by this scaler.
    EXTERNAL = "external"


#: Managed states that count toward a pool's instances.
COUNTED = (ManagedState.STARTING, ManagedState.WARMING, ManagedState.SERVING)


@dataclass(frozen=True)
class PoolMember:
    """One instance of a pool view: as the router lists it, with what the scaler knows of it
    when the scaler started it (or, while it starts, as the scaler alone knows it)."""

    id: str
    address: str
    role: Role
    pool: str
    state: ManagedState = ManagedState.EXTERNAL
    backend_ref: str = ""
    started_at: float = 0.0
    #: Takes new requests (the router's state is ACTIVE).
    active: bool = True
    #: The router is draining it (no new requests).
    draining: bool = False
    #: Requests the router has in flight on it.
    in_flight: int = 0
    #: Requests queued or running on it, from its latest load report.
    load_in_flight: int = 0


@dataclass
class Managed:
    """An instance this scaler started (the only kind it ever stops)."""

    id: str
    pool: str
    role: Role
    state: ManagedState
    started_at: float
    address: str = ""
    backend_ref: str = ""
    #: The backend's handle (opaque here).
    handle: object = None


@dataclass(frozen=True)
class PoolView:
    pool: str
    role: Role
    desired: int
    current: int
    reason: str
    policy: Policy
    instances: tuple[PoolMember, ...] = ()
    starting: int = 0
    draining: int = 0
    decision: Decision | None = None
    #: The backend's limit on this pool's targets (None: none), as :meth:`ScalerState.limit` gives it.
    limit: HostLimit | None = None


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
    def __init__(self, default_policy: Policy, backend: str, history_limit: int = 10_000,
                 host_limit: HostLimit | None = None) -> None:
        """``host_limit``: the backend's most targets over every pool (None: no limit of its own)."""
        self.default_policy = default_policy
        self.backend = backend
        self.host_limit = host_limit
        self.policies: dict[str, Policy] = {}
        self.listing: tuple[PoolMember, ...] = ()
        self.listed_at: float | None = None
        self.listing_error = ""
        self.managed: dict[str, Managed] = {}
        self.decisions: dict[str, Decision] = {}
        #: Pools whose decision was dropped by a policy change, until the next one.
        self.changed: set[str] = set()
        self.memory: dict[str, Memory] = {}
        #: Per pool: why the last start failed, and until when no new start is tried.
        self.start_failures: dict[str, tuple[str, float]] = {}
        self._history: deque[Event] = deque(maxlen=history_limit)
        self._watchers: set[asyncio.Queue[Event]] = set()

    # -- the listing --------------------------------------------------------
    def set_listing(self, instances: list[PoolMember], now: float) -> None:
        self.listing, self.listed_at, self.listing_error = tuple(instances), now, ""

    def listing_failed(self, error: str) -> None:
        """The router did not answer; the last list stays, marked stale in every reason."""
        self.listing_error = error

    def listed(self, instance_id: str) -> PoolMember | None:
        return next((i for i in self.listing if i.id == instance_id), None)

    # -- pools --------------------------------------------------------------
    def policy(self, pool: str) -> Policy:
        return self.policies.get(pool, self.default_policy)

    def governed_pools(self) -> list[str]:
        """Pools whose targets the scaler sizes: every pool with a target, and every pool with a policy."""
        pools = {i.pool for i in self.listing if i.role == Role.TARGET} | set(self.policies)
        pools |= {m.pool for m in self.managed.values()}
        return sorted(pools)

    def counted(self, pool: str) -> int:
        """A pool's targets that serve or are on their way; draining ones are not counted."""
        ids = {i.id for i in self.listing if i.pool == pool and i.role == Role.TARGET and not i.draining}
        ids |= {m.id for m in self.managed.values() if m.pool == pool and m.state in COUNTED}
        ids -= {m.id for m in self.managed.values() if m.state == ManagedState.DRAINING}
        return len(ids)

    def limit(self, pool: str) -> HostLimit | None:
        """The backend's limit as it applies to ``pool``: what the other pools' targets leave of it,
        which may be none (a pool that would need one more target gets none: the host's cores are
        taken; its reason says so)."""
        if self.host_limit is None:
            return None
        others = sum(self.counted(p) for p in self.governed_pools() if p != pool)
        if not others:
            return self.host_limit
        return HostLimit(max(0, self.host_limit.instances - others),
                         f"{self.host_limit.why}, at most {self.host_limit.instances} over every pool "
                         f"and {others} in other pools")

    def victims(self, pool: str, n: int) -> list[Managed]:
        """Up to ``n`` serving instances this scaler started in ``pool``, least in-flight work first."""
        def work(m: Managed) -> tuple[int, float]:
            listed = self.listed(m.id)
            busy = (listed.in_flight + listed.load_in_flight) if listed is not None else 0
            return busy, -m.started_at  # the youngest first among equals: it has the least warm cache

        serving = [m for m in self.managed.values() if m.pool == pool and m.state == ManagedState.SERVING]
        return sorted(serving, key=work)[:max(0, n)]

    def pools(self, now: float) -> list[PoolView]:
        """One view per (pool, role) with instances, and one per pool that only has a policy."""
        groups: dict[tuple[str, Role], list[PoolMember]] = {}
        listed_ids = set()
        for i in self.listing:
            listed_ids.add(i.id)
            m = self.managed.get(i.id)
            if m is not None:
                i = dataclasses.replace(i, state=m.state, backend_ref=m.backend_ref, started_at=m.started_at,
                                        draining=i.draining or m.state == ManagedState.DRAINING)
            groups.setdefault((i.pool, i.role), []).append(i)
        for m in self.managed.values():
            if m.id not in listed_ids:
                groups.setdefault((m.pool, m.role), []).append(PoolMember(
                    m.id, m.address, m.role, m.pool, m.state, m.backend_ref, m.started_at,
                    active=m.state == ManagedState.SERVING, draining=m.state == ManagedState.DRAINING))
        for pool in self.governed_pools():
            groups.setdefault((pool, Role.TARGET), [])
        return [self._view(pool, role, members, now) for (pool, role), members in sorted(
            groups.items(), key=lambda kv: (kv[0][0], kv[0][1].value))]

    def pool(self, name: str, now: float) -> PoolView:
        """The view of the role a pool's policy governs: its targets."""
        views = [v for v in self.pools(now) if v.pool == name]
        for v in views:
            if v.role == Role.TARGET:
                return v
        return views[0] if views else self._view(name, Role.TARGET, [], now)

    def _view(self, pool: str, role: Role, members: list[PoolMember], now: float) -> PoolView:
        p = self.policy(pool)
        members = sorted(members, key=lambda i: i.id)
        current = sum(not i.draining and i.state not in (ManagedState.STARTING, ManagedState.WARMING)
                      for i in members)
        starting = sum(i.state in (ManagedState.STARTING, ManagedState.WARMING) for i in members)
        draining = sum(i.draining for i in members)
        decision = self.decisions.get(pool) if role == Role.TARGET else None
        limit = self.limit(pool) if role == Role.TARGET else None
        capped = False  # whether the reason already says the limit capped the count
        if role != Role.TARGET:
            desired, reason = current, f"not scaled on its own: pool {pool}'s policy governs its targets"
        elif decision is not None and not p.manual_instances:
            desired, reason = decision.desired, decision.reason
            capped = bool(decision.figures.get("capped"))
        else:
            if p.manual_instances:
                wanted, reason = p.manual_instances, f"manual: ScaleTo {p.manual_instances}"
            else:
                wanted = policies.bounded(current + starting, p)
                reason = ("no decision yet (the control loop has not looked at this pool)"
                          if pool not in self.changed else "policy changed: the control loop decides at its next "
                                                           "look (until then the count is kept within the bounds)")
            desired = wanted
            if limit is not None:
                desired, reason = limit.apply(wanted, reason)
                capped = desired < wanted
        notes = []
        if role == Role.TARGET:
            if starting:
                notes.append(f"{starting} starting")
            if draining:
                notes.append(f"{draining} draining")
            failure = self.start_failures.get(pool)
            if failure is not None and failure[1] > now:
                notes.append(f"last start failed ({failure[0]}); next try in {failure[1] - now:.0f} s")
            stoppable = sum(i.state == ManagedState.SERVING for i in members)
            excess = current + starting - desired
            if excess > stoppable + starting:
                notes.append(f"{excess - stoppable - starting} more instance(s) should go but were not started "
                             "by this scaler: left running")
            if limit is not None and limit.instances < p.max_instances and not capped:  # said once
                notes.append(f"max_instances {p.max_instances} capped at {limit.instances} by {limit.why}")
        if pool not in self.policies:
            notes.append("default policy")
        if self.listing_error:
            listed = (f"instances as listed {now - self.listed_at:.0f} s ago" if self.listed_at is not None
                      else "no instance list yet")
            notes.append(f"router unreachable ({self.listing_error}), {listed}")
        if notes:
            reason += " (" + "; ".join(notes) + ")"
        return PoolView(pool, role, desired, current, reason, p, tuple(members), starting, draining, decision, limit)

    # -- changes --------------------------------------------------------------
    def set_policy(self, pool: str, policy: Policy, now: float) -> PoolView:
        """Replaces a pool's policy (manual count included) with a checked one."""
        before = self.pool(pool, now)
        self.policies[pool] = policy
        self._policy_changed(pool)
        after = self.pool(pool, now)
        self.record(Event(now, pool, before.current, after.desired, kind="decision",
                          reason=f"policy set: instances in [{policy.min_instances}, {policy.max_instances}], "
                                 f"target utilisation {policy.target_utilization:g}",
                          figures={"min_instances": float(policy.min_instances),
                                   "max_instances": float(policy.max_instances),
                                   "target_utilization": policy.target_utilization,
                                   "tolerance": policy.tolerance,
                                   "scale_up_window_s": policy.scale_up_window_s,
                                   "scale_down_window_s": policy.scale_down_window_s,
                                   "capacity_tokens_per_second": policy.capacity_tokens_per_second,
                                   "manual_instances": float(policy.manual_instances)}))
        return after

    def check_known(self, pool: str, hint: str = "", recorded: bool = False) -> None:
        """NotFound for a pool this scaler does not govern: no target, no policy, not "default"
        (with ``recorded``, nor any event in the history). A misspelt pool would otherwise start
        processes in a pool of its own (ScaleTo), or be watched for events that never come (WatchEvents)."""
        if pool == DEFAULT_POOL or pool in self.governed_pools() or (
                recorded and (self.listed_at is None or any(e.pool == pool for e in self._history))):
            return  # (to be watched: before the router's first listing, no pool is known to be unknown)
        known = ", ".join(sorted({DEFAULT_POOL, *self.governed_pools()}))
        raise NotFound(f"pool {pool!r} has no targets and no policy (pools: {known})" + (f"; {hint}" if hint else ""))

    def scale_to(self, pool: str, instances: int, now: float) -> PoolView:
        """Sets (or with 0 clears) a pool's manual count; InvalidArgument outside
        the bounds, NotFound for a pool the scaler does not govern (no target, no
        policy, not "default"): a misspelt pool would otherwise start model
        processes in a pool of its own. SetPolicy is what makes a new pool."""
        self.check_known(pool, "give a new pool a policy with SetPolicy first")
        p = self.policy(pool)
        policies.check_manual(instances, p)
        before = self.pool(pool, now)
        self.policies[pool] = dataclasses.replace(p, manual_instances=instances)
        self._policy_changed(pool)
        self.start_failures.pop(pool, None)  # an operator's request: try again at once
        after = self.pool(pool, now)
        reason = f"manual: ScaleTo {instances}" if instances else "ScaleTo 0: back to automatic"
        self.record(Event(now, pool, before.current, after.desired, kind="decision", reason=reason,
                          figures={"instances": float(instances), "current": float(before.current)}))
        return after

    def _policy_changed(self, pool: str) -> None:
        """The pool's latest decision was made under the policy just replaced: its count and reason
        no longer stand (a reply to SetPolicy or ScaleTo showed them as if they did), so the pool shows
        none until the control loop decides again."""
        if self.decisions.pop(pool, None) is not None:
            self.changed.add(pool)

    def decided(self, pool: str, decision: Decision, now: float) -> None:
        """Keeps a pool's latest decision; records it when the desired count changes."""
        previous = self.decisions.get(pool)
        self.decisions[pool] = decision
        self.changed.discard(pool)
        self.memory[pool] = decision.memory
        # Also when the backend's limit starts or stops clipping it, and when scale-ups start or stop
        # being held: the count may stay the same, the reason is news.
        flags = ("capped", "scale_up_stalled", "scale_up_held")
        if previous is None or previous.desired != decision.desired or any(
                previous.figures.get(f, 0.0) != decision.figures.get(f, 0.0) for f in flags):
            self.record(Event(now, pool, int(decision.figures.get("current", 0)), decision.desired,
                              decision.reason, "decision", dict(decision.figures)))

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
