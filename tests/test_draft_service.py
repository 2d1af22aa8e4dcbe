"""The draft-model service's Propose stream, over a real channel, with tiny models."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from services.common.stubs import generation_pb2 as gen
from services.common.stubs import model_pb2_grpc
from services.speculative.distributions import distribution_of
from services.draft.config import DraftConfig
from services.draft.main import create_server
from transformers import LlamaForCausalLM
from tests.conftest import hf_greedy
from tests.helpers import Conversation


@pytest.fixture(scope="module")
async def draft(tiny_models):
    app = create_server(DraftConfig.from_namespace({"model": str(tiny_models.draft), "port": 0}, env={}))
    await app.start()
    channel = grpc.aio.insecure_channel(app.address)
    yield model_pb2_grpc.DraftModelStub(channel)
    await channel.close()
    await app.stop(0)


@pytest.fixture(scope="module")
def draft_reference(tiny_models):
    return LlamaForCausalLM.from_pretrained(tiny_models.draft).eval()


async def test_rounds_keep_the_cache_and_roll_back(draft, draft_reference):
    ctx = [5, 6, 7, 8]
    conv = Conversation(draft)
    r1 = await conv.round(append_tokens=ctx, gamma=4)
    assert list(r1.tokens) == hf_greedy(draft_reference, ctx, 4)
    assert not r1.distributions  # greedy: no distributions unless asked
    # The target accepted 2 of 4 and corrected the third with its own token 99.
    ctx = ctx + list(r1.tokens[:2]) + [99]
    r2 = await conv.round(append_tokens=[99], discard=2, gamma=3)
    assert list(r2.tokens) == hf_greedy(draft_reference, ctx, 3)
    # All 3 accepted plus a bonus token 17.
    ctx = ctx + list(r2.tokens) + [17]
    r3 = await conv.round(append_tokens=[17], discard=0, gamma=5)
    assert list(r3.tokens) == hf_greedy(draft_reference, ctx, 5)
    await conv.close()


async def test_sampled_proposals_carry_distributions_when_asked(draft, tiny_models):
    conv = Conversation(draft)
    r = await conv.round(append_tokens=[1, 2, 3], gamma=3, want_probs=True,
                         sampling=gen.SamplingParams(temperature=0.8, top_k=20, seed=7))
    assert len(r.tokens) == 3 and len(r.distributions) == 3
    for token, d in zip(r.tokens, r.distributions):
        q = distribution_of(d, tiny_models.vocab_size)
        assert len(d.ids) == 20  # top-k truncated: sent sparse, exactly
        assert torch.isclose(q.sum(), torch.tensor(1.0), atol=1e-5)
        assert q[token] > 0
    await conv.close()


async def test_many_streams_batched_each_matches_solo(draft, draft_reference):
    contexts = [[3 + i, 9, 27 + i] for i in range(10)]
    convs = [Conversation(draft) for _ in contexts]
    replies = await asyncio.gather(*[c.round(append_tokens=ctx, gamma=4) for c, ctx in zip(convs, contexts)])
    for ctx, r in zip(contexts, replies):
        assert list(r.tokens) == hf_greedy(draft_reference, ctx, 4)
    for c in convs:
        await c.close()


@pytest.mark.parametrize("first, second, field", [
    ({"append_tokens": [1, 2], "gamma": 0}, None, "gamma"),
    ({"append_tokens": [1, 2], "gamma": 17}, None, "gamma"),
    ({"append_tokens": [], "gamma": 2}, None, "append_tokens"),
    ({"append_tokens": [1, 2], "gamma": 2}, {"append_tokens": [3], "discard": 5, "gamma": 2}, "discard"),
])
async def test_bad_messages_end_the_stream_with_invalid_argument(draft, first, second, field):
    conv = Conversation(draft)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await conv.round(**first)
        await conv.round(**second)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()
    await conv.close()


@pytest.mark.parametrize("temperature", [1e-39, 1.4e-45, 3.4e38])
async def test_extreme_temperatures_are_served_and_the_draft_keeps_serving(draft, draft_reference, temperature):
    ctx = [5, 6, 7, 8]
    conv = Conversation(draft)
    r = await conv.round(append_tokens=ctx, gamma=4, sampling=gen.SamplingParams(temperature=temperature, seed=3))
    assert len(r.tokens) == 4
    if temperature < 1e-30:
        assert list(r.tokens) == hf_greedy(draft_reference, ctx, 4)  # all of the mass on the argmax
    await conv.close()
    other = Conversation(draft)
    r = await other.round(append_tokens=[9, 10], gamma=2)
    assert list(r.tokens) == hf_greedy(draft_reference, [9, 10], 2)
    await other.close()


async def test_sampled_proposals_are_drawn_with_the_streams_seed_and_send_no_distributions(draft):
    """The target verifies against the same Gumbel noise (its seed), so the
    draft's distributions are not needed unless asked for; the same seed gives
    the same proposals."""
    replies = []
    for _ in range(2):
        conv = Conversation(draft)
        replies.append(await conv.round(append_tokens=[1, 2, 3], gamma=4,
                                        sampling=gen.SamplingParams(temperature=1.0, seed=11)))
        await conv.close()
    assert not replies[0].distributions and len(replies[0].tokens) == 4
    assert list(replies[0].tokens) == list(replies[1].tokens)


async def test_the_ngram_method_proposes_what_followed_the_sequences_end_earlier(draft):
    conv = Conversation(draft)
    ctx = [5, 6, 7, 8, 9, 10, 11, 5, 6, 7]
    r1 = await conv.round(append_tokens=ctx, gamma=3, method=gen.SPECULATION_METHOD_NGRAM)
    assert list(r1.tokens) == [8, 9, 10]  # [5, 6, 7] occurred before, followed by these
    # The target kept 1 (8) and corrected the next with 40: [..., 7, 8, 40] occurs nowhere before.
    r2 = await conv.round(append_tokens=[40], discard=2, gamma=3)
    assert list(r2.tokens) == []
    # Nothing was proposed, so nothing is kept (discard = gamma); [9, 10] recurs: what followed it comes back.
    r3 = await conv.round(append_tokens=[9, 10], discard=3, gamma=3)
    assert list(r3.tokens) == [11, 5, 6]
    await conv.close()


async def test_the_ngram_method_refuses_distributions_and_bad_ids(draft, tiny_models):
    conv = Conversation(draft)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await conv.round(append_tokens=[1, 2, 1], gamma=2, want_probs=True, method=gen.SPECULATION_METHOD_NGRAM)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "want_probs" in err.value.details()
    await conv.close()
    conv = Conversation(draft)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await conv.round(append_tokens=[1, tiny_models.vocab_size], gamma=2, method=gen.SPECULATION_METHOD_NGRAM)
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
    await conv.close()


async def test_an_unknown_method_is_refused_not_taken_for_the_draft_model(draft):
    conv = Conversation(draft)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await conv.round(append_tokens=[1, 2, 3], gamma=2, method=7)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown method 7" in err.value.details()
    await conv.close()
