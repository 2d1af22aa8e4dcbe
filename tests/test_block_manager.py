"""The paged KV cache's block manager: allocation, sharing, eviction and
rollback keep its invariants under any sequence of operations (hypothesis),
and a cached block's contents always match its hash."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.block_hash import block_hashes, hash_block
from services.engine.block_manager import NULL_BLOCK, BlockManager, KVEvent
from services.engine.sequence import GenerationRequest, SamplingOptions, Sequence

BS = 4


def seq_of(tokens: list[int]) -> Sequence:
    return Sequence(GenerationRequest(prompt_ids=list(tokens), sampling=SamplingOptions()), sink=lambda ev: None,
                    arrival=0.0)


class Model:
    """A block manager and what its blocks would hold: ``memory[b][i]`` is the
    token whose keys were written at offset i of block b."""

    def __init__(self, num_blocks: int, prefix: bool) -> None:
        self.kv = BlockManager(num_blocks, BS, enable_prefix_caching=prefix, record_events=True)
        self.memory: dict[int, list[int | None]] = {}
        self.seqs: list[Sequence] = []
        self.indexed: set[int] = set()  # hashes as a KV-event subscriber sees them

    def write(self, seq: Sequence, upto: int) -> None:
        """The forward pass: positions [num_cached, upto) written, then committed."""
        for p in range(seq.num_cached, upto):
            block = seq.block_table[p // BS]
            self.memory.setdefault(block, [None] * BS)[p % BS] = seq.tokens[p]
        seq.num_cached = upto
        self.kv.commit(seq)

    def check(self) -> None:
        kv = self.kv
        held: dict[int, int] = {}
        for s in self.seqs:
            assert NULL_BLOCK not in s.block_table
            assert len(s.block_table) * BS >= s.num_cached
            for b in s.block_table:
                held[b] = held.get(b, 0) + 1
            # What a sequence has cached is its own tokens, in whichever blocks it shares.
            for p in range(s.num_cached):
                assert self.memory[s.block_table[p // BS]][p % BS] == s.tokens[p]
        for b in range(1, kv.num_blocks):
            assert kv.ref_count[b] == held.get(b, 0)
            assert (b in kv.free) == (kv.ref_count[b] == 0)
        assert NULL_BLOCK not in kv.free
        assert {h: b for b, h in enumerate(kv.hash_of) if h is not None} == kv.cached
        # A cached block holds exactly the block its chained hash names (checked by rehashing the chain).
        for h, b in kv.cached.items():
            assert None not in self.memory[b]
            assert any(hash_block(parent, self.memory[b]) == h for parent in [None, *kv.cached])
        for ev in kv.take_events():
            assert isinstance(ev, KVEvent)
            self.indexed |= set(ev.stored)
            self.indexed -= set(ev.removed)
        assert self.indexed == set(kv.cached)  # events replayed give the cache's contents


tokens_st = st.lists(st.integers(0, 2), min_size=1, max_size=14)  # a small alphabet: prefixes repeat
ops_st = st.lists(st.tuples(st.sampled_from(["admit", "grow", "rollback", "finish", "preempt"]),
                            tokens_st, st.integers(0, 100)), max_size=40)


@settings(max_examples=150, deadline=None)
@given(ops=ops_st, num_blocks=st.integers(2, 24), prefix=st.booleans())
def test_invariants_hold_under_any_operations(ops, num_blocks, prefix):
    m = Model(num_blocks, prefix)
    for op, tokens, n in ops:
        if op == "admit":
            s = seq_of(tokens)
            if m.kv.admit(s, budget=1 + n % 8):
                m.seqs.append(s)
                hit = s.num_cached
                assert hit % BS == 0 and hit < len(s.tokens)
                m.write(s, min(len(s.tokens), len(s.block_table) * BS))
            else:
                assert s.block_table == [] and s.num_cached == 0
        elif m.seqs:
            s = m.seqs[n % len(m.seqs)]
            if op == "grow":  # decode: one more token, or a verify of a few
                s.tokens += tokens[:1 + n % 3]
                if m.kv.ensure(s, len(s.tokens)):
                    m.write(s, len(s.tokens))
            elif op == "rollback":  # rejected proposals, or a draft stream discarding tokens
                keep = n % (s.num_cached + 1)
                del s.tokens[max(keep, 1):]
                s.num_cached = min(keep, len(s.tokens))
                m.kv.trim(s)
                assert len(s.block_table) == -(-s.num_cached // BS)
            elif op in ("finish", "preempt"):
                m.kv.free_all(s)
                s.num_cached = 0
                if op == "finish":
                    m.seqs.remove(s)
        m.check()


def test_a_shared_prefix_is_reused_and_evicted_last_use_first():
    kv = BlockManager(num_blocks=7, block_size=BS)
    a = seq_of(list(range(10)))  # blocks [0..3], [4..7] full; [8, 9] partial
    assert kv.admit(a, budget=100) and a.num_cached == 0 and len(a.block_table) == 3
    a.num_cached = 10
    kv.commit(a)
    assert len(kv.cached) == 2
    b = seq_of(list(range(8)) + [50, 51, 52])
    assert kv.admit(b, budget=100)
    assert b.num_cached == 8 and b.block_table[:2] == a.block_table[:2]  # shared, not copied
    assert kv.stats.queries == 10 + 11 and kv.stats.hits == 8
    (x1, x2, x3), y3 = a.block_table, b.block_table[2]
    kv.free_all(a)
    kv.free_all(b)
    assert kv.num_free == 6 and len(kv.cached) == 2  # freed, still cached
    # Uncached blocks go first (last freed first), then untouched ones, then the
    # cached ones least recently freed first, a chain's tail before its head.
    assert [kv._allocate() for _ in range(6)] == [y3, x3, 5, 6, x2, x1]
    assert kv.cached == {}


def test_a_whole_cached_prompt_still_computes_its_last_token():
    kv = BlockManager(num_blocks=9, block_size=BS)
    a = seq_of(list(range(8)))
    kv.admit(a, budget=100)
    a.num_cached = 8
    kv.commit(a)
    b = seq_of(list(range(8)))
    kv.admit(b, budget=100)
    assert b.num_cached == 4 and b.pending == 4  # the last block is recomputed: logits need a token fed


def test_the_router_and_the_engine_hash_alike():
    """The hash chain is a pure function of the tokens: the same for any split into calls."""
    tokens = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    whole = block_hashes(tokens, 4)
    assert len(whole) == 2 and block_hashes(tokens, 4, whole[:1]) == whole
    assert whole[1] == hash_block(whole[0], tokens[4:8]) != hash_block(None, tokens[4:8])
