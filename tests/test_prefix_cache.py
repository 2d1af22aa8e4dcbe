"""The engine on the paged KV cache: prefix hits reuse blocks and never change
outputs, a tiny cache preempts by priority and recomputes (nothing dropped),
speculative rollback gives blocks back."""

from __future__ import annotations

import pytest

from services.common.errors import OutOfRange
from services.engine.build import build_engine
from services.engine.sequence import FinishReason, GenerationRequest, SamplingOptions
from services.engine.settings import EngineSettings
from services.speculative.gamma import SpeculationSettings
from services.speculative.speculator import Speculator
from services.speculative.state import SpeculationRequest
from tests.conftest import hf_greedy
from tests.test_engine import CountingProposer, Recorder, drain, greedy

PREFIX = [(11 * i) % 300 + 3 for i in range(21)]  # 5 full blocks of 4, and a token
SUFFIXES = [[7, 8], [9], [10, 11, 12, 13, 14, 15], [7, 8, 40]]


def engine_with(tiny_models, prefix_caching=True, num_kv_blocks=64, speculation=None, **kw):
    base = dict(max_batch_size=4, max_wait_ms=0.0, max_batch_tokens=256, max_queue=64, num_slots=8)
    base.update(kw)
    return build_engine(str(tiny_models.target), EngineSettings(**base), block_size=4, num_kv_blocks=num_kv_blocks,
                        prefix_caching=prefix_caching, speculation=speculation).engine


def run(engine, prompts, n, together):
    recs = [Recorder() for _ in prompts]
    for p, r in zip(prompts, recs):
        engine.submit(greedy(p, n), r)
        if not together:
            drain(engine)
    drain(engine)
    return recs


def test_prefix_hits_reuse_blocks_and_outputs_equal_the_cache_off(tiny_models, reference_model):
    prompts = [PREFIX + s for s in SUFFIXES] + [PREFIX[:9], PREFIX + SUFFIXES[0]]
    on, off = engine_with(tiny_models), engine_with(tiny_models, prefix_caching=False)
    for together in (False, True):
        got_on = [r.tokens for r in run(on, prompts, 7, together)]
        got_off = [r.tokens for r in run(off, prompts, 7, together)]
        assert got_on == got_off
    assert got_on == [hf_greedy(reference_model, p, 7) for p in prompts]
    s = on.scheduler.kv.stats
    assert s.queries == 2 * sum(map(len, prompts)) and s.hits >= 20 * (len(prompts) - 2)
    assert off.scheduler.kv.stats.hits == 0
    load = on.load()
    assert load.prefix_cache_hits == s.hits and load.prefix_cache_queries == s.queries
    # Finished sequences hold nothing; their blocks stay cached (free but kept).
    assert load.kv_usage == 0.0 and on.scheduler.kv.cached


