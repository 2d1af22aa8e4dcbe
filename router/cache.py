"""The response cache: finished answers to deterministic requests (pure).

An LRU map with a time to live and a bound on entries. Keys and values are
opaque here (the codec makes them: a request's prompt and parameters, the
answer's chunks); times are passed in by the caller.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, Hashable, TypeVar

V = TypeVar("V")


class ResponseCache(Generic[V]):
    """At most ``capacity`` answers, each valid for ``ttl_s`` after it was stored."""

    def __init__(self, capacity: int, ttl_s: float) -> None:
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._entries: OrderedDict[Hashable, tuple[float, V]] = OrderedDict()
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, now: float) -> V | None:
        """The answer stored under ``key`` and still valid (counted as a hit), else None (a miss)."""
        entry = self._entries.get(key)
        if entry is not None and entry[0] > now:
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[1]
        if entry is not None:
            del self._entries[key]
        self.misses += 1
        return None

    def put(self, key: Hashable, value: V, now: float) -> None:
        self._entries[key] = (now + self.ttl_s, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
            self.evictions += 1
