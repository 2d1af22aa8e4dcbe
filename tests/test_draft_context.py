"""A row that cannot run never reaches the forward pass, and speculation stops
before the draft's context ends: engine-level (persistent draft sequences,
rows with unusable proposals), the draft service's Propose stream, and a
target speculating with a draft whose context is shorter than its own."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import LlamaForCausalLM

from services.common.errors import InvalidArgument, OutOfRange
from services.common.stubs import generation_pb2 as gen
from services.common.stubs import model_pb2, model_pb2_grpc
from services.draft.config import DraftConfig
from services.draft.main import create_server as create_draft
from services.engine.build import build_engine
from services.engine.model_runner import ForwardRow
from services.engine.sequence import FinishReason, GenerationRequest, SamplingOptions
from services.engine.settings import EngineSettings
from services.speculative.gamma import SpeculationSettings
from services.speculative.speculator import Speculator
from services.speculative.state import Proposal, SpeculationRequest
from services.target.config import TargetConfig
from services.target.main import create_server as create_target
from tests.conftest import hf_greedy
from tests.helpers import Conversation, OracleProposer, Recorder

DRAFT_CONTEXT = 32


def make_engine(tiny_models, max_context=0, speculation=None):
    return build_engine(str(tiny_models.target), EngineSettings(max_batch_size=8, max_wait_ms=0.0, num_slots=8),
                        max_context=max_context, speculation=speculation).engine


def drain(engine, limit=500):
    for _ in range(limit):
        if not engine.run_once() and not engine.scheduler.has_work():
            return
    raise AssertionError("engine did not finish")


def run_until_paused(engine, events_of):
    for _ in range(100):
        if all(ev and ev[-1].paused for ev in events_of):
            return
        engine.run_once()
    raise AssertionError("sequences did not pause")


def persistent(prompt, n):
    return GenerationRequest(prompt_ids=prompt, sampling=SamplingOptions(max_new_tokens=n), persistent=True)


@pytest.mark.parametrize("fault", ["past the context", "discard too large"])
def test_a_round_that_cannot_run_fails_alone_before_the_batch_runs(tiny_models, reference_model, fault):
    engine = make_engine(tiny_models, max_context=DRAFT_CONTEXT)
    bad, good = [], []
    bad_seq = engine.submit(persistent(list(range(1, 21)), 4), bad.append)
    good_prompt = [7, 8, 9]
    good_seq = engine.submit(persistent(good_prompt, 4), good.append)
    run_until_paused(engine, [bad, good])
    first = [t for ev in good for t in ev.token_ids]
    assert first == hf_greedy(reference_model, good_prompt, 4)
    if fault == "past the context":  # 24 held + 9 appended: past the context of 32
        engine.resume(bad_seq, 0, [5] * 9, 4)
    else:
        engine.resume(bad_seq, 25, [5], 4)
    seen = len(good)
    engine.resume(good_seq, 0, [11, 12], 3)  # both in the same (prefill-chunk) group
    engine.run_once()
    assert bad[-1].finish_reason is FinishReason.ERROR and isinstance(bad[-1].error, OutOfRange)
    assert ("context" in str(bad[-1].error)) == (fault == "past the context")
    for _ in range(100):  # the round's one event comes when it pauses
        if len(good) > seen:
            break
        engine.run_once()
    assert good[-1].paused
    more = [t for ev in good[seen:] for t in ev.token_ids]
    assert more == hf_greedy(reference_model, good_prompt + first + [11, 12], 3)
    assert bad_seq.slot is None and engine.scheduler.slots.free == 7  # the failed one's slot is back


def test_a_token_outside_the_vocabulary_is_refused_before_the_round(tiny_models):
    engine = make_engine(tiny_models)
    events = []
    seq = engine.submit(persistent([1, 2, 3], 2), events.append)
    run_until_paused(engine, [events])
    for bad in (tiny_models.vocab_size, -1):
        with pytest.raises(OutOfRange, match="append_tokens.*vocabulary"):
            engine.resume(seq, 0, [4, bad], 2)


def test_the_runner_names_every_row_that_cannot_run(tiny_models):
    engine = make_engine(tiny_models, max_context=DRAFT_CONTEXT)
    runner, vocab = engine.runner, tiny_models.vocab_size
    blocks, bs = runner.cache.num_blocks, runner.cache.block_size
    whole = list(range(1, 1 + -(-DRAFT_CONTEXT // bs)))  # a table covering the whole context
    runner.check(ForwardRow([1], 0, [1, 2, 3]))  # fine
    runner.check(ForwardRow(whole, DRAFT_CONTEXT - 2, [1, 2], keep=2))  # fine: ends at the last position
    for row, what in [(ForwardRow([blocks], 0, [1]), "block_table"), (ForwardRow([0], 0, [1]), "block_table"),
                      (ForwardRow([], 0, [1]), "block_table"), (ForwardRow([1], bs - 1, [1, 2]), "block_table"),
                      (ForwardRow([1], 0, []), "tokens"), (ForwardRow(whole, DRAFT_CONTEXT - 1, [1, 2]), "context"),
                      (ForwardRow([1], -1, [1]), "context"), (ForwardRow([1], 0, [1, vocab]), "vocabulary"),
                      (ForwardRow([1], 0, [-3, 1]), "vocabulary"), (ForwardRow([1], 0, [1, 2], keep=3), "keep")]:
        with pytest.raises(InvalidArgument, match=what):
            runner.check(row)


class BadProposer:
    """An in-process proposer (trusted code, so not checked on arrival) that
    proposes a token id outside the vocabulary."""

    def __init__(self, vocab):
        self.vocab = vocab

    def propose(self, round_, on_result):
        on_result(Proposal([self.vocab + 5] * round_.gamma), None)

    def close(self):
        pass


def test_a_row_with_an_unusable_proposal_fails_alone(tiny_models, reference_model):
    speculator = Speculator(SpeculationSettings(disable_by_batch_size=64, min_acceptance=0.0))
    engine = make_engine(tiny_models, speculation=speculator)
    bad, good = Recorder(), Recorder()
    engine.submit(GenerationRequest(prompt_ids=[1, 2, 3], sampling=SamplingOptions(max_new_tokens=8, ignore_eos=True),
                                    speculation=SpeculationRequest(BadProposer(tiny_models.vocab_size))), bad)
    engine.submit(GenerationRequest(prompt_ids=[4, 5, 6], sampling=SamplingOptions(max_new_tokens=8,
                                                                                   ignore_eos=True)), good)
    drain(engine)
    assert bad.finish is FinishReason.ERROR and "vocabulary" in str(bad.error)
    assert good.finish is FinishReason.LENGTH and good.tokens == hf_greedy(reference_model, [4, 5, 6], 8)


def test_the_target_stops_asking_before_the_drafts_context_ends(tiny_models, reference_model):
    speculator = Speculator(SpeculationSettings(disable_by_batch_size=64, min_acceptance=0.0))
    engine = make_engine(tiny_models, speculation=speculator)
    prompt = [9, 8, 7, 6, 5]
    reference = hf_greedy(reference_model, prompt, 50)
    proposer = OracleProposer(reference, len(prompt), wrong_every=5, max_context=DRAFT_CONTEXT)
    rec = Recorder()
    engine.submit(GenerationRequest(prompt_ids=prompt, sampling=SamplingOptions(max_new_tokens=50, ignore_eos=True),
                                    speculation=SpeculationRequest(proposer, gamma=6)), rec)
    drain(engine)
    assert rec.tokens == reference
    assert proposer.asked and all(held + gamma <= DRAFT_CONTEXT for held, gamma in proposer.asked)
    assert "context" in rec.spec.disabled_reason


# -- through the services ---------------------------------------------------------------

@pytest.fixture(scope="module")
async def short_draft(tiny_models):
    app = create_draft(DraftConfig.from_namespace({"model": str(tiny_models.draft), "port": 0,
                                                   "max_context": DRAFT_CONTEXT}, env={}))
    await app.start()
    channel = grpc.aio.insecure_channel(app.address)
    yield app, model_pb2_grpc.DraftModelStub(channel), channel
    await channel.close()
    await app.stop(0)


async def test_a_stream_asking_past_the_drafts_context_gets_out_of_range(short_draft, tiny_models):
    app, stub, channel = short_draft
    draft_reference = LlamaForCausalLM.from_pretrained(tiny_models.draft).eval()
    doomed, mate = Conversation(stub), Conversation(stub)
    ctx = list(range(1, 21))
    r = await doomed.round(append_tokens=ctx, gamma=8)
    assert len(r.tokens) == 8  # 28 held
    r = await doomed.round(append_tokens=[3], discard=0, gamma=8)
    assert len(r.tokens) == 3  # 29 + 3: fewer at the context's end
    mate_ctx = [4, 5, 6]
    # All 3 kept (discard = 8 asked - 3 kept) and one more: 33 tokens, past the context.
    replies = await asyncio.gather(doomed.round(append_tokens=[3], discard=5, gamma=4),
                                   mate.round(append_tokens=mate_ctx, gamma=4), return_exceptions=True)
    assert isinstance(replies[0], grpc.aio.AioRpcError)
    assert replies[0].code() == grpc.StatusCode.OUT_OF_RANGE and "context" in replies[0].details()
    assert "Traceback" not in replies[0].details()
    assert list(replies[1].tokens) == hf_greedy(draft_reference, mate_ctx, 4)
    r = await mate.round(append_tokens=[9], discard=1, gamma=2)
    assert len(r.tokens) == 2
    for conv in (doomed, mate):
        await conv.close()
    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("first, code, field", [
    ({"append_tokens": list(range(1, DRAFT_CONTEXT + 1)), "gamma": 2}, grpc.StatusCode.OUT_OF_RANGE, "prompt"),
    ({"append_tokens": [1, 10_000], "gamma": 2}, grpc.StatusCode.OUT_OF_RANGE, "tokens"),
])
async def test_a_first_message_the_draft_cannot_hold_is_refused(short_draft, first, code, field):
    _, stub, _ = short_draft
    conv = Conversation(stub)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await conv.round(**first)
    assert err.value.code() == code and field in err.value.details()
    await conv.close()


async def test_a_later_token_outside_the_vocabulary_is_refused(short_draft):
    _, stub, _ = short_draft
    conv = Conversation(stub)
    await conv.round(append_tokens=[1, 2, 3], gamma=2)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await conv.round(append_tokens=[10_000], discard=1, gamma=2)
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE and "append_tokens" in err.value.details()
    await conv.close()


@pytest.fixture(scope="module")
async def target_with_short_draft(tiny_models, short_draft):
    draft_app, _, _ = short_draft
    target = create_target(TargetConfig.from_namespace({
        "model": str(tiny_models.target), "port": 0, "draft_address": draft_app.address,
        "speculation_min_acceptance": 0.0, "draft_timeout_ms": 5000.0,
        "speculative_disable_by_batch_size": 64}, env={}))
    await target.start()
    channel = grpc.aio.insecure_channel(target.address)
    yield model_pb2_grpc.TargetModelStub(channel)
    await channel.close()
    await target.stop(0)


def generate_request(prompt, n, **sampling):
    req = gen.GenerateRequest(prompt=gen.Prompt(tokens=gen.TokenIds(ids=prompt)),
                              sampling=gen.SamplingParams(max_new_tokens=n, ignore_eos=True, **sampling))
    req.speculation.enabled = True
    return req


async def run(stub, req):
    chunks = [c async for c in stub.Generate(req)]
    return [t for c in chunks for t in c.token_ids], chunks[-1]


async def test_a_target_stops_speculating_before_its_drafts_context_ends(target_with_short_draft, reference_model):
    stub = target_with_short_draft
    prompt = [5, 6, 7, 8, 9]
    tokens, last = await run(stub, generate_request(prompt, 60))
    assert tokens == hf_greedy(reference_model, prompt, 60)
    s = last.speculation
    # Then it proposes by n-gram lookup on the target (no context to run out of).
    assert s.rounds > 0 and "the draft's context (32 tokens) is full" in s.fallback_reason
    assert s.method == gen.SPECULATION_METHOD_NGRAM
    # A prompt longer than the draft's context: the draft is not asked.
    long_prompt = [(3 * i) % 300 + 1 for i in range(40)]
    tokens, last = await run(stub, generate_request(long_prompt, 5))
    assert tokens == hf_greedy(reference_model, long_prompt, 5)
    assert "context" in last.speculation.fallback_reason
    # A request that names the draft model gets it alone: no lookup, no speculation past its context.
    pinned = generate_request(long_prompt, 5)
    pinned.speculation.method = gen.SPECULATION_METHOD_DRAFT_MODEL
    tokens, last = await run(stub, pinned)
    assert tokens == hf_greedy(reference_model, long_prompt, 5)
    assert last.speculation.rounds == 0 and "context" in last.speculation.disabled_reason


class LyingDraft(model_pb2_grpc.DraftModelServicer):
    """A small real draft server whose proposals the target must not score:
    ids outside the vocabulary, or more tokens than it was asked for."""

    def __init__(self, vocab, fault):
        self.vocab, self.fault = vocab, fault

    async def Propose(self, request_iterator, context):
        async for msg in request_iterator:
            if self.fault == "id":
                yield model_pb2.ProposeResponse(tokens=[self.vocab + 7] * msg.gamma)
            else:
                yield model_pb2.ProposeResponse(tokens=[1] * (msg.gamma + 3))

    async def GetInfo(self, request, context):
        return model_pb2.ModelInfo(max_context=256, vocab_size=self.vocab)


@pytest.mark.parametrize("fault, reason", [("id", "outside the vocabulary"), ("count", "when asked for")])
async def test_a_draft_proposing_what_cannot_be_scored_is_dropped_not_scored(
        target_with_short_draft, tiny_models, reference_model, fault, reason):
    server = grpc.aio.server()
    model_pb2_grpc.add_DraftModelServicer_to_server(LyingDraft(tiny_models.vocab_size, fault), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        stub = target_with_short_draft
        lying = generate_request([1, 2, 3], 10)
        lying.draft_address = f"127.0.0.1:{port}"
        plain = generate_request([4, 5, 6], 10)
        plain.speculation.enabled = False
        (tokens, last), (mate, _) = await asyncio.gather(run(stub, lying), run(stub, plain))
        assert tokens == hf_greedy(reference_model, [1, 2, 3], 10)
        assert reason in last.speculation.fallback_reason
        assert mate == hf_greedy(reference_model, [4, 5, 6], 10)
    finally:
        await server.stop(0)
