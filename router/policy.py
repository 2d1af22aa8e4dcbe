"""Routing policies: which instance gets the next request (pure).

Every policy is a function ``(eligible, snapshot) -> Instance`` over a
non-empty list of routable instances ordered by id; :func:`choose` does the
filtering, so no policy ever sees an instance that is unhealthy, draining,
ejected, silent (no fresh load report) or already tried for this request.
Randomness (power of two's pair, score's tie-break) comes from the
snapshot's ``seed``, so a decision is a function of its inputs.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from router.config import PolicyName
from router.registry import Instance


@dataclass(frozen=True)
class Weights:
    """The score's weights (the defaults sum to 1; scores are normalised by the sum, so a score is in [0, 1])."""

    idle: float = 0.3
    queue: float = 0.3
    latency: float = 0.2
    availability: float = 0.2

    @property
    def total(self) -> float:
        return self.idle + self.queue + self.latency + self.availability


DEFAULT_WEIGHTS = Weights()


@dataclass(frozen=True)
class Snapshot:
    """What a decision may depend on besides the instances themselves."""

    now: float
    stale_after_s: float = 2.0
    #: The request's ordinal; round robin's cursor and least-loaded's tie-break.
    sequence: int = 0
    #: Instances already tried for this request.
    exclude: frozenset[str] = frozenset()
    #: Random bits drawn for this decision (power of two's pair, score's tie-break).
    seed: int = 0
    weights: Weights = DEFAULT_WEIGHTS
    #: prefix_affinity: instance id -> prefix blocks of this request it already holds.
    affinity: Mapping[str, int] = field(default_factory=dict)
    #: prefix_affinity: how many requests above the least loaded a prefix's instance may be.
    max_imbalance: int = 4
    #: kv_aware: instance id -> prompt tokens it would have to prefill (its KV events' hits taken off).
    prefill_tokens: Mapping[str, int] = field(default_factory=dict)
    #: kv_aware: instance id -> prompt tokens of the requests this router sent there that
    #: are not prefilled yet (no first token): the prefill queued ahead of this request.
    queued_prefill: Mapping[str, int] = field(default_factory=dict)
    #: kv_aware: weight of ``queued_prefill`` in the cost.
    kv_queue_weight: float = 0.0
    #: kv_aware: prompt tokens one request in flight on an instance is worth.
    kv_load_weight: float = 256.0


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


def pair(instances: list[Instance], snapshot: Snapshot) -> list[Instance]:
    """Power of two's two candidates, drawn at random (from the snapshot's seed)."""
    return random.Random(snapshot.seed).sample(instances, 2) if len(instances) > 1 else list(instances)


def power_of_two(instances: list[Instance], snapshot: Snapshot) -> Instance:
    """Two random candidates, the less loaded wins (Mitzenmacher, "The Power of
    Two Choices in Randomized Load Balancing", 2001); a tie goes to the first drawn."""
    candidates = pair(instances, snapshot)
    if len(candidates) == 1:
        return candidates[0]
    a, b = candidates
    return a if load_of(a, snapshot) <= load_of(b, snapshot) else b


def prefix_affinity(instances: list[Instance], snapshot: Snapshot) -> Instance:
    """The instance holding the longest prefix of the request's prompt, while its
    load is at most ``max_imbalance`` above the least loaded's; otherwise the
    least loaded (which then becomes the prefix's instance). As SGLang's
    cache-aware router: prefix-cache hits while balanced, load balance when not."""
    least = least_loaded(instances, snapshot)
    if not snapshot.affinity:
        return least
    floor = load_of(least, snapshot)
    holders = [(snapshot.affinity[i.id], -load_of(i, snapshot), -rank, i)
               for rank, i in _rotated(instances, snapshot.sequence) if snapshot.affinity.get(i.id)]
    if not holders:
        return least
    best = max(holders, key=lambda h: h[:3])[3]
    return best if load_of(best, snapshot) <= floor + snapshot.max_imbalance else least


