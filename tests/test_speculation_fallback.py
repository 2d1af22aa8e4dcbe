"""The n-gram fallback end to end, over real gRPC, with tiny models.

A request that does not name its proposal method starts with the draft model
and falls back to n-gram lookup on the target when the draft's acceptance
does not pay, or when it has no draft; its output stays what target-only
decoding gives, token for token.
"""

from __future__ import annotations

import grpc
import pytest

from services.common.stubs import generation_pb2 as gen
from services.common.stubs import model_pb2_grpc
from services.draft.config import DraftConfig
from services.draft.main import create_server as create_draft
from services.target.config import TargetConfig
from services.target.main import create_server as create_target
from tests.conftest import hf_greedy
from tests.helpers import run_stream, spec_request

#: Copy-heavy: the tiny target continues a repeating text by repeating it, so a lookup finds it.
COPY_HEAVY = [7, 3, 9, 7, 3, 9, 7, 3]


async def start_target(tiny_models, **overrides):
    app = create_target(TargetConfig.from_namespace({
        "model": str(tiny_models.target), "port": 0, "metrics_port": 0, "warmup": False, **overrides}, env={}))
    await app.start()
    channel = grpc.aio.insecure_channel(app.address)
    return app, channel, model_pb2_grpc.TargetModelStub(channel)


def fallbacks(app, cause: str) -> float:
    """The target's llmesh:spec_decode_num_fallbacks_total for ``cause``."""
    labels = {"model_name": app.loaded.model_name, "instance": app.instance_id, "role": "target", "cause": cause}
    return app.loaded.engine.observer.registry.get_sample_value("llmesh:spec_decode_num_fallbacks_total", labels) or 0


@pytest.fixture(scope="module")
async def wrong_draft(tiny_models):
    """A draft whose random weights are not the target's: its proposals are ~never accepted."""
    app = create_draft(DraftConfig.from_namespace({"model": str(tiny_models.draft), "port": 0}, env={}))
    await app.start()
    yield app
    await app.stop(0)


async def test_a_draft_that_is_never_right_hands_a_copy_heavy_request_to_ngram(tiny_models, reference_model,
                                                                               wrong_draft):
    # The target's defaults: the cost model decides, a request that does not name its method may fall back.
    target, channel, stub = await start_target(tiny_models, draft_address=wrong_draft.address)
    try:
        tokens, last = await run_stream(stub, spec_request(COPY_HEAVY, 48))
        plain, _ = await run_stream(stub, spec_request(COPY_HEAVY, 48, spec=False))
        assert tokens == plain == hf_greedy(reference_model, COPY_HEAVY, 48)
        s = last.speculation
        assert s.method == gen.SPECULATION_METHOD_NGRAM, s
        assert "acceptance" in s.fallback_reason and s.disabled_reason == ""
        assert s.accepted_tokens > 0  # the lookup's proposals were accepted
        assert fallbacks(target, "low_acceptance") == 1

        # Pinned to the draft model, the same request keeps it: no fallback.
        pinned = spec_request(COPY_HEAVY, 48, method=gen.SPECULATION_METHOD_DRAFT_MODEL)
        tokens, last = await run_stream(stub, pinned)
        assert tokens == plain
        assert last.speculation.method == gen.SPECULATION_METHOD_DRAFT_MODEL
        assert last.speculation.fallback_reason == "" and fallbacks(target, "low_acceptance") == 1

        # Sampled: the lookup's point-mass proposals keep the seeded output what target-only gives.
        seeded = dict(temperature=0.8, top_k=20, seed=5)
        tokens, last = await run_stream(stub, spec_request(COPY_HEAVY, 40, **seeded))
        plain, _ = await run_stream(stub, spec_request(COPY_HEAVY, 40, spec=False, **seeded))
        assert tokens == plain
    finally:
        await channel.close()
        await target.stop(0)


async def test_a_target_without_a_draft_speculates_by_lookup(tiny_models, reference_model):
    target, channel, stub = await start_target(tiny_models)
    try:
        tokens, last = await run_stream(stub, spec_request(COPY_HEAVY, 40))
        assert tokens == hf_greedy(reference_model, COPY_HEAVY, 40)
        s = last.speculation
        assert s.method == gen.SPECULATION_METHOD_NGRAM and s.fallback_reason == "no draft to propose with"
        assert s.rounds > 0 and s.accepted_tokens > 0 and s.draft_wait_ms < 1000
        assert fallbacks(target, "no_draft") == 1
        # Naming ngram: the same lookup, and not a fallback.
        tokens, last = await run_stream(stub, spec_request(COPY_HEAVY, 40, method=gen.SPECULATION_METHOD_NGRAM))
        assert tokens == hf_greedy(reference_model, COPY_HEAVY, 40) and last.speculation.fallback_reason == ""
        # Naming the draft model with no draft: no speculation, as before.
        tokens, last = await run_stream(stub, spec_request(COPY_HEAVY, 8, method=gen.SPECULATION_METHOD_DRAFT_MODEL))
        assert tokens == hf_greedy(reference_model, COPY_HEAVY, 8) and not last.HasField("speculation")
    finally:
        await channel.close()
        await target.stop(0)


async def test_a_request_that_says_how_to_speculate_speculates(tiny_models, reference_model):
    """``llmesh generate --speculative-method ngram`` (or ``--gamma 3``) alone, on
    a target whose default is not to speculate: the request named a method or a
    gamma, so it speculates; ``enabled = false`` still wins (2026-12-01: a new
    user's ``--speculative-method ngram`` printed no speculation at all)."""
    target, channel, stub = await start_target(tiny_models, speculation_default=False)
    try:
        want = hf_greedy(reference_model, COPY_HEAVY, 24)
        by_method = spec_request(COPY_HEAVY, 24, method=gen.SPECULATION_METHOD_NGRAM)
        by_method.speculation.ClearField("enabled")
        by_gamma = spec_request(COPY_HEAVY, 24, gamma=3)
        by_gamma.speculation.ClearField("enabled")
        for req in (by_method, by_gamma):
            tokens, last = await run_stream(stub, req)
            assert tokens == want
            s = last.speculation
            assert s.method == gen.SPECULATION_METHOD_NGRAM and s.rounds > 0 and s.proposed_tokens > 0, s
        plain = spec_request(COPY_HEAVY, 24)
        plain.speculation.ClearField("enabled")  # says nothing: the target's default, off
        off = spec_request(COPY_HEAVY, 24, spec=False, method=gen.SPECULATION_METHOD_NGRAM)
        for req in (plain, off):
            tokens, last = await run_stream(stub, req)
            assert tokens == want and not last.HasField("speculation")
    finally:
        await channel.close()
        await target.stop(0)


def test_fallbacks_are_logged_once_per_cause_every_few_seconds(caplog):
    """A draft that goes away makes every running sequence fall back at once: one line per cause every
    10 s with how many, not one per sequence."""
    import logging

    from services.speculative.speculator import _EveryFewSeconds

    caplog.set_level(logging.INFO, logger="services.speculative.speculator")
    every = _EveryFewSeconds("sequence(s) fell back")
    for now in (0.0, 0.1, 0.2, 3.0):
        every.note("draft_failed", "draft unavailable", now)
    every.note("low_acceptance", "acceptance 0.1", 3.0)
    every.note("draft_failed", "draft unavailable", 10.5)
    assert [r.getMessage() for r in caplog.records] == [
        "1 sequence(s) fell back (draft_failed): draft unavailable",
        "1 sequence(s) fell back (low_acceptance): acceptance 0.1",
        "4 sequence(s) fell back (draft_failed): draft unavailable"]
