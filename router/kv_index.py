"""Which instance's prefix cache holds which KV blocks, from their KV events (pure).

Each target streams the hashes of the blocks it stores and evicts
(``Stats/WatchKvEvents``: a snapshot first, then changes). The index applies
them per instance and answers, for a prompt's token ids, how many leading
tokens each instance has cached: the prompt's blocks are hashed exactly as the
target hashes them (:func:`services.common.block_hash.block_hashes`, with the
block size the instance reported), and a target reuses at most
``(len(prompt) - 1) // block_size`` blocks (one token is always computed), so
a hit predicted here is the hit the target serves. A snapshot replaces what
was known (a restarted instance, or a subscriber that fell behind); an
instance that leaves, or whose stream breaks, is forgotten until its next
snapshot. A request just routed is expected to store its prompt's blocks
on its instance: from the moment it is routed until its instance's events
report the blocks stored, those blocks count as held there, so the next
requests of a group sharing the prefix follow it instead of spreading while
it waits in the instance's queue or is still being prefilled (Dynamo's router
likewise counts blocks it routed before the events arrive). The expectation
lasts while the request is in flight (:meth:`settle` ends it; ``pending_s``
bounds it) and ``expect_s`` after, for its events to arrive.
As NVIDIA Dynamo's KV router and llm-d's KV-cache indexer. Event-loop
thread only (no locks); times are the caller's clock (seconds).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from services.common.block_hash import block_hashes


class KvIndex:
    """Instance id -> the block hashes its cache holds, and its block size."""

    def __init__(self, expect_s: float = 5.0, pending_s: float = 600.0) -> None:
        self.expect_s = expect_s
        self.pending_s = pending_s
        self._held: dict[str, set[int]] = {}
        self._block_size: dict[str, int] = {}
        # instance -> hash -> [requests in flight expecting it, held until (while none is)]
        self._expected: dict[str, dict[int, list]] = {}

    def __contains__(self, instance_id: str) -> bool:
        return instance_id in self._held

    def held(self, instance_id: str) -> frozenset[int]:
        """The hashes the instance holds (empty when unknown)."""
        return frozenset(self._held.get(instance_id, ()))

    def apply(self, instance_id: str, snapshot: bool, stored: Iterable[int], removed: Iterable[int],
              block_size: int) -> None:
        """One KvEvents message from the instance. Changes before a first
        snapshot are ignored (the base they change is unknown)."""
        if snapshot:
            self._held[instance_id] = set(stored)
            self._block_size[instance_id] = block_size
            return
        held = self._held.get(instance_id)
        if held is None:
            return
        stored = list(stored)
        held.update(stored)
        held.difference_update(removed)
        expected = self._expected.get(instance_id)
        if expected:
            for h in stored:  # what was expected is held now: its events speak for it from here
                expected.pop(h, None)

    def forget(self, instance_id: str) -> None:
        """The instance left, restarted or stopped streaming: nothing is known of it."""
        self._held.pop(instance_id, None)
        self._block_size.pop(instance_id, None)
        self._expected.pop(instance_id, None)

    def expect(self, instance_id: str, prompt_ids: Sequence[int], now: float) -> tuple[int, ...]:
        """A request with ``prompt_ids`` was just routed to the instance: its
        full blocks count as held there until the instance reports them stored,
        while the request is in flight (at most ``pending_s``) and ``expect_s``
        after :meth:`settle`. Returns the hashes to pass to :meth:`settle`
        (none when the instance has sent no snapshot)."""
        size = self._block_size.get(instance_id)
        if size is None or instance_id not in self._held:
            return ()
        expected = self._expected.setdefault(instance_id, {})
        for h in [h for h, (pending, until) in expected.items() if until <= now]:
            del expected[h]
        hashes = tuple(block_hashes(prompt_ids, size))
        for h in hashes:
            entry = expected.setdefault(h, [0, 0.0])
            entry[0] += 1
            entry[1] = now + self.pending_s
        return hashes

    def settle(self, instance_id: str, hashes: Sequence[int], now: float) -> None:
        """The request :meth:`expect` returned ``hashes`` for has ended: what it
        expected stays counted for ``expect_s`` more unless another request in
        flight still expects it."""
        expected = self._expected.get(instance_id)
        if not expected:
            return
        for h in hashes:
            entry = expected.get(h)
            if entry is not None:
                entry[0] = max(0, entry[0] - 1)
                if entry[0] == 0:
                    entry[1] = now + self.expect_s

    def cached_tokens(self, instance_ids: Iterable[str], prompt_ids: Sequence[int],
                      now: float = float("inf")) -> dict[str, int]:
        """Instance id -> leading prompt tokens it would not prefill (0 for an
        instance the index knows nothing of); blocks expected at ``now`` count."""
        out: dict[str, int] = {}
        by_size: dict[int, list[int]] = {}
        for iid in instance_ids:
            held, size = self._held.get(iid), self._block_size.get(iid)
            if held is None or not size:
                out[iid] = 0
                continue
            usable = (len(prompt_ids) - 1) // size
            if size not in by_size:
                by_size[size] = block_hashes(prompt_ids[:usable * size], size)
            expected = self._expected.get(iid, {})
            depth = 0
            for h in by_size[size]:
                if h not in held:
                    entry = expected.get(h)
                    if entry is None or entry[1] <= now:
                        break
                depth += 1
            out[iid] = depth * size
        return out


__all__ = ["KvIndex"]
