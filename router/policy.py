"""Routing policies: which instance gets the next request (pure).

Every policy is a function ``(eligible, snapshot) -> Instance`` over a
non-empty list of routable instances ordered by id; :func:`choose` does the
filtering, so no policy ever sees an instance that is unhealthy, draining,
ejected, silent (no fresh load report) or already tried for this request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from router.config import PolicyName
from router.registry import Instance


@dataclass(frozen=True)
class Snapshot:
    """What a decision may depend on besides the instances themselves."""

    now: float
    stale_after_s: float = 2.0
    #: The request's ordinal; round robin's cursor and every policy's tie-break.
    sequence: int = 0
    #: Instances already tried for this request.
    exclude: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Weights:
    """The score's weights (they sum to 1, so a score is in [0, 1])."""

    idle: float = 0.3
    queue: float = 0.3
    latency: float = 0.2
    availability: float = 0.2


Policy = Callable[[list[Instance], Snapshot], Instance]


def eligible(instances: Iterable[Instance], snapshot: Snapshot) -> list[Instance]:
    """The routable instances not yet tried, ordered by id."""
    return sorted((i for i in instances
                   if i.id not in snapshot.exclude and i.routable(snapshot.now, snapshot.stale_after_s)),
                  key=lambda i: i.id)


def _rotated(instances: list[Instance], sequence: int) -> list[tuple[int, Instance]]:
    """(rank, instance) where rank rotates with the sequence, for fair tie-breaks."""
    n = len(instances)
    return [((k - sequence) % n, inst) for k, inst in enumerate(instances)]


def round_robin(instances: list[Instance], snapshot: Snapshot) -> Instance:
    """The next instance in id order: over n consecutive requests to a stable
    set, each of n instances gets exactly one."""
    return instances[snapshot.sequence % len(instances)]


def load_of(instance: Instance, snapshot: Snapshot) -> int:
    """Requests on an instance: the larger of what it reported and what this
    router has in flight there (which is current between reports)."""
    load = instance.fresh_load(snapshot.now, snapshot.stale_after_s)
    reported = load.in_flight if load is not None else 0
    return max(reported, instance.in_flight)


def least_loaded(instances: list[Instance], snapshot: Snapshot) -> Instance:
    """The instance with the fewest requests; ties rotate like round robin."""
    return min(_rotated(instances, snapshot.sequence), key=lambda r: (load_of(r[1], snapshot), r[0]))[1]


def score(instance: Instance, snapshot: Snapshot, weights: Weights = Weights()) -> float:
    """How good a target the instance is, in [0, 1] (0 when not routable).

    idle accelerator (1 - utilisation), short queue 1/(queue + 1), low
    latency 1/(latency_s + 0.1) scaled by 0.1 into (0, 1] (time to first
    token, p50), availability 1/(1 + consecutive failures).
    """
    load = instance.fresh_load(snapshot.now, snapshot.stale_after_s)
    if load is None or not instance.routable(snapshot.now, snapshot.stale_after_s):
        return 0.0
    idle = 1.0 - min(1.0, max(0.0, load.accelerator_utilization))
    queue = 1.0 / (max(load.queue_length, instance.in_flight - load.running, 0) + 1)
    latency = 0.1 / (max(0.0, load.ttft_p50_ms) / 1000.0 + 0.1)
    availability = 1.0 / (1 + instance.consecutive_failures)
    return (weights.idle * idle + weights.queue * queue + weights.latency * latency
            + weights.availability * availability)


def best_score(instances: list[Instance], snapshot: Snapshot) -> Instance:
    """The highest score; ties rotate like round robin."""
    return min(_rotated(instances, snapshot.sequence), key=lambda r: (-score(r[1], snapshot), r[0]))[1]


POLICIES: dict[PolicyName, Policy] = {
    PolicyName.ROUND_ROBIN: round_robin,
    PolicyName.LEAST_LOADED: least_loaded,
    PolicyName.SCORE: best_score,
}


def choose(policy: PolicyName, instances: Iterable[Instance], snapshot: Snapshot) -> Instance | None:
    """The instance the policy picks among the eligible ones; None when there is none."""
    candidates = eligible(instances, snapshot)
    if not candidates:
        return None
    return POLICIES[policy](candidates, snapshot)
