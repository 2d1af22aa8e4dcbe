"""The seed contract with speculative decoding: same seed, prompt and parameters
-> same tokens, with speculation or without, alone or beside other requests,
when speculation switches off by batch size mid-request (engine driven step by
step, then through the target service with a real draft service)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from services.common.stubs import model_pb2_grpc
from services.draft.config import DraftConfig
from services.draft.main import create_server as create_draft
from services.engine.build import build_engine
from services.engine.sequence import GenerationRequest, SamplingOptions
from services.engine.settings import EngineSettings
from services.speculative.gamma import SpeculationSettings
from services.speculative.speculator import Speculator
from services.speculative.state import SpeculationRequest
from services.target.config import TargetConfig
from services.target.main import create_server as create_target
from tests.helpers import OracleProposer, Recorder, run_stream, spec_request

SAMPLED = dict(temperature=0.9, top_k=40, top_p=0.95)


def make_engine(tiny_models, disable_by_batch_size=64):
    speculator = Speculator(SpeculationSettings(disable_by_batch_size=disable_by_batch_size, min_acceptance=0.0))
    return build_engine(str(tiny_models.target), EngineSettings(max_batch_size=16, max_wait_ms=0.0, num_slots=16),
                        speculation=speculator).engine


def drain(engine, limit=1000):
    for _ in range(limit):
        if not engine.run_once() and not engine.scheduler.has_work():
            return
    raise AssertionError("engine did not finish")


def seeded(prompt, n, seed, speculation=None):
    return GenerationRequest(prompt_ids=prompt, sampling=SamplingOptions(max_new_tokens=n, seed=seed,
                                                                         ignore_eos=True, **SAMPLED),
                             speculation=speculation)


PROMPT = [21, 22, 23, 24]


def plain_run(tiny_models, seed, n=24):
    engine = make_engine(tiny_models)
    rec = Recorder()
    engine.submit(seeded(PROMPT, n, seed), rec)
    drain(engine)
    return rec.tokens


@pytest.mark.parametrize("seed", [1, 2**63 + 5])
def test_seeded_speculation_is_token_identical_to_plain_decoding(tiny_models, seed):
    reference = plain_run(tiny_models, seed)
    engine = make_engine(tiny_models)
    proposer, rec = OracleProposer(reference, len(PROMPT), wrong_every=3), Recorder()
    engine.submit(seeded(PROMPT, 24, seed, SpeculationRequest(proposer, gamma=3)), rec)
    drain(engine)
    assert rec.tokens == reference
    s = rec.spec
    assert 0 < s.accepted < s.proposed  # rounds with kept and rejected proposals both ran


def test_seeded_speculation_beside_seven_others_crossing_the_break_even(tiny_models):
    """Alone it speculates; then 7 requests join (past disable_by_batch_size 4:
    rounds under way are dropped, no new ones start); they leave and it
    speculates again. Its tokens are the plain run's throughout."""
    seed = 99
    reference = plain_run(tiny_models, seed, n=40)
    engine = make_engine(tiny_models, disable_by_batch_size=4)
    proposer, rec = OracleProposer(reference, len(PROMPT), wrong_every=4), Recorder()
    engine.submit(seeded(PROMPT, 40, seed, SpeculationRequest(proposer, gamma=2)), rec)
    for _ in range(3):
        engine.run_once()
    rounds_alone = proposer.rounds
    mates = [Recorder() for _ in range(7)]
    for i, mate in enumerate(mates):
        engine.submit(seeded([5 + i, 6, 7], 6 + i, seed=i), mate)
    engine.run_once()
    assert rounds_alone > 0 and proposer.rounds == rounds_alone  # stood down while crowded
    drain(engine)
    assert proposer.rounds > rounds_alone  # speculated again once alone
    assert rec.tokens == reference
    assert [m.tokens for m in mates] == plain_mates(tiny_models)


def plain_mates(tiny_models):
    engine = make_engine(tiny_models)
    recs = [Recorder() for _ in range(7)]
    for i, rec in enumerate(recs):
        engine.submit(seeded([5 + i, 6, 7], 6 + i, seed=i), rec)
    drain(engine)
    return [r.tokens for r in recs]


# -- through the services ---------------------------------------------------------------

@pytest.fixture(scope="module")
async def services(tiny_models):
    draft = create_draft(DraftConfig.from_namespace({"model": str(tiny_models.draft), "port": 0}, env={}))
    perfect = create_draft(DraftConfig.from_namespace({"model": str(tiny_models.target), "port": 0}, env={}))
    for app in (draft, perfect):
        await app.start()
    target = create_target(TargetConfig.from_namespace({
        "model": str(tiny_models.target), "port": 0, "max_batch_size": 16, "num_slots": 32,
        "draft_address": draft.address, "speculation_min_acceptance": 0.0,
        "speculative_disable_by_batch_size": 4, "draft_timeout_ms": 5000.0}, env={}))
    await target.start()
    channel = grpc.aio.insecure_channel(target.address)
    yield model_pb2_grpc.TargetModelStub(channel), draft, perfect
    await channel.close()
    for app in (target, draft, perfect):
        await app.stop(0)


@pytest.mark.parametrize("draft_kind", ["random", "perfect"])
async def test_a_seeded_request_gets_the_same_tokens_alone_or_beside_seven_others(services, draft_kind):
    stub, draft, perfect = services
    address = (draft if draft_kind == "random" else perfect).address
    mine = dict(seed=2024, **SAMPLED)
    plain, _ = await run_stream(stub, spec_request(PROMPT, 20, spec=False, **mine))
    alone, last = await run_stream(stub, spec_request(PROMPT, 20, spec=True, draft=address, **mine))
    assert alone == plain and last.speculation.rounds > 0
    others = [run_stream(stub, spec_request([30 + i, 31, 32], 12 + i, spec=i % 2 == 0, draft=address, temperature=1.0))
              for i in range(7)]
    crowded, *_ = await asyncio.gather(run_stream(stub, spec_request(PROMPT, 20, spec=True, draft=address, **mine)), *others)
    assert crowded[0] == plain


async def test_the_draft_draws_with_the_targets_noise_even_for_an_unseeded_request(services):
    """The target as its own draft, sampling: with the same noise every
    proposal is the target's own draw, so all are kept (with independent
    draws, about sum(min(p, q)) = 1 each would be too, but the draft's own
    random seed would make Gumbel-coupled proposals mismatch)."""
    stub, _, perfect = services
    _, last = await run_stream(stub, spec_request(PROMPT, 24, spec=True, draft=perfect.address, gamma=4, temperature=1.0))
    s = last.speculation
    assert s.rounds > 0 and s.accepted_tokens == s.proposed_tokens


@pytest.mark.parametrize("sampling", [dict(temperature=1e-39), dict(temperature=3.4e38, top_k=5),
                                      dict(temperature=1.0, top_p=1e-30)])
async def test_extreme_sampling_values_through_speculation_match_plain_decoding(services, sampling):
    """Float extremes in the target's verification and the draft's proposals."""
    stub, draft, _ = services
    plain, _ = await run_stream(stub, spec_request(PROMPT, 12, spec=False, seed=5, **sampling))
    speculated, last = await run_stream(stub, spec_request(PROMPT, 12, spec=True, draft=draft.address, seed=5, **sampling))
    assert speculated == plain and last.speculation.rounds > 0