def kv_cost(instance: Instance, snapshot: Snapshot) -> float:
    """kv_aware's cost of an instance, in prompt tokens to prefill before this
    request's first token: the prompt tokens it would prefill itself (what the
    instance's prefix cache holds taken off, from its KV events) + ``kv_queue_weight``
    x the prefill queued there ahead of it (prompt tokens of requests this router sent that
    have no first token yet, their cache hits taken off) + ``kv_load_weight`` x
    its requests in flight (default 256: a request decoding costs about as
    much as prefilling 256 tokens on the default models, one decode step of a
    full batch). Counting queued prefill in tokens rather than requests tells a
    queue of cache hits from a queue of cold prompts, as NVIDIA Dynamo's KV
    router counts the prefill blocks and active blocks of each worker; its
    weight is 0 by default: on the prefix benchmark (BENCHMARKS.md) a weight of 1
    sent a group's second request away from the instance still prefilling the
    group's prefix, so groups spread and their prefixes were computed twice."""
    return (snapshot.prefill_tokens.get(instance.id, 0)
            + snapshot.kv_queue_weight * snapshot.queued_prefill.get(instance.id, 0)
            + snapshot.kv_load_weight * load_of(instance, snapshot))


def kv_aware(instances: list[Instance], snapshot: Snapshot) -> Instance:
    """The instance with the lowest :func:`kv_cost`; ties rotate like round
    robin. As NVIDIA Dynamo's KV router (overlap score against load) and
    llm-d's precise prefix-cache scorer; with no KV events it is least loaded."""
    return min(_rotated(instances, snapshot.sequence), key=lambda r: (kv_cost(r[1], snapshot), r[0]))[1]


def score(instance: Instance, snapshot: Snapshot, weights: Weights | None = None) -> float:
    """How good a target the instance is, in [0, 1] (0 when not routable).

    idle accelerator (1 - utilisation), short queue 1/(queue + 1), low
    latency 1/(latency_s + 0.1) scaled by 0.1 into (0, 1] (time to first
    token, p50), availability 1/(1 + consecutive failures); weighted by
    ``weights`` (default: the snapshot's) and normalised by their sum.
    """
    load = instance.fresh_load(snapshot.now, snapshot.stale_after_s)
    if load is None or not instance.routable(snapshot.now, snapshot.stale_after_s):
        return 0.0
    w = weights or snapshot.weights
    idle = 1.0 - min(1.0, max(0.0, load.accelerator_utilization))
    queue = 1.0 / (max(load.queue_length, instance.in_flight - load.running, 0) + 1)
    latency = 0.1 / (max(0.0, load.ttft.p50_ms) / 1000.0 + 0.1)
    availability = 1.0 / (1 + instance.consecutive_failures)
    return (w.idle * idle + w.queue * queue + w.latency * latency + w.availability * availability) / w.total


#: Scores closer than this are a tie.
SCORE_TIE = 1e-9


def best_score(instances: list[Instance], snapshot: Snapshot) -> Instance:
    """The highest score; ties are broken at random (from the snapshot's seed)."""
    scored = [(score(i, snapshot), i) for i in instances]
    top = max(s for s, _ in scored)
    tied = [i for s, i in scored if s >= top - SCORE_TIE]
    return tied[0] if len(tied) == 1 else random.Random(snapshot.seed).choice(tied)


POLICIES: dict[PolicyName, Policy] = {
    PolicyName.ROUND_ROBIN: round_robin,
    PolicyName.LEAST_LOADED: least_loaded,
    PolicyName.SCORE: best_score,
    PolicyName.POWER_OF_TWO: power_of_two,
    PolicyName.PREFIX_AFFINITY: prefix_affinity,
    PolicyName.KV_AWARE: kv_aware,
}


def choose(policy: PolicyName, instances: Iterable[Instance], snapshot: Snapshot) -> Instance | None:
    """The instance the policy picks among the eligible ones; None when there is none."""
    candidates = eligible(instances, snapshot)
    if not candidates:
        return None
    return POLICIES[policy](candidates, snapshot)
