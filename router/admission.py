"""Admission control: a bound on requests in flight per pool (pure).

A request is admitted to the first of its pools (its priority class's pool,
then the pools it may spill over to) that has a routable instance and room
under its bound. When every pool with a routable instance is full, it is
refused at once with a retry-after hint: the pool's mean request time
divided by its bound, i.e. how often a slot frees up when requests finish
evenly. When no pool has a routable instance it goes to its own pool, where
routing reports why nothing can serve it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from services.common.errors import ResourceExhausted

#: Retry-after before any request has finished in the pool.
DEFAULT_RETRY_AFTER_S = 0.1
MIN_RETRY_AFTER_S, MAX_RETRY_AFTER_S = 0.01, 10.0
#: Weight of the newest request time in the pool's moving mean.
EWMA_ALPHA = 0.2


class Admission:
    """In-flight counts and bounds per pool."""

    def __init__(self, default_bound: int = 0, bounds: Mapping[str, int] | None = None) -> None:
        self.default_bound = default_bound
        self.bounds = dict(bounds or {})
        self.in_flight: dict[str, int] = {}
        self.rejected: dict[str, int] = {}
        self._mean_s: dict[str, float] = {}

    def bound(self, pool: str) -> int:
        """The pool's bound (0: none)."""
        return self.bounds.get(pool, self.default_bound)

    def full(self, pool: str) -> bool:
        bound = self.bound(pool)
        return bool(bound) and self.in_flight.get(pool, 0) >= bound

    def admit(self, pools: Sequence[str], routable: Callable[[str], bool]) -> str:
        """The pool the request is admitted to (its in-flight count is taken);
        raises ResourceExhausted when every pool that could serve it is full."""
        full = []
        for pool in pools:
            if not routable(pool):
                continue
            if self.full(pool):
                full.append(pool)
                continue
            self.take(pool)
            return pool
        if full:
            self.rejected[pools[0]] = self.rejected.get(pools[0], 0) + 1
            described = ", ".join(f"{p!r} ({self.in_flight.get(p, 0)}/{self.bound(p)})" for p in full)
            raise ResourceExhausted(f"pool {described} full" if len(full) == 1 else f"pools {described} full",
                                    retry_after_s=min(self.retry_after_s(p) for p in full))
        self.take(pools[0])
        return pools[0]

    def release(self, pool: str, duration_s: float | None = None) -> None:
        """A request admitted to ``pool`` finished after ``duration_s`` (None: not timed)."""
        self.in_flight[pool] = max(0, self.in_flight.get(pool, 0) - 1)
        if duration_s is not None:
            mean = self._mean_s.get(pool)
            self._mean_s[pool] = duration_s if mean is None else mean + EWMA_ALPHA * (duration_s - mean)

    def retry_after_s(self, pool: str) -> float:
        mean = self._mean_s.get(pool)
        if mean is None:
            return DEFAULT_RETRY_AFTER_S
        hint = mean / max(1, self.bound(pool) or self.in_flight.get(pool, 1))
        return min(MAX_RETRY_AFTER_S, max(MIN_RETRY_AFTER_S, hint))

    def take(self, pool: str) -> None:
        """Counts a request in the pool without asking (the pool has no bound)."""
        self.in_flight[pool] = self.in_flight.get(pool, 0) + 1
