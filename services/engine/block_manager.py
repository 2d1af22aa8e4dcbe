"""Block tables, reference counts and the free pool of the paged KV cache,
with automatic prefix caching.

The cache's memory is ``num_blocks`` blocks of ``block_size`` token positions
(:class:`services.engine.kv_cache.PagedKVCache`); block 0 is the null block
(zeros, read as padding, never handed out). A sequence holds a block table
(``Sequence.block_table``: block ids, position ``p`` lives at
``block_table[p // block_size]``, offset ``p % block_size``).

Prefix caching, after vLLM v1's ``KVCacheManager``/``BlockPool``: once a
block is full and computed it is registered under its chained hash
(:mod:`services.common.block_hash`). On admission the longest chain of a
prompt's full blocks found in the cache is shared (reference counted) and
only the rest is prefilled. A block no sequence uses goes back to the free
pool but keeps its hash and contents until the pool hands it out again:
uncached blocks are handed out first, then cached ones least recently freed
first (LRU eviction; a sequence's blocks are freed tail first, so a prefix's
later blocks go before its earlier ones). A registered block is never written
again while registered: a sequence that must rewrite a position of one (a
draft stream discarding tokens) drops the block and recomputes it.

Every store and eviction is recorded as a :class:`KVEvent` when
``record_events`` (for subscribers that index where prefixes are cached).
All of it is bookkeeping on the engine thread; the runner gets block tables
in its ForwardRows and keeps no state of its own beyond the tensors.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from services.common.block_hash import block_hashes
from services.engine.sequence import Sequence

#: The null block: zeros, the padding of every block table read; never allocated.
NULL_BLOCK = 0


def cdiv(a: int, b: int) -> int:
    """Ceiling of a / b for positive b."""
    return -(-a // b)


@dataclass(frozen=True)
class KVEvent:
    """Block hashes that became cached (``stored``) or stopped being cached
    (``removed``), in the order they happened."""

    stored: tuple[int, ...] = ()
    removed: tuple[int, ...] = ()


@dataclass
class PrefixStats:
    """Prefix-cache counters since start (tokens): ``queries`` (prompt tokens
    looked up at admission), ``hits`` (of them, found cached), ``preemptions``
    (sequences whose blocks were taken back for others)."""

    queries: int = 0
    hits: int = 0
    preemptions: int = 0


@dataclass
class BlockManager:
    """The free pool, reference counts and prefix-cache index of ``num_blocks``
    blocks of ``block_size`` tokens (see the module docstring). Engine thread only."""

    num_blocks: int
    block_size: int
    enable_prefix_caching: bool = True
    record_events: bool = False
    stats: PrefixStats = field(default_factory=PrefixStats)

    def __post_init__(self) -> None:
        if self.num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (one is the null block), got {self.num_blocks}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        self.ref_count = [0] * self.num_blocks
        self.hash_of: list[int | None] = [None] * self.num_blocks
        self.cached: dict[int, int] = {}  # block hash -> block id
        # Free blocks, next handed out first; cached ones are kept until handed out.
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, self.num_blocks))
        self.events: list[KVEvent] = []

    # -- figures ------------------------------------------------------------------------
    @property
    def usable_blocks(self) -> int:
        """Blocks sequences can hold (all but the null block)."""
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks no sequence holds (cached or not)."""
        return len(self.free)

    @property
    def usage(self) -> float:
        """Fraction of the usable blocks some sequence holds, in [0, 1]."""
        return (self.usable_blocks - len(self.free)) / self.usable_blocks

    # -- a sequence's blocks --------------------------------------------------------------
    def admit(self, seq: Sequence, budget: int) -> bool:
        """Gives a sequence without blocks the cached prefix of its tokens and
        blocks for its next ``min(pending, budget)`` positions; sets
        ``seq.num_cached`` to the prefix length (at most ``len(tokens) - 1``:
        one token is always computed, for logits). Returns False and takes
        nothing when the pool has too few blocks."""
        hits = self._match(seq)
        cached = len(hits) * self.block_size
        num_tokens = cached + min(len(seq.tokens) - cached, budget)
        need = cdiv(num_tokens, self.block_size) - len(hits)
        if need > len(self.free) - sum(1 for b in hits if self.ref_count[b] == 0):
            return False
        for b in hits:
            self._take(b)
        seq.block_table = hits
        seq.num_cached = cached
        seq.num_registered = len(hits)
        if self.enable_prefix_caching:
            self.stats.queries += len(seq.tokens)
            self.stats.hits += cached
        return self.ensure(seq, num_tokens)

    def ensure(self, seq: Sequence, num_tokens: int) -> bool:
        """Grows ``seq``'s block table to cover positions ``[0, num_tokens)``.
        Returns False (taking nothing) when the free pool is too small."""
        need = cdiv(num_tokens, self.block_size) - len(seq.block_table)
        if need > len(self.free):
            return False
        for _ in range(need):
            seq.block_table.append(self._allocate())
        return True

    def commit(self, seq: Sequence) -> None:
        """Registers ``seq``'s full computed blocks (below ``num_cached``) under
        their hashes (after each forward). A block whose hash another block
        already holds stays unregistered (the same prefix computed twice)."""
        full = min(min(seq.num_cached, len(seq.tokens)) // self.block_size, len(seq.block_table))
        if not self.enable_prefix_caching or seq.num_registered >= full:
            return
        self._hash(seq, full)
        stored = []
        for i in range(seq.num_registered, full):
            b, h = seq.block_table[i], seq.block_hashes[i]
            if self.hash_of[b] is None and h not in self.cached:
                self.hash_of[b] = h
                self.cached[h] = b
                stored.append(h)
        seq.num_registered = full
        if stored and self.record_events:
            self.events.append(KVEvent(stored=tuple(stored)))

    def trim(self, seq: Sequence) -> None:
        """Frees ``seq``'s blocks past ``num_cached`` (speculative rollback, a
        draft stream's discarded tokens). A registered block that the next
        write would change is dropped too and ``num_cached`` lowered to its
        start, so cached contents never change under their hash."""
        bs = self.block_size
        keep = cdiv(seq.num_cached, bs)
        if seq.num_cached % bs and keep <= len(seq.block_table) and self.hash_of[seq.block_table[keep - 1]] is not None:
            keep -= 1
            seq.num_cached = keep * bs
        for b in reversed(seq.block_table[keep:]):
            self._release(b)
        del seq.block_table[keep:]
        full = seq.num_cached // bs
        seq.num_registered = min(seq.num_registered, full)
        del seq.block_hashes[full:]

    def free_all(self, seq: Sequence) -> None:
        """Releases all of ``seq``'s blocks (it finished or is preempted); its
        registered blocks stay cached until handed out."""
        for b in reversed(seq.block_table):
            self._release(b)
        seq.block_table = []
        seq.num_registered = 0

    def take_events(self) -> list[KVEvent]:
        """The events recorded since the last call (oldest first)."""
        events, self.events = self.events, []
        return events

    def cached_hashes(self) -> list[int]:
        """Every block hash the cache holds now (a new subscriber's snapshot)."""
        return list(self.cached)

    # -- the pool -------------------------------------------------------------------------
    def _match(self, seq: Sequence) -> list[int]:
        """Blocks of the longest cached chain of ``seq``'s full blocks, leaving at
        least one token to compute. None for a prompt whose logprobs are asked
        and not yet given: those need every prompt position's logits (as vLLM
        skips the prefix cache for requests with prompt logprobs)."""
        if not self.enable_prefix_caching or (seq.request.prompt_logprobs and seq.generated == 0):
            return []
        limit = (len(seq.tokens) - 1) // self.block_size
        self._hash(seq, limit)
        hits = []
        for h in seq.block_hashes[:limit]:
            b = self.cached.get(h)
            if b is None:
                break
            hits.append(b)
        return hits

    def _hash(self, seq: Sequence, blocks: int) -> None:
        """Extends ``seq.block_hashes`` to its first ``blocks`` full blocks."""
        if len(seq.block_hashes) < blocks:
            seq.block_hashes = block_hashes(seq.tokens[:blocks * self.block_size], self.block_size,
                                            seq.block_hashes)

    def _take(self, b: int) -> None:
        if self.ref_count[b] == 0:
            del self.free[b]
        self.ref_count[b] += 1

    def _allocate(self) -> int:
        b, _ = self.free.popitem(last=False)
        h = self.hash_of[b]
        if h is not None:  # evict: the least recently freed cached block
            self.hash_of[b] = None
            del self.cached[h]
            if self.record_events:
                self.events.append(KVEvent(removed=(h,)))
        self.ref_count[b] = 1
        return b

    def _release(self, b: int) -> None:
        self.ref_count[b] -= 1
        if self.ref_count[b] == 0:
            self.free[b] = None  # cached: the tail (evicted last)
            if self.hash_of[b] is None:
                self.free.move_to_end(b, last=False)  # uncached: handed out first


__all__ = ["NULL_BLOCK", "BlockManager", "KVEvent", "PrefixStats", "cdiv"]
