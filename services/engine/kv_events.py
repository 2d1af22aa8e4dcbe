"""The prefix cache's stored/evicted block hashes, for subscribers on other threads.

The engine thread appends the block manager's :class:`KVEvent` s after each
step; any thread reads what happened since its cursor. A new subscriber (or
one that fell more than ``capacity`` events behind) gets a snapshot of every
hash cached now instead, then deltas: vLLM's KV events (``BlockStored`` /
``BlockRemoved`` published for KV-aware routers such as NVIDIA Dynamo's and
llm-d's). A restarted engine has a new log, so a router that reconnects gets
a snapshot and replaces what it knew. Thread-safe (one lock; a snapshot
copies the set once).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from services.engine.block_manager import KVEvent


@dataclass(frozen=True)
class KVEventBatch:
    """What a subscriber learns in one read: with ``snapshot``, ``stored`` is the
    whole cache (replace what you knew); otherwise the net change since the
    last read: hashes now held that were stored, and hashes no longer held
    (each hash in at most one of them)."""

    cursor: int
    snapshot: bool
    stored: tuple[int, ...]
    removed: tuple[int, ...]

    @property
    def empty(self) -> bool:
        return not (self.snapshot or self.stored or self.removed)


class KVEventLog:
    """The hashes the cache holds and the last ``capacity`` events (see the module docstring)."""

    def __init__(self, block_size: int, capacity: int = 8192) -> None:
        self.block_size = block_size
        self._lock = threading.Lock()
        self._held: dict[int, None] = {}
        self._log: deque[KVEvent] = deque(maxlen=capacity)
        self._next = 0  # sequence number of the next event

    def append(self, events: Iterable[KVEvent]) -> None:
        """Records events in order (engine thread)."""
        with self._lock:
            for ev in events:
                for h in ev.stored:
                    self._held[h] = None
                for h in ev.removed:
                    self._held.pop(h, None)
                self._log.append(ev)
                self._next += 1

    def read(self, cursor: int | None) -> KVEventBatch:
        """What happened since ``cursor`` (None: a new subscriber, who gets a snapshot)."""
        with self._lock:
            first = self._next - len(self._log)
            if cursor is None or cursor < first or cursor > self._next:
                return KVEventBatch(self._next, True, tuple(self._held), ())
            # Net effect in order: a hash's last event decides whether it is held.
            last: dict[int, bool] = {}
            for ev in list(self._log)[cursor - first:]:
                for h in ev.stored:
                    last[h] = True
                for h in ev.removed:
                    last[h] = False
            return KVEventBatch(self._next, False, tuple(h for h, held in last.items() if held),
                                tuple(h for h, held in last.items() if not held))


__all__ = ["KVEventBatch", "KVEventLog"]