def test_generated_tokens_are_cached_too_multi_turn(tiny_models, reference_model):
    """A second turn (prompt + first answer + more) hits the first turn's answer's blocks."""
    engine = engine_with(tiny_models)
    first = run(engine, [PREFIX], 12, together=False)[0].tokens
    hits = engine.scheduler.kv.stats.hits
    turn2 = PREFIX + first + [5, 6]
    assert run(engine, [turn2], 5, together=False)[0].tokens == hf_greedy(reference_model, turn2, 5)
    assert engine.scheduler.kv.stats.hits - hits >= 4 * ((len(PREFIX) + 11) // 4)


def test_a_tiny_cache_preempts_lowest_priority_first_and_recomputes(tiny_models, reference_model):
    # 11 usable blocks of 4 = 44 positions; four sequences of 8 + 14 tokens need 24 each.
    engine = engine_with(tiny_models, num_kv_blocks=12, prefix_caching=False)
    prompts = [[(5 * i + j) % 300 + 1 for j in range(8)] for i in range(4)]
    recs = [Recorder() for _ in prompts]
    seqs = [engine.submit(greedy(p, 14, priority=5 if i == 1 else 0), r)
            for i, (p, r) in enumerate(zip(prompts, recs))]
    drain(engine, limit=2000)
    assert all(r.finish is FinishReason.LENGTH for r in recs)  # nothing dropped
    assert [r.tokens for r in recs] == [hf_greedy(reference_model, p, 14) for p in prompts]
    assert engine.load().preemptions == sum(s.preemptions for s in seqs) > 0
    assert seqs[1].preemptions == 0  # the high-priority one is never the victim
    assert engine.scheduler.kv.num_free == 11 and engine.load().queue_length == 0


def test_preemption_with_prefix_caching_recomputes_from_the_cache(tiny_models, reference_model):
    engine = engine_with(tiny_models, num_kv_blocks=14)
    prompts = [PREFIX + s for s in SUFFIXES]
    recs = run(engine, prompts, 10, together=True)
    assert [r.tokens for r in recs] == [hf_greedy(reference_model, p, 10) for p in prompts]
    assert engine.load().preemptions > 0


def test_seeded_sampling_is_unchanged_by_prefix_hits(tiny_models):
    def sampled(engine):
        rec = Recorder()
        engine.submit(GenerationRequest(prompt_ids=PREFIX + [9], sampling=SamplingOptions(
            max_new_tokens=8, temperature=0.9, seed=1234, ignore_eos=True)), rec)
        drain(engine)
        return rec.tokens

    warm = engine_with(tiny_models)
    run(warm, [PREFIX + [70, 71]], 2, together=False)  # caches the prefix's blocks
    assert sampled(warm) == sampled(engine_with(tiny_models, prefix_caching=False))
    assert warm.scheduler.kv.stats.hits >= 20


def test_rejected_proposals_give_their_blocks_back(tiny_models, reference_model):
    spec = Speculator(SpeculationSettings(disable_by_batch_size=1, min_acceptance=0.0))
    engine = engine_with(tiny_models, speculation=spec)
    proposer, rec = CountingProposer(), Recorder()
    seq = engine.submit(greedy(PREFIX, 12, speculation=SpeculationRequest(proposer)), rec)
    bs = engine.runner.cache.block_size
    while engine.run_once() or engine.scheduler.has_work():
        if seq.block_table:  # between steps: exactly the blocks its cached tokens need
            assert len(seq.block_table) == -(-seq.num_cached // bs)
    assert proposer.rounds > 0 and rec.tokens == hf_greedy(reference_model, PREFIX, 12)
    assert engine.scheduler.kv.num_free == engine.scheduler.kv.usable_blocks


def test_the_memory_of_one_2048_token_slot_holds_18_sequences_of_100_tokens(tiny_models):
    """The capacity figure: the slot cache gave each sequence max_len (2048 on the
    default models) positions; 128 blocks of 16 hold 18 sequences of 100 tokens."""
    def preemptions(n):
        engine = build_engine(str(tiny_models.target), EngineSettings(max_batch_size=32, max_wait_ms=0.0,
                                                                      max_batch_tokens=2048, num_slots=32),
                              block_size=16, num_kv_blocks=129).engine  # 128 usable + the null block
        recs = [Recorder() for _ in range(n)]
        for i, r in enumerate(recs):
            engine.submit(greedy([(3 * i + j) % 300 + 1 for j in range(36)], 64), r)
        drain(engine, limit=5000)
        assert all(r.finish is FinishReason.LENGTH for r in recs)
        return engine.load().preemptions

    assert preemptions(18) == 0
    assert preemptions(19) > 0  # one more does not fit: preempted and recomputed, still served


def test_a_kv_cache_smaller_than_the_context_bounds_it(tiny_models):
    """A sequence the whole cache cannot hold is refused, never left waiting forever."""
    engine = engine_with(tiny_models, num_kv_blocks=6)  # 5 usable blocks of 4: 20 positions
    assert engine.max_context == 20
    for prompt_len, n in ((21, 1), (9, 12)):  # the prompt, or prompt + max_new_tokens, past 20
        with pytest.raises(OutOfRange, match="context (of|is) 20"):
            engine.submit(greedy(list(range(1, prompt_len + 1)), n), Recorder())
    rec = Recorder()
    engine.submit(greedy(list(range(1, 10)), 11), rec)
    drain(engine)
    assert rec.finish is FinishReason.LENGTH and len(rec.tokens) == 11
