"""Speculative decoding across services, over real gRPC channels, with tiny models.

The draft runs as its own service; the target verifies its proposals. Greedy
output must equal target-only output token for token, for any draft; sampled
output must have the target's distribution; a draft that dies mid-request
must not change the answer.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
import pytest
from scipy.stats import chi2_contingency

from services.common.stubs import generation_pb2 as gen
from services.common.stubs import model_pb2_grpc
from services.draft.config import DraftConfig
from services.draft.main import create_server as create_draft
from services.target.config import TargetConfig
from services.target.main import create_server as create_target
from tests.conftest import hf_greedy
from tests.helpers import spec_request, run_stream


async def start_draft(model_dir):
    app = create_draft(DraftConfig.from_namespace({"model": str(model_dir), "port": 0}, env={}))
    await app.start()
    return app


@pytest.fixture(scope="module")
async def suite(tiny_models):
    random_draft = await start_draft(tiny_models.draft)
    perfect_draft = await start_draft(tiny_models.target)  # the target as its own draft: all accepted
    target = create_target(TargetConfig.from_namespace({
        "model": str(tiny_models.target), "port": 0, "max_batch_size": 64, "num_slots": 64,
        "draft_address": random_draft.address, "speculation_min_acceptance": 0.0,
        "speculative_disable_by_batch_size": 64, "draft_timeout_ms": 5000.0}, env={}))
    await target.start()
    channel = grpc.aio.insecure_channel(target.address)
    yield model_pb2_grpc.TargetModelStub(channel), random_draft, perfect_draft, target
    await channel.close()
    for app in (target, random_draft, perfect_draft):
        await app.stop(0)


async def test_greedy_speculation_equals_target_only_for_a_random_draft(suite, reference_model):
    stub, *_ = suite
    prompts = [[(11 * i + j) % 350 + 1 for j in range(2 + i % 7)] for i in range(16)]
    jobs = []
    for i, p in enumerate(prompts):
        gamma = 1 + i % 8
        jobs.append(run_stream(stub, spec_request(p, 12, gamma=gamma)))
        jobs.append(run_stream(stub, spec_request(p, 12, spec=False)))  # batched with plain requests
    results = await asyncio.gather(*jobs)
    for i, p in enumerate(prompts):
        (spec_tokens, last), (plain_tokens, _) = results[2 * i], results[2 * i + 1]
        assert spec_tokens == plain_tokens == hf_greedy(reference_model, p, 12)
        assert last.speculation.rounds > 0 and last.speculation.proposed_tokens > 0


async def test_perfect_draft_is_fully_accepted_and_saves_rounds(suite, reference_model):
    stub, _, perfect, _ = suite
    prompt = [3, 14, 15, 92, 65]
    tokens, last = await run_stream(stub, spec_request(prompt, 24, gamma=4, draft=perfect.address))
    assert tokens == hf_greedy(reference_model, prompt, 24)
    s = last.speculation
    assert s.accepted_tokens == s.proposed_tokens > 0
    # 24 tokens: 1 from the prefill, 4 rounds of gamma 4 + bonus, then a round
    # whose gamma is capped by the remaining budget (2 + bonus).
    assert s.rounds == 5 and list(s.accepted_per_position) == [5, 5, 4, 4]
    assert s.mean_accepted_length == pytest.approx((s.accepted_tokens + s.rounds) / s.rounds)


async def test_adaptive_gamma_grows_when_everything_is_accepted(suite):
    stub, _, perfect, _ = suite
    _, last = await run_stream(stub, spec_request([1, 2, 3], 40, draft=perfect.address))
    assert len(last.speculation.accepted_per_position) > 4  # started at gamma 4, grew


async def test_killing_the_draft_mid_request_changes_nothing(suite, tiny_models, reference_model):
    stub, *_ = suite
    doomed = await start_draft(tiny_models.draft)
    prompt = [7, 7, 7, 8]
    call = stub.Generate(spec_request(prompt, 48, gamma=2, draft=doomed.address))
    tokens = []
    async for chunk in call:
        tokens += chunk.token_ids
        if len(tokens) >= 4 and doomed is not None:
            await doomed.stop(0)
            doomed = None
        last = chunk
    assert tokens == hf_greedy(reference_model, prompt, 48)
    assert "draft unavailable" in last.speculation.fallback_reason
    assert last.speculation.method == gen.SPECULATION_METHOD_NGRAM


async def test_an_unreachable_draft_falls_back_to_ngram_or_to_plain_decoding_when_pinned(suite, reference_model):
    stub, *_ = suite
    from tests.conftest import free_port

    prompt = [4, 5, 6]
    gone = f"127.0.0.1:{free_port()}"
    tokens, last = await run_stream(stub, spec_request(prompt, 10, draft=gone))
    assert tokens == hf_greedy(reference_model, prompt, 10)
    assert "draft unavailable" in last.speculation.fallback_reason
    assert last.speculation.method == gen.SPECULATION_METHOD_NGRAM
    pinned = spec_request(prompt, 10, draft=gone, method=gen.SPECULATION_METHOD_DRAFT_MODEL)
    tokens, last = await run_stream(stub, pinned)
    assert tokens == hf_greedy(reference_model, prompt, 10)
    assert "draft" in last.speculation.disabled_reason and last.speculation.fallback_reason == ""


async def test_sampled_speculation_keeps_the_target_distribution(suite):
    """Pairs (t1, t2) with top-k 3 sampling: t2 goes through one speculative round
    with a draft whose top-3 differs; its joint histogram must match target-only."""
    stub, *_ = suite
    prompt = [21, 22, 23]
    n = 300

    async def histogram(spec: bool, seed0: int) -> Counter:
        out = Counter()
        for start in range(0, n, 50):
            results = await asyncio.gather(*[
                run_stream(stub, spec_request(prompt, 2, spec=spec, gamma=1, temperature=1.0, top_k=3, seed=seed0 + s))
                for s in range(start, start + 50)])
            out.update(tuple(tokens) for tokens, _ in results)
        return out

    with_spec, without = await histogram(True, 10_000), await histogram(False, 50_000)
    cells = sorted(set(with_spec) | set(without))
    table = [[with_spec[c] for c in cells], [without[c] for c in cells]]
    assert chi2_contingency(table).pvalue > 1e-3


async def test_ngram_speculation_equals_target_only_and_is_accepted_on_a_repeating_text(suite, reference_model):
    stub, *_ = suite
    # The tiny target repeats itself quickly: a lookup in its own output finds what comes next.
    prompt = [7, 3, 9, 7, 3, 9, 7, 3]
    tokens, last = await run_stream(stub, spec_request(prompt, 40, gamma=4, method=gen.SPECULATION_METHOD_NGRAM))
    assert tokens == hf_greedy(reference_model, prompt, 40)
    assert last.speculation.rounds > 0 and last.speculation.accepted_tokens > 0
    seeded = dict(temperature=0.9, seed=11)
    plain, _ = await run_stream(stub, spec_request(prompt, 30, spec=False, **seeded))
    ngram, _ = await run_stream(stub, spec_request(prompt, 30, method=gen.SPECULATION_METHOD_NGRAM, **seeded))
    assert ngram == plain  # the seed contract holds for any proposer


async def test_an_unknown_speculation_method_is_refused(suite):
    stub, *_ = suite
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await run_stream(stub, spec_request([1, 2, 3], 4, method=9))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "method" in err.value.details()
