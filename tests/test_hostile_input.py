"""Admin and config inputs checked as strictly as requests; prompts too big for
the context refused before tokenizing, and tokenized off the event loop;
documented fields that do what they say (echo_prompt, the draft's Configure).

In-process services on port 0 with the tiny models; after every refusal the
service is still SERVING and still serves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import threading
import typing

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from monitor.config import MonitorConfig
from router.config import RouterConfig
from router.main import create_server as create_router
from scaler.config import ScalerConfig
from services.common.config import ConfigError
from services.common.stubs import generation_pb2 as gen
from services.common.stubs import model_pb2, model_pb2_grpc, router_pb2, router_pb2_grpc, stats_pb2
from services.draft.config import DraftConfig
from services.draft.main import create_server as create_draft
from services.target.config import TargetConfig
from services.target.main import create_server as create_target
from tests.conftest import eventually

SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
async def suite(tiny_models):
    draft = create_draft(DraftConfig.from_namespace({"model": str(tiny_models.draft), "port": 0, "warmup": False},
                                                    env={}))
    await draft.start()
    target = create_target(TargetConfig.from_namespace({"model": str(tiny_models.target), "port": 0,
                                                        "warmup": False, "draft_address": draft.address}, env={}))
    await target.start()
    router = create_router(RouterConfig.from_namespace({"port": 0, "http_port": 0, "targets": [target.address],
                                                        "load_interval_s": 0.1}, env={}))
    await router.start()
    channels = [grpc.aio.insecure_channel(a.address) for a in (target, draft, router)]
    stubs = (model_pb2_grpc.TargetModelStub(channels[0]), model_pb2_grpc.DraftModelStub(channels[1]),
             router_pb2_grpc.RouterStub(channels[2]))

    async def routable():
        listed = (await stubs[2].ListInstances(router_pb2.ListInstancesRequest())).instances
        return listed and listed[0].health == router_pb2.INSTANCE_HEALTH_SERVING

    await eventually(routable, what="the router to see its target serving")
    yield (target, draft, router), stubs, channels
    for channel in channels:
        await channel.close()
    await router.stop(0)
    await target.stop(0)
    await draft.stop(0)


def request(text=None, ids=(5, 6, 7), n=4, **kw):
    prompt = gen.Prompt(text=text) if text is not None else gen.Prompt(tokens=gen.TokenIds(ids=list(ids)))
    return gen.GenerateRequest(prompt=prompt, sampling=gen.SamplingParams(max_new_tokens=n, ignore_eos=True), **kw)


async def generate(stub, req, **kw):
    return [c async for c in stub.Generate(req, **kw)]


async def still_serving(channels, stubs) -> None:
    for channel in channels:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == SERVING
    chunks = await generate(stubs[0], request(n=3))
    assert chunks[-1].finish_reason == gen.FINISH_REASON_LENGTH and sum(len(c.token_ids) for c in chunks) == 3


# -- 11(b): Configure is checked as strictly as a request ---------------------------
ENGINE_BAD = [
    {"max_wait_ms": math.inf}, {"max_wait_ms": -math.inf}, {"max_wait_ms": math.nan}, {"max_wait_ms": -1.0},
    {"max_wait_ms": 1e300}, {"max_batch_size": 0}, {"max_batch_size": -5}, {"max_batch_size": 2**31 - 1},
    {"max_batch_tokens": -1}, {"max_queue": -1},
]
TARGET_BAD = ENGINE_BAD + [
    {"draft_address": "not an address"}, {"draft_address": "host:\u00b2"}, {"draft_address": "host:0"},
    {"draft_address": "a b:50071"}, {"draft_address": ":50071"}, {"draft_address": "[::1]:99999"},
    {"gamma": 0}, {"gamma": 17}, {"gamma": -1}, {"gamma_min": 5}, {"gamma_max": 2}, {"gamma_max": 2**31 - 1},
]


@pytest.mark.parametrize("fields", TARGET_BAD, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
async def test_target_configure_refuses_bad_values_and_changes_nothing(suite, fields):
    apps, stubs, channels = suite
    before = await stubs[0].GetInfo(model_pb2.GetInfoRequest())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs[0].Configure(model_pb2.ConfigureRequest(**fields))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert next(iter(fields)).split("_")[0] in err.value.details() and "Traceback" not in err.value.details()
    assert (await stubs[0].GetInfo(model_pb2.GetInfoRequest())).settings == before.settings
    await still_serving(channels, stubs)


@pytest.mark.parametrize("fields", ENGINE_BAD + [{"gamma": 4}, {"draft_address": "127.0.0.1:1"},
                                                 {"speculation_default": True}, {"gamma_min": 1}],
                         ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
async def test_draft_configure_refuses_bad_values_and_speculation_knobs(suite, fields):
    apps, stubs, channels = suite
    before = await stubs[1].GetInfo(model_pb2.GetInfoRequest())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs[1].Configure(model_pb2.ConfigureRequest(**fields))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (await stubs[1].GetInfo(model_pb2.GetInfoRequest())).settings == before.settings
    await still_serving(channels, stubs)


async def test_configure_applies_good_values(suite):
    (target, draft, _), stubs, channels = suite
    reply = await stubs[0].Configure(model_pb2.ConfigureRequest(max_wait_ms=60000.0, gamma_max=16,
                                                                draft_address="localhost:50071"))
    assert reply.settings.max_wait_ms == 60000.0 and reply.settings.gamma_max == 16
    assert reply.settings.draft_address == "localhost:50071"
    reply = await stubs[0].Configure(model_pb2.ConfigureRequest(max_wait_ms=2.0, gamma_max=8,
                                                                draft_address=draft.address))
    assert reply.settings.draft_address == draft.address
    reply = await stubs[1].Configure(model_pb2.ConfigureRequest(max_wait_ms=0.0))
    assert reply.settings.max_wait_ms == 0.0
    await still_serving(channels, stubs)


@pytest.mark.parametrize("spec", [
    dict(address="not an address"), dict(address="h:\u00b2"), dict(address="h:1", id="x" * 300),
    dict(address="h:1", pool=" padded "), dict(address="h:1", labels={f"k{i}": "v" for i in range(65)}),
    dict(address="h:1", labels={"k": "v" * 300}),
])
async def test_register_instance_refuses_bad_specs(suite, spec):
    apps, stubs, channels = suite
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stubs[2].RegisterInstance(router_pb2.RegisterInstanceRequest(
            instance=router_pb2.InstanceSpec(role=stats_pb2.ROLE_TARGET, **spec)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len((await stubs[2].ListInstances(router_pb2.ListInstancesRequest())).instances) == 1
    await still_serving(channels, stubs)


def _float_fields(cls):
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if hints[f.name] is float]


CONFIGS = [TargetConfig, DraftConfig, RouterConfig, MonitorConfig, ScalerConfig]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_float_of_every_config_must_be_finite(cls):
    names = _float_fields(cls)
    assert names
    for name in names:
        for value in (math.nan, math.inf, -math.inf):
            with pytest.raises(ConfigError, match=name):
                cls.from_namespace({name: value}, env={})
        with pytest.raises(ConfigError, match=name):
            cls.from_namespace({}, env={cls.env_names(name)[0]: "nan"})
    if "windows_s" in {f.name for f in dataclasses.fields(cls)}:
        with pytest.raises(ConfigError, match="windows_s"):
            cls.from_namespace({"windows_s": [10.0, math.nan]}, env={})


@pytest.mark.parametrize("cls,values", [
    (TargetConfig, {"draft_address": "not an address"}), (TargetConfig, {"draft_timeout_ms": 0.0}),
    (TargetConfig, {"draft_hold_ms": -1.0}), (TargetConfig, {"speculation_min_acceptance": 1.5}),
    (TargetConfig, {"speculative_disable_by_batch_size": -1}), (TargetConfig, {"max_wait_ms": 1e9}),
    (DraftConfig, {"threads": -1}), (DraftConfig, {"max_context": -1}), (DraftConfig, {"metrics_window_s": 0.0}),
    (ScalerConfig, {"router": "nowhere"}), (ScalerConfig, {"monitor": "h:\u00b2"}),
    (MonitorConfig, {"router": "not an address"}), (RouterConfig, {"targets": ["h:\u00b2"]}),
])
def test_configs_refuse_values_that_make_no_sense(cls, values):
    with pytest.raises(ConfigError, match=next(iter(values))):
        cls.from_namespace(values, env={})


# -- 11(e): prompts too long for the context ----------------------------------------
async def test_a_huge_prompt_is_refused_before_tokenizing_by_target_and_router(suite, monkeypatch):
    from services.common.validation import MAX_PROMPT_BYTES

    (target, _, router), stubs, channels = suite
    encoded = []
    real = target.prompts
    monkeypatch.setattr(real, "_tokenizer", _Counting(real._tokenizer, encoded))
    huge = "x" * (5 * 1024 * 1024)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await generate(stubs[2], request(text=huge))
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert str(MAX_PROMPT_BYTES) in err.value.details() and "prompt.text" in err.value.details()
    # Within llmesh's bound but beyond what this context holds: the target refuses, naming its limit.
    long = "é" * (real.max_bytes // 2 + 1)
    for stub in (stubs[0], stubs[2]):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate(stub, request(text=long))
        assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
        assert str(real.max_bytes) in err.value.details() and "prompt.text" in err.value.details()
    assert encoded == []
    # Beyond what a server takes at all: refused by grpc before parsing.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await generate(stubs[2], request(text="y" * (9 * 1024 * 1024)))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Token prompts and resume tokens have a bound too.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await generate(stubs[2], request(ids=[1] * (600 * 1024)))
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
    await still_serving(channels, stubs)


async def test_text_is_tokenized_off_the_event_loop(suite, monkeypatch):
    """The tokenizer is held inside encode() until a health check has been
    answered: on the event loop, that answer could never come. (Texts up to
    ``inline_chars`` are tokenized on the loop: cheaper than the hand-off;
    here every text is longer.)"""
    (target, _, _), stubs, channels = suite
    entered, release = threading.Event(), threading.Event()
    real = target.prompts._tokenizer
    monkeypatch.setattr(target.prompts, "inline_chars", 0)

    class Gated:
        def encode(self, text, **kw):
            entered.set()
            if not release.wait(30):
                raise AssertionError("the health check was not answered while tokenizing")
            return real.encode(text, **kw)

    monkeypatch.setattr(target.prompts, "_tokenizer", Gated())
    call = asyncio.ensure_future(generate(stubs[0], request(text="The meaning of")))
    assert await asyncio.to_thread(entered.wait, 30)
    reply = await health_pb2_grpc.HealthStub(channels[0]).Check(health_pb2.HealthCheckRequest())
    assert reply.status == SERVING
    release.set()
    chunks = await call
    assert chunks[-1].finish_reason == gen.FINISH_REASON_LENGTH


async def test_health_list_and_both_reflection_versions_answer_on_every_service(suite):
    """grpc.health.v1 List names every service a server reports on (grpcio leaves it unimplemented, which
    reached clients as INTERNAL); reflection answers as grpc.reflection.v1 (what Node's tooling asks) as
    well as v1alpha."""
    from grpc_reflection.v1alpha import reflection_pb2

    apps, stubs, channels = suite
    for channel, service in zip(channels, ("llmesh.v1.TargetModel", "llmesh.v1.DraftModel", "llmesh.v1.Router")):
        listed = await health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest())
        assert listed.statuses[""].status == SERVING and listed.statuses[service].status == SERVING
        for version in ("v1", "v1alpha"):
            info = channel.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                                         request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                         response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
            replies = [r async for r in info(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))]
            names = {s.name for s in replies[0].list_services_response.service}
            assert {service, "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"} <= names


def test_the_byte_bound_is_sound_for_the_tokenizer(tiny_models):
    """No text of the corpus the tokenizer knows needs fewer tokens than its
    bytes over the per-token bound, so nothing that fits is ever refused."""
    from pydoc_data.topics import topics

    from services.serving.prompts import PromptEncoder, max_token_bytes

    tok = tiny_models.tokenizer
    per_token = max_token_bytes(tok)
    encoder = PromptEncoder(tok, 64, per_token)
    for text in list(topics.values())[:60] + ["“quoted” — ünïcödé 漢字 🙂" * 5, " " * 300, "\n\t" * 100]:
        ids = tok.encode(text, add_special_tokens=False)
        assert len(text.encode("utf-8")) <= len(ids) * per_token
        if len(ids) <= 64:
            encoder.check_size(text)  # fits: never refused


async def test_short_prompts_are_tokenized_on_the_loop_and_long_ones_on_a_worker_thread(tiny_models):
    import threading

    from services.serving.prompts import INLINE_CHARS, PromptEncoder, max_token_bytes

    tok, threads = tiny_models.tokenizer, []

    class Recording:
        def encode(self, text, **kw):
            threads.append(threading.get_ident())
            # Not warned about the model's length: the size was checked, and a refused prompt is the client's.
            assert kw.pop("verbose") is False
            return tok.encode(text, **kw)

    encoder = PromptEncoder(Recording(), 1 << 20, max_token_bytes(tok))
    assert encoder.inline_chars == INLINE_CHARS
    short, long = "hello world", "word " * (INLINE_CHARS // 5 + 1)
    assert await encoder.encode(short) == tok.encode(short, add_special_tokens=False)
    assert await encoder.encode(long) == tok.encode(long, add_special_tokens=False)
    assert threads[0] == threading.get_ident() and threads[1] != threading.get_ident()


class _Counting:
    def __init__(self, tokenizer, calls):
        self._tokenizer, self._calls = tokenizer, calls

    def encode(self, text, **kw):
        self._calls.append(len(text))
        return self._tokenizer.encode(text, **kw)


# -- 8: fields that do what they say ----------------------------------------------
async def test_echo_prompt_leads_the_first_chunk(suite, tiny_models):
    apps, stubs, channels = suite
    tok = tiny_models.tokenizer
    for stub in (stubs[0], stubs[2]):
        for req, prompt_text in ((request(text="The meaning of", n=5), "The meaning of"),
                                 (request(ids=[40, 41, 42], n=5), tok.decode([40, 41, 42]))):
            plain = await generate(stub, req)
            req.echo_prompt = True
            echoed = await generate(stub, req)
            assert echoed[0].text == prompt_text + plain[0].text
            assert [c.text for c in echoed[1:]] == [c.text for c in plain[1:]]
            assert [t for c in echoed for t in c.token_ids] == [t for c in plain for t in c.token_ids]


async def test_max_new_tokens_0_scores_the_prompt(suite, tiny_models):
    """max_new_tokens 0 with echo_prompt / prompt_logprobs: one chunk with the prompt, no token; alone, refused."""
    apps, stubs, channels = suite
    ids = [40, 41, 42, 43]
    for stub in (stubs[0], stubs[2]):
        req = request(ids=ids, n=1)
        req.sampling.max_new_tokens = 0
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await generate(stub, req)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "echo_prompt" in bad.value.details()
        req.echo_prompt, req.prompt_logprobs = True, True
        chunks = await generate(stub, req)
        assert [c.text for c in chunks] == [tiny_models.tokenizer.decode(ids)]
        assert not chunks[0].token_ids and not chunks[0].logprobs
        assert [e.token_id for e in chunks[0].prompt_logprobs] == ids
        assert chunks[0].finish_reason == gen.FINISH_REASON_LENGTH
        assert (chunks[0].usage.prompt_tokens, chunks[0].usage.completion_tokens) == (len(ids), 0)
    # Nothing is generated, so nothing is counted as generated; and the prompt may fill the context.
    metrics = apps[0].require_loaded().engine.metrics
    generated = metrics.counters["tokens_generated_total"]
    max_context = (await stubs[0].GetInfo(model_pb2.GetInfoRequest())).max_context
    req = request(ids=[40] * max_context, n=1)
    req.sampling.max_new_tokens, req.prompt_logprobs = 0, True
    chunks = await generate(stubs[2], req)
    assert len(chunks[0].prompt_logprobs) == max_context and not chunks[0].token_ids
    assert metrics.counters["tokens_generated_total"] == generated
    req.sampling.max_new_tokens = 1  # generating needs room for a token
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await generate(stubs[2], req)
    assert bad.value.code() == grpc.StatusCode.OUT_OF_RANGE and f"at most {max_context - 1}" in bad.value.details()


async def test_a_resumed_fit_context_stream_that_filled_the_context_ends_as_length(suite):
    """The router resumes a broken stream with the tokens it already sent; with fit_context, a stream that broke
    right after its last token left no room, and the resumed attempt was refused OUT_OF_RANGE, not finished."""
    apps, stubs, channels = suite
    max_context = (await stubs[0].GetInfo(model_pb2.GetInfoRequest())).max_context
    req = request(ids=[40] * (max_context - 3), n=16)
    req.sampling.fit_context = True
    req.resume_tokens.extend([41, 42, 43])
    chunks = await generate(stubs[0], req)
    assert [c.finish_reason for c in chunks] == [gen.FINISH_REASON_LENGTH] and not chunks[0].token_ids
    assert chunks[0].usage.completion_tokens == 3


async def test_limits_on_request_sizes(suite):
    apps, stubs, channels = suite
    for stub in (stubs[0], stubs[2]):
        for req, field in ((request(request_id="r" * 257), "request_id"),
                           (request(request_id="a\nb\x00c"), "request_id"),  # would forge log lines
                           (request(), "sampling.stop")):
            if field == "sampling.stop":
                req.sampling.stop.append("s" * 1025)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await generate(stub, req)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()
    chunks = await generate(stubs[2], request(request_id="r" * 256))
    assert chunks[-1].request_id == "r" * 256
    await still_serving(channels, stubs)


async def test_a_later_draft_round_with_a_token_outside_the_vocabulary(suite, tiny_models):
    """Found by tests/test_fuzz.py: such a round reached the engine and came
    back INTERNAL; it is OUT_OF_RANGE, and the draft goes on serving."""
    apps, stubs, channels = suite
    for bad in (-2**31, -1, tiny_models.vocab_size):
        call = stubs[1].Propose()
        await call.write(model_pb2.ProposeRequest(request_id="oov", append_tokens=[5, 6, 7], gamma=3,
                                                  sampling=gen.SamplingParams(temperature=0.8, top_k=5, seed=1)))
        assert len((await call.read()).tokens) == 3
        await call.write(model_pb2.ProposeRequest(append_tokens=[bad], discard=1, gamma=3))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE and "append_tokens" in err.value.details()
    await still_serving(channels, stubs)
