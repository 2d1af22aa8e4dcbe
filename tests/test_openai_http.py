"""The router's OpenAI-compatible HTTP front door, through real clients: the
official ``openai`` SDK (async: the router runs on the test's event loop) and
``curl`` for the SSE framing, against a tiny target behind a real router.
Answers are compared with the same request through ``Router.Complete`` and
logprobs with the reference model's own log-softmax."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket

import httpx2 as httpx
import openai
import pytest
import torch

from pydantic import ValidationError

from router.http import schemas, translate
from router.http.app import FrontDoor
from services.common.errors import (DeadlineExceeded, InvalidArgument, NotFound, OutOfRange, Relayed,
                                    ResourceExhausted, Unauthenticated, Unavailable)
from tests.conftest import eventually, free_port
from tests.router_helpers import request, running_router, start_target

MODEL = "target"  # the tiny target's directory name, as GetInfo reports it


@contextlib.asynccontextmanager
async def front_door(targets, **overrides):
    """A router serving HTTP on a free port over ``targets``; yields (app, base_url, stub)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    async with running_router(targets, http_port=port, **overrides) as (app, stub, _):
        if targets:
            async with httpx.AsyncClient() as http:
                async def healthy() -> bool:
                    return (await http.get(f"{url}/health")).status_code == 200

                await eventually(healthy, what="a routable target (/health 200)")
        yield app, url, stub


@pytest.fixture(scope="module")
async def served(tiny_models):
    target = await start_target(tiny_models)
    try:
        async with front_door([target.address]) as (router, url, stub):
            yield router, url, stub, target
    finally:
        await target.stop(0)


def client(url: str, key: str = "x") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


async def grpc_text(stub, text: str, n: int, ignore_eos: bool = False) -> str:
    req = request(text=text, max_new_tokens=n, ignore_eos=ignore_eos)
    return (await stub.Complete(req)).text


async def test_completion_is_the_grpc_answer_whole_and_streamed(served):
    router, url, stub, _ = served
    c = client(url)
    whole = await c.completions.create(model=MODEL, prompt="The meaning of", max_tokens=12, temperature=0)
    assert whole.object == "text_completion" and whole.model == MODEL
    assert whole.choices[0].text == await grpc_text(stub, "The meaning of", 12)
    assert whole.choices[0].finish_reason in ("length", "stop")
    assert whole.usage.completion_tokens >= 1 and whole.usage.prompt_tokens >= 1
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    stream = await c.completions.create(model=MODEL, prompt="The meaning of", max_tokens=12, temperature=0,
                                        stream=True, stream_options={"include_usage": True})
    parts = [chunk async for chunk in stream]
    assert "".join(p.choices[0].text for p in parts if p.choices) == whole.choices[0].text
    assert parts[-1].choices == [] and parts[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [p.choices[0].finish_reason for p in parts if p.choices][-1] == whole.choices[0].finish_reason


async def test_chat_goes_through_the_chat_template(served, tiny_models):
    router, url, stub, _ = served
    c = client(url)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a list?"}]
    templated = tiny_models.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert templated == "system: Be brief.\nuser: What is a list?\nassistant:"
    whole = await c.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == await grpc_text(stub, templated, 10)

    stream = await c.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10,
                                             temperature=0, stream=True)
    parts = [chunk async for chunk in stream]
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == whole.choices[0].message.content
    assert parts[-1].choices[0].finish_reason == whole.choices[0].finish_reason


async def test_completion_logprobs_and_echo_are_the_models_log_softmax(served, reference_model, tiny_models):
    router, url, stub, _ = served
    c = client(url)
    prompt = tiny_models.tokenizer.encode("def f(x): return x")
    # What lm-evaluation-harness asks for a log-likelihood: the prompt's logprobs, echoed, one new token.
    out = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, logprobs=2,
                                     echo=True)
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == len(prompt) + 3 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    with torch.inference_mode():
        ids = prompt + tiny_models.tokenizer.encode(out.choices[0].text[len(tiny_models.tokenizer.decode(prompt)):])
        ref = torch.log_softmax(reference_model(torch.tensor([ids])).logits[0].float(), -1)
    expected = [ref[i - 1, ids[i]].item() for i in range(1, len(prompt) + 3)]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-3)
    for top, chosen in zip(lp.top_logprobs[len(prompt):], lp.token_logprobs[len(prompt):]):
        assert max(top.values()) == pytest.approx(chosen)  # greedy: the chosen token is the most likely
    assert out.choices[0].text.startswith(tiny_models.tokenizer.decode(prompt))


async def test_echo_with_max_tokens_0_scores_the_prompt_and_generates_nothing(served, reference_model, tiny_models):
    """lm-evaluation-harness's loglikelihood request (legacy API): echo, logprobs, max_tokens 0."""
    router, url, stub, _ = served
    c = client(url)
    prompt = tiny_models.tokenizer.encode("def f(x): return x")
    out = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=0, temperature=0, logprobs=1, echo=True)
    choice = out.choices[0]
    assert choice.text == tiny_models.tokenizer.decode(prompt) and choice.finish_reason == "length"
    assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == len(prompt)
    lp = choice.logprobs
    assert len(lp.token_logprobs) == len(prompt) and lp.token_logprobs[0] is None
    with torch.inference_mode():
        ref = torch.log_softmax(reference_model(torch.tensor([prompt])).logits[0].float(), -1)
    assert lp.token_logprobs[1:] == pytest.approx([ref[i - 1, prompt[i]].item() for i in range(1, len(prompt))],
                                                  abs=1e-3)
    # Streamed: the same text in one chunk, and no token after it.
    stream = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, stream=True)
    parts = [p async for p in stream]
    assert "".join(p.choices[0].text for p in parts) == choice.text
    assert parts[-1].choices[0].finish_reason == "length"
    # Without echo there is nothing to return; chat has no prompt to score.
    for call in (c.completions.create(model=MODEL, prompt="hi", max_tokens=0),
                 c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=0)):
        with pytest.raises(openai.BadRequestError) as bad:
            await call
        assert bad.value.body["param"] == "max_tokens" and "got 0" in bad.value.body["message"]


async def test_chat_logprobs_have_top_alternatives(served):
    router, url, stub, _ = served
    out = await client(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=4, temperature=0, logprobs=True, top_logprobs=3,
                                                    extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob


async def test_n_seed_and_stop(served):
    router, url, stub, _ = served
    c = client(url)
    kw = dict(model=MODEL, prompt="class A:", max_tokens=8, temperature=1.0, seed=7, n=3,
              extra_body={"ignore_eos": True})
    first, again = await c.completions.create(**kw), await c.completions.create(**kw)
    assert [ch.index for ch in first.choices] == [0, 1, 2]
    assert [ch.text for ch in first.choices] == [ch.text for ch in again.choices]  # seeded: reproducible
    assert first.usage.completion_tokens == 24
    greedy = await c.completions.create(model=MODEL, prompt="class A:", max_tokens=12, temperature=0,
                                        extra_body={"ignore_eos": True})
    text = greedy.choices[0].text
    stop = text[4:7]
    cut = await c.completions.create(model=MODEL, prompt="class A:", max_tokens=12, temperature=0,
                                     stop=[stop, "\x00never"])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == text[:text.index(stop)]


async def test_models_and_health(served):
    router, url, stub, _ = served
    models = await client(url).models.list()
    assert [m.id for m in models.data] == [MODEL]
    # vLLM's fields: the context a client may fill, and a real creation time.
    assert models.data[0].max_model_len == 256 and models.data[0].created > 1_700_000_000
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{url}/health")).status_code == 200
        # HEAD on the GET routes, as Starlette's own routes answer it (load balancers probe with it).
        for path in ("/health", "/v1/models", f"/v1/models/{MODEL}"):
            head = await http.head(f"{url}{path}")
            assert head.status_code == 200 and head.content == b"", path


async def test_a_browser_page_may_call_it_from_the_allowed_origins(served):
    """CORS, as vLLM's --allowed-origins (default any): the preflight of a chat call from a page on
    another origin succeeds and the answer is marked for it; with a list, other origins are not."""
    _, url, _, target = served
    preflight = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    async with httpx.AsyncClient(timeout=60) as http:
        reply = await http.options(f"{url}/v1/chat/completions", headers=preflight)
        assert reply.status_code == 200 and reply.headers["access-control-allow-origin"] == "*"
        assert "POST" in reply.headers["access-control-allow-methods"]
        answer = await http.post(f"{url}/v1/chat/completions", json=chat_body(), headers={"Origin": preflight["Origin"]})
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "*"
    async with front_door([target.address], http_allowed_origins=["http://ok.example"]) as (_, only, _):
        async with httpx.AsyncClient(timeout=60) as http:
            refused = await http.options(f"{only}/v1/chat/completions", headers=preflight)
            allowed = await http.options(f"{only}/v1/chat/completions",
                                         headers={**preflight, "Origin": "http://ok.example"})
        assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "http://ok.example"


async def test_errors_raise_the_sdks_exceptions_in_the_apis_shape(served):
    router, url, stub, _ = served
    c = client(url)
    with pytest.raises(openai.NotFoundError) as info:
        await c.completions.create(model="gpt-nope", prompt="x", max_tokens=2)
    assert info.value.body["code"] == "not_found" and MODEL in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        await c.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=-1)
    assert info.value.body["param"] == "temperature" and info.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as info:  # the target's own check: the context is 256 tokens
        await c.completions.create(model=MODEL, prompt="x", max_tokens=100000)
    assert "context" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        await c.completions.create(model=MODEL, prompt=[], max_tokens=2)
    assert info.value.body["param"] == "prompt"
    async with httpx.AsyncClient() as http:
        reply = await http.post(f"{url}/v1/completions", content=b"{not json")
    assert reply.status_code == 400 and set(reply.json()["error"]) == {"message", "type", "param", "code"}


async def test_a_bearer_token_is_required_as_on_grpc(tiny_models, served):
    _, _, _, target = served
    async with front_door([target.address], auth_token="s3cret") as (router, url, stub):
        with pytest.raises(openai.AuthenticationError):
            await client(url, "wrong").models.list()
        with pytest.raises(openai.AuthenticationError):
            await client(url, "wrong").completions.create(model=MODEL, prompt="x", max_tokens=2)
        out = await client(url, "s3cret").completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert out.choices[0].finish_reason
        async with httpx.AsyncClient() as http:
            reply = await http.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x"})
            # Asked before the body is read: a stranger's broken or oversized body gets the 401, not a 400/413.
            junk = await http.post(f"{url}/v1/completions", content=b"{not json" + b" " * (17 << 20))
        assert reply.status_code == 401 and reply.json()["error"]["type"] == "authentication_error"
        assert junk.status_code == 401, junk.text


async def test_full_router_is_429_with_retry_after_and_a_gone_client_cancels(served):
    _, _, _, target = served
    async with front_door([target.address], max_in_flight=1) as (router, url, stub):
        async with httpx.AsyncClient(timeout=60) as http:
            body = {"model": MODEL, "prompt": "x", "max_tokens": 200, "stream": True, "extra": 1,
                    "ignore_eos": True, "temperature": 0}
            async with http.stream("POST", f"{url}/v1/completions", json=body) as held:
                assert held.status_code == 200
                first = await anext(held.aiter_lines())
                assert first.startswith("data: {")
                busy = await http.post(f"{url}/v1/completions", json={**body, "stream": False})
                assert busy.status_code == 429 and int(busy.headers["retry-after"]) >= 1
                assert busy.json()["error"]["type"] == "rate_limit_error"
            # The client closed its stream: the router and the target let the generation go.
            await eventually(lambda: router.forwarder.in_flight == 0, what="the router to cancel the stream")
            await eventually(lambda: target.loaded.engine.load().running == 0, what="the target to free it")
        c = client(url)
        held = await c.completions.create(model=MODEL, prompt="x", max_tokens=200, stream=True,
                                          extra_body={"ignore_eos": True})
        try:
            with pytest.raises(openai.RateLimitError):
                await c.completions.create(model=MODEL, prompt="x", max_tokens=2)
        finally:
            await held.close()


async def test_a_choice_refused_beside_an_admitted_one_waits_its_turn(served):
    """n=3 through a router that admits one generation at a time: the refused choices wait for the
    admitted one rather than failing the request (and throwing its admitted work away) with a 429."""
    _, _, _, target = served
    async with front_door([target.address], max_in_flight=1) as (router, url, stub):
        async with httpx.AsyncClient(timeout=60) as http:
            reply = await http.post(f"{url}/v1/completions", json={
                "model": MODEL, "prompt": "x", "max_tokens": 6, "n": 3, "ignore_eos": True, "temperature": 0})
        assert reply.status_code == 200, reply.text
        choices = reply.json()["choices"]
        assert len(choices) == 3 and len({c["text"] for c in choices}) == 1  # greedy: the same three times
        assert reply.json()["usage"]["completion_tokens"] == 18


async def test_no_target_is_503_and_a_past_deadline_504(served):
    async with front_door([]) as (router, url, stub):
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{url}/health")).status_code == 503
        with pytest.raises(openai.InternalServerError) as info:
            await client(url).completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert info.value.status_code == 503
    _, _, _, target = served
    async with front_door([target.address], http_timeout_s=1e-9) as (router, url, stub):
        with pytest.raises(openai.InternalServerError) as info:
            await client(url).completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert info.value.status_code == 504 and info.value.body["type"] == "timeout_error"


async def test_a_model_without_chat_template_is_a_clear_400(tiny_models, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(tiny_models.target, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    target = await start_target(tiny_models, model=str(plain))
    try:
        async with front_door([target.address]) as (router, url, stub):
            with pytest.raises(openai.BadRequestError) as info:
                await client(url).chat.completions.create(model="plain", messages=[{"role": "user", "content": "x"}])
            assert "no chat template" in info.value.body["message"] and info.value.body["param"] == "messages"
    finally:
        await target.stop(0)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (make test installs it)")
async def test_curl_sees_sse_framing(served):
    router, url, stub, _ = served
    body = json.dumps({"model": MODEL, "prompt": "The meaning of", "max_tokens": 5, "stream": True,
                       "temperature": 0, "ignore_eos": True})
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sN", f"{url}/v1/completions", "-H", "Content-Type: application/json", "-d", body,
        stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    events = out.decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert sum(len(c["choices"]) for c in chunks) == 5 and chunks[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == await grpc_text(stub, "The meaning of", 5, ignore_eos=True)


async def test_sse_events_leave_at_once_nagle_is_off_on_every_connection(served):
    """Each SSE event is a small write after the headers: with Nagle's algorithm
    on, it waits for the client's delayed ACK (tens of ms per event)."""
    router, url, _, _ = served
    async with httpx.AsyncClient() as http:  # keeps its connection open
        reply = await http.get(f"{url}/v1/models")
        assert reply.status_code == 200
        connections = router.http.server.server_state.connections
        assert connections
        for conn in connections:
            sock = conn.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_error_messages_name_the_apis_parameters():
    assert translate.api_message("sampling.max_new_tokens: 5000 exceeds the context") == \
        "max_tokens: 5000 exceeds the context"
    assert translate.api_message("sampling.max_new_tokens: prompt (1 tokens) + max_new_tokens (9) exceeds it") == \
        "max_tokens: prompt (1 tokens) + max_tokens (9) exceeds it"
    assert translate.api_message("prompt.text: must not be empty") == "prompt: must not be empty"
    assert translate.api_message("prompt.chat.messages[2].content: too long") == "messages[2].content: too long"
    assert translate.api_message("queue full: retry later") == "queue full: retry later"
    assert translate.api_message("no colon here") == "no colon here"
    # param and message read the field through the same map
    assert translate.param_of("prompt.chat.messages[2].content: too long") == "messages"
    assert translate.param_of("prompt.tokens.ids[3]: out of range") == "prompt"
    assert translate.param_of("priority_x: y") is None and translate.param_of("queue full") is None


async def test_a_chat_too_long_for_the_context_names_messages_and_a_tiny_top_p_is_refused_as_sent(served):
    """A chat has no prompt field: the target's "prompt: has N tokens" is said of messages. A top_p
    the contract's 32-bit float turns into 0 is refused here, naming the value sent, not "got 0.0"."""
    _, url, _, _ = served
    reply = await post(url, "/v1/chat/completions", chat_body(messages=[{"role": "user", "content": "x " * 2000}]))
    error = reply.json()["error"]
    assert reply.status_code == 400 and error["param"] == "messages" and error["message"].startswith("messages:"), error
    reply = await post(url, "/v1/completions", completion_body(top_p=1e-300))
    error = reply.json()["error"]
    assert reply.status_code == 400 and error["param"] == "top_p" and "1e-300" in error["message"], error
    assert (await post(url, "/v1/completions", completion_body(top_p=1e-30))).status_code == 200


@pytest.mark.parametrize("exc, status, param", [
    (InvalidArgument("sampling.top_p", "must be in (0, 1]"), 400, "top_p"),
    (OutOfRange("prompt.tokens", "too long"), 400, "prompt"),
    (Unauthenticated("invalid bearer token"), 401, None),
    (NotFound("model 'x' does not exist"), 404, None),
    (ResourceExhausted("pool full", retry_after_s=2.2), 429, None),
    (Unavailable("no target"), 503, None),
    (DeadlineExceeded("late"), 504, None),
    (Relayed("OUT_OF_RANGE", "sampling.max_new_tokens: too many"), 400, "max_tokens"),
    (Relayed("RESOURCE_EXHAUSTED", "queue full", (("retry-after-ms", "300"),)), 429, None),
    (RuntimeError("secret traceback detail"), 500, None),
])
def test_every_error_has_its_status_and_the_apis_shape(exc, status, param):
    http, body, headers = translate.error_body(exc)
    assert http == status and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] == param
    if param:  # the message names the parameter the client sent, not the gRPC contract's field
        assert body["error"]["message"].startswith(f"{param}: ") and "sampling." not in body["error"]["message"]
    if status == 429:
        assert int(headers["Retry-After"]) == (3 if isinstance(exc, ResourceExhausted) else 1)
    if status == 500:
        assert "secret" not in body["error"]["message"] and "incident" in body["error"]["message"]


async def test_the_benchs_http_stub_counts_every_token_with_either_client(served):
    """`llmesh bench --scenario openai` measures the front door with aiohttp (and
    the SDK's httpx beside it): both must see every token the stream carries."""
    from services.bench.loadgen import greedy_request
    from services.bench.openai_scenario import HttpStub, _cost, _lean_client, _sdk_client

    router, url, _, _ = served
    async with _lean_client() as lean, _sdk_client() as sdk:
        for client in (lean, sdk):
            chunks = [c async for c in HttpStub(client, url, MODEL).Generate(greedy_request("The meaning of", 5))]
            assert sum(len(c.token_ids) for c in chunks) == 5 and chunks[-1].finish_reason
    out = await _cost(router.address, url, MODEL, ["The meaning of", "Once upon a"], n=2, new_tokens=3,
                      stream_new_tokens=4, total=4, repeats=1, progress=False)
    assert out["errors"] == 0 and out["http_throughput_ratio"] > 0
    assert out["http_p50_ms"] > 0 and out["http_httpx_p50_ms"] > 0 and out["grpc_p50_ms"] > 0


async def test_an_http_request_continues_the_clients_trace_to_the_target(tiny_models):
    """The front door's server span continues the caller's W3C traceparent; the
    router's upstream call and the target's spans are its descendants, and the
    request's ``user`` is the span's ``enduser.id``."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from services.common import telemetry

    router_spans, target_spans = InMemorySpanExporter(), InMemorySpanExporter()
    target = await start_target(tiny_models, provider=telemetry.make_tracer_provider("t", exporter=target_spans))
    trace_id, parent_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    try:
        provider = telemetry.make_tracer_provider("r", exporter=router_spans)
        async with front_door([target.address], provider=provider) as (_, url, _):
            async with httpx.AsyncClient() as http:
                reply = await http.post(f"{url}/v1/completions",
                                        headers={"traceparent": f"00-{trace_id}-{parent_id}-01"},
                                        json={"model": MODEL, "prompt": "The meaning of", "max_tokens": 3,
                                              "stream": True, "user": "user-42"})
                assert reply.status_code == 200 and reply.text.endswith("data: [DONE]\n\n")
    finally:
        await target.stop(0)
    server = [s for s in router_spans.get_finished_spans() if s.kind.name == "SERVER"]
    assert [s.name for s in server] == ["POST /v1/completions"]  # one span, none per SSE event, none for /health
    span = server[0]
    assert format(span.context.trace_id, "032x") == trace_id and format(span.parent.span_id, "016x") == parent_id
    assert span.attributes["enduser.id"] == "user-42"
    client = [s for s in router_spans.get_finished_spans() if s.name.endswith("TargetModel/Generate")]
    assert client and client[0].parent.span_id == span.context.span_id
    target_server = [s for s in target_spans.get_finished_spans()
                     if s.kind.name == "SERVER" and s.name.endswith("TargetModel/Generate")]
    assert target_server and target_server[0].context.trace_id == span.context.trace_id


@pytest.mark.parametrize("extra, param", [
    ({"max_tokens": 2 ** 31}, "max_tokens"),
    ({"max_tokens": 10 ** 20, "stream": True}, "max_tokens"),
    ({"top_k": 2 ** 31, "max_tokens": 4000}, "max_tokens"),
    ({"prompt": [5, 2 ** 31]}, "prompt"),
    ({"prompt": [[5, -2 ** 31 - 1]]}, "prompt"),
])
async def test_integers_past_the_contracts_int32_are_a_400_not_a_500(served, extra, param):
    """JSON integers have no bound; the contract's fields are int32. A count past it
    is clamped (and refused for the context it exceeds), a token id past it is out
    of every vocabulary: a 400 naming the field, never an internal error."""
    _, url, _, _ = served
    async with httpx.AsyncClient(timeout=60) as http:
        reply = await http.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", **extra})
        chat = await http.post(f"{url}/v1/chat/completions",
                               json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                     "max_completion_tokens": extra.get("max_tokens", 2 ** 40),
                                     "stream": extra.get("stream", False)})
    for r in (reply, chat):
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and "internal" not in error["message"]
    assert param in (reply.json()["error"]["param"] or reply.json()["error"]["message"])
    # The chat request sent its bound as max_completion_tokens: the error names what it sent.
    assert chat.json()["error"]["param"] == "max_completion_tokens"
    assert chat.json()["error"]["message"].startswith("max_completion_tokens")
    # A bound past the contract's int32 is said as sent, not as the clamped 2147483647.
    sent = extra.get("max_tokens", 2 ** 40)
    if sent > 2 ** 31 - 1:
        assert str(sent) in chat.json()["error"]["message"], chat.json()


@pytest.mark.parametrize("extra, param", [
    ({"max_tokens": "5"}, "max_tokens"),
    ({"temperature": "0.5"}, "temperature"),
    ({"n": 1.5}, "n"),
    ({"stream": "true"}, "stream"),
    ({"seed": True}, "seed"),
    ({"stop": 7}, "stop"),
])
async def test_a_value_of_the_wrong_json_type_is_a_400_not_coerced(served, extra, param):
    """The OpenAI API refuses a number sent as a string (and the like); a
    server that coerced "5" to 5 would accept what the reference refuses."""
    _, url, _, _ = served
    async with httpx.AsyncClient(timeout=60) as http:
        reply = await http.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "x", **extra})
        chat = await http.post(f"{url}/v1/chat/completions",
                               json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], **extra})
        ok = await http.post(f"{url}/v1/completions",  # an integer where a float is asked is a number: fine
                             json={"model": MODEL, "prompt": "x", "max_tokens": 2, "temperature": 1, "top_p": 1})
    for r in (reply, chat):
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param
    assert ok.status_code == 200, ok.text


async def test_unknown_paths_and_methods_answer_in_the_apis_error_shape(served):
    _, url, _, _ = served
    async with httpx.AsyncClient(timeout=30) as http:
        missing, wrong = await http.post(f"{url}/v1/embeddings", json={}), await http.get(f"{url}/v1/completions")
    assert missing.status_code == 404 and "no such endpoint: POST /v1/embeddings" in missing.json()["error"]["message"]
    assert wrong.status_code == 405 and wrong.json()["error"]["type"] == "invalid_request_error"


# -- the user trial's faults -------------------------------------------------
async def post(url: str, path: str, body, **kw) -> httpx.Response:
    async with httpx.AsyncClient(timeout=60) as http:
        if not isinstance(body, dict):  # bytes, or an async iterator: sent chunked
            return await http.post(f"{url}{path}", content=body, **kw)
        return await http.post(f"{url}{path}", json=body, **kw)


def chat_body(**extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, **extra}


def completion_body(**extra) -> dict:
    return {"model": MODEL, "prompt": "x", "max_tokens": 2, **extra}


@pytest.mark.parametrize("path, body, param, says", [
    ("/v1/completions", completion_body(best_of=3), "best_of", "best_of > n"),
    ("/v1/completions", completion_body(presence_penalty=0.5), "presence_penalty", "penalty"),
    ("/v1/chat/completions", chat_body(frequency_penalty=-1), "frequency_penalty", "penalty"),
    ("/v1/completions", completion_body(logit_bias={"50": 100}), "logit_bias", "logit_bias"),
    ("/v1/completions", completion_body(suffix="end"), "suffix", "suffix"),
    ("/v1/chat/completions", chat_body(response_format={"type": "json_object"}), "response_format", "json_object"),
    ("/v1/chat/completions", chat_body(tool_choice="required"), "tool_choice", "tool calling"),
    ("/v1/chat/completions", chat_body(tool_choice={"type": "function", "function": {"name": "f"}}),
     "tool_choice", "tool calling"),
    ("/v1/chat/completions", chat_body(tools=[{"type": "function", "function": {"name": "f"}}]), "tools",
     "tool calling"),
    ("/v1/chat/completions", chat_body(tools=[{"type": "function", "function": {"name": "f"}}],
                                       tool_choice="auto"), "tools", "tool calling"),
    # vLLM's sampling extensions a vLLM client expects honoured, OpenAI's legacy function calling and audio.
    ("/v1/completions", completion_body(min_tokens=10), "min_tokens", "minimum number of tokens"),
    ("/v1/completions", completion_body(stop_token_ids=[5]), "stop_token_ids", "stop token ids"),
    ("/v1/chat/completions", chat_body(repetition_penalty=2), "repetition_penalty", "repetition penalty"),
    ("/v1/completions", completion_body(min_p=0.1), "min_p", "min_p"),
    ("/v1/completions", completion_body(include_stop_str_in_output=True), "include_stop_str_in_output", "stop"),
    ("/v1/chat/completions", chat_body(guided_choice=["yes", "no"]), "guided_choice", "guided decoding"),
    ("/v1/completions", completion_body(prompt_logprobs=1), "prompt_logprobs", "echo"),
    ("/v1/completions", completion_body(truncate_prompt_tokens=5), "truncate_prompt_tokens", "truncation"),
    ("/v1/chat/completions", chat_body(add_generation_prompt=False), "add_generation_prompt", "assistant"),
    ("/v1/chat/completions", chat_body(continue_final_message=True), "continue_final_message", "final message"),
    ("/v1/chat/completions", chat_body(functions=[{"name": "f"}]), "functions", "function calling"),
    ("/v1/chat/completions", chat_body(modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"}),
     "modalities", "other than text"),
    ("/v1/chat/completions", chat_body(messages=[
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
                                                                "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"}]), "messages", "tool calls"),
])
async def test_a_parameter_llmesh_does_not_implement_is_a_400_naming_it(served, path, body, param, says):
    """Ignoring it would answer 200 with a result the client did not ask for."""
    _, url, _, _ = served
    reply = await post(url, path, body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert error["message"].startswith(param) and "not supported by llmesh" in error["message"]
    assert says in error["message"]


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", completion_body(best_of=1, presence_penalty=0, frequency_penalty=0.0, logit_bias={},
                                        suffix="")),
    ("/v1/completions", completion_body(n=2, best_of=2, suffix=None)),
    ("/v1/chat/completions", chat_body(response_format={"type": "text"}, tool_choice="none",
                                       tools=[{"type": "function", "function": {"name": "f"}}])),
    ("/v1/chat/completions", chat_body(tool_choice="auto", tools=[], logit_bias=None)),
    ("/v1/completions", completion_body(min_tokens=0, stop_token_ids=[], repetition_penalty=1, min_p=0.0,
                                        include_stop_str_in_output=False, guided_choice=None)),
    ("/v1/chat/completions", chat_body(add_generation_prompt=True, continue_final_message=False, functions=[],
                                       modalities=["text"], repetition_penalty=1.0, top_logprobs=0)),
])
async def test_the_neutral_value_of_an_unimplemented_parameter_is_served(served, path, body):
    _, url, _, _ = served
    reply = await post(url, path, body)
    assert reply.status_code == 200, reply.text


@pytest.mark.parametrize("path, body, says", [
    ("/v1/completions", completion_body(prompt=["ab"] * 200_000), "prompt: has 200000 prompts; one request takes "
                                                                   "at most 1024"),
    ("/v1/completions", completion_body(prompt=[7] * 600_000), "prompt: has 600000 token ids; a prompt has at most"),
    ("/v1/completions", completion_body(prompt=[[7], [7] * 600_000]), "prompt: prompt 1 has 600000 token ids"),
    ("/v1/chat/completions", chat_body(messages=[{"role": "user", "content": "x"}] * 20_000),
     "messages: has 20000 messages; a conversation takes at most"),
])
async def test_a_huge_list_is_refused_by_its_length(served, path, body, says):
    """A list past its bound is a 400 counted from its length, before each item is validated (which
    held the event loop, every other stream with it, for seconds)."""
    _, url, _, _ = served
    reply = await post(url, path, body)
    assert reply.status_code == 400 and says in reply.json()["error"]["message"], reply.text


async def test_an_omitted_model_is_the_one_served_and_a_negative_seed_is_taken_as_vllm_takes_it(served):
    """vLLM serves a request without model with its model, and takes a signed 64-bit seed; both were 400s."""
    _, url, _, _ = served
    reply = await post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
    assert reply.status_code == 200 and reply.json()["model"] == MODEL, reply.text
    sampled = dict(temperature=1.0, max_tokens=6)
    negative = await post(url, "/v1/completions", completion_body(seed=-5, **sampled))
    again = await post(url, "/v1/completions", completion_body(seed=-5, **sampled))
    unsigned = await post(url, "/v1/completions", completion_body(seed=2 ** 64 - 5, **sampled))
    assert negative.status_code == 200, negative.text
    texts = [r.json()["choices"][0]["text"] for r in (negative, again, unsigned)]
    assert texts[0] == texts[1] == texts[2]  # the same seed, modulo 2^64
    assert (await post(url, "/v1/completions", completion_body(seed=-2 ** 63 - 1))).status_code == 400


@pytest.mark.parametrize("name", sorted(schemas.NEUTRAL))
def test_every_unimplemented_parameter_in_the_table_is_checked(name):
    """NEUTRAL is the table; a name in it that no body declares and checks would be ignored silently."""
    body = {"model": MODEL, "prompt": "x", "messages": [{"role": "user", "content": "x"}]}
    if name == "tool_calls":
        body["messages"] = [{"role": "assistant", "content": "x", "tool_calls": [{"id": "c"}]}]
        schema = schemas.ChatCompletionRequest
    else:
        body[name] = "not neutral"
        schema = schemas.CompletionRequest if name in schemas.CompletionRequest.model_fields \
            else schemas.ChatCompletionRequest
    with pytest.raises(ValidationError) as err:
        schema.model_validate(body)
    assert any(e["type"] == "unsupported" for e in err.value.errors()), err.value.errors()


def test_an_omitted_model_where_several_are_served_is_a_400_naming_them():
    door = FrontDoor(None, None, None)
    door.model_names = lambda: ["a", "b"]
    with pytest.raises(InvalidArgument, match="model: is required where several are served: a, b"):
        door.check_model(None)
    assert door.check_model("b") == "b"
    door.model_names = lambda: []
    with pytest.raises(Unavailable, match="no target serves now"):
        door.check_model(None)


async def test_chat_top_logprobs_need_logprobs(served):
    """As vLLM refuses it: top_logprobs without logprobs would answer logprobs: null."""
    _, url, _, _ = served
    reply = await post(url, "/v1/chat/completions", chat_body(top_logprobs=5))
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "top_logprobs", reply.text
    assert "logprobs to be true" in reply.json()["error"]["message"]
    reply = await post(url, "/v1/chat/completions", chat_body(top_logprobs=2, logprobs=True))
    assert reply.status_code == 200 and len(reply.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 2


async def test_stream_options_need_a_stream(served):
    _, url, _, _ = served
    reply = await post(url, "/v1/completions", completion_body(stream_options={"include_usage": True}))
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "stream_options", reply.text
    assert (await post(url, "/v1/completions", completion_body(stream_options=None))).status_code == 200


@pytest.mark.parametrize("path, body, param, message", [
    ("/v1/completions", completion_body(prompt=[-1]), "prompt",
     "prompt[0]: token id -1 is out of range: ids are >= 0"),
    ("/v1/completions", completion_body(prompt=[[3, 2 ** 31]]), "prompt", "prompt[0][1]: token id 2147483648 is out"),
    ("/v1/completions", completion_body(stop=5), "stop", "stop: must be a string or a list of strings, got a number"),
    ("/v1/completions", completion_body(prompt=["a", 1]), "prompt",
     "prompt: must be a string, a list of strings, a list of token ids or a list of lists of token ids, "
     "got an array of numbers and strings"),
    ("/v1/chat/completions", chat_body(messages=[{"role": "user", "content": [
        {"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]),
     "messages", "messages[0].content[1].type: a content part of type 'image_url' is not supported by llmesh: only text"),
    ("/v1/chat/completions", chat_body(messages=[{"role": "user", "content": 5}]), "messages",
     "messages[0].content: must be a string or a list of text parts"),
    ("/v1/chat/completions", chat_body(tool_choice="sometimes"), "tool_choice", "tool_choice: must be \"none\""),
    ("/v1/completions", b'{"model": "target", "prompt": "x", "temperature": NaN}', "temperature",
     "temperature: must be a finite number, got nan"),
    ("/v1/completions", b'{"model": "target", "prompt": "x", "top_p": Infinity}', "top_p",
     "top_p: must be a finite number"),
    ("/v1/completions", b'{"model": "target", "prompt": "x\\ud800 y"}', None,
     "body: a JSON string holds a lone surrogate (\\ud800 without its pair), which is not valid Unicode"),
    ("/v1/completions", b'{"model": "target", "prompt": "\\udc00"}', None, "body: a JSON string holds a lone surrogate"),
    # A well-formed pair (an emoji) before the lone one: the lone one is named.
    ("/v1/completions", b'{"model": "target", "prompt": "\\ud83c\\udf89 party \\ud800"}', None,
     "body: a JSON string holds a lone surrogate (\\ud800 without its pair)"),
    ("/v1/completions", completion_body(prompt=[[1, "a"]]), "prompt",
     "prompt: must be a string, a list of strings, a list of token ids or a list of lists of token ids, "
     "got an array of arrays of numbers and strings"),
    ("/v1/completions", b'[1, 2]', None, "body: must be a JSON object, got an array"),
    # One request fanning out to more generations than the front door starts for one request.
    ("/v1/completions", completion_body(prompt=[f"p{i}" for i in range(100)], n=16), "prompt",
     "prompt: 100 prompts x n 16 would make 1600 generations; one request makes at most 1024"),
    ("/v1/completions", completion_body(n=0), "n", "n: Input should be greater than or equal to 1"),
])
async def test_a_refused_value_is_said_as_the_client_wrote_it(served, path, body, param, message):
    """No pydantic union tags (``prompt.str``, ``.list[int]``), no bound quoted for NaN."""
    _, url, _, _ = served
    reply = await post(url, path, body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and error["message"].startswith(message), error
    assert "list[" not in error["message"] and ".str" not in error["message"]


async def test_a_token_id_outside_the_vocabulary_is_out_of_range_whichever_side_finds_it(served, tiny_models):
    """A negative id is refused by the front door's schema, one past the vocabulary by the target: the same
    error code for the same mistake."""
    _, url, _, _ = served
    for ids in ([-1], [tiny_models.vocab_size], [[3, 2 ** 31]]):
        reply = await post(url, "/v1/completions", completion_body(prompt=ids))
        assert reply.status_code == 400 and reply.json()["error"]["code"] == "out_of_range", (ids, reply.text)


def test_every_union_field_says_its_shapes():
    """A union field without an entry in SHAPES would be refused with a vague message."""
    from typing import Literal

    from router.http import schemas
    from router.http.invalid import _models_in

    def unions(model, seen=()):
        for name, f in model.model_fields.items():
            args = [a for a in getattr(f.annotation, "__args__", ()) if a is not type(None)]
            if len(args) > 1 and getattr(f.annotation, "__origin__", None) not in (dict, Literal):
                yield name
            for sub in _models_in(f.annotation):
                if sub not in seen:
                    yield from unions(sub, (*seen, sub))

    found = set(unions(schemas.CompletionRequest)) | set(unions(schemas.ChatCompletionRequest))
    assert found >= {"prompt", "stop", "content", "tool_choice"}
    assert found <= set(schemas.SHAPES), found - set(schemas.SHAPES)


async def test_an_empty_stop_string_is_ignored_alone_or_in_a_list(served):
    _, url, _, _ = served
    kw = completion_body(prompt="class A:", max_tokens=6, temperature=0, ignore_eos=True)
    plain = (await post(url, "/v1/completions", kw)).json()["choices"][0]
    for stop in ("", [""], ["", ""]):
        reply = await post(url, "/v1/completions", {**kw, "stop": stop})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == plain["text"]


async def test_null_means_the_default(served):
    _, url, _, _ = served
    reply = await post(url, "/v1/completions", completion_body(n=None, stream=None, echo=None, stop=None,
                                                               logprobs=None, ignore_eos=None, seed=None))
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["choices"]) == 1
    chat = await post(url, "/v1/chat/completions", chat_body(n=None, stream=None, logprobs=None,
                                                             stream_options=None, tools=None))
    assert chat.status_code == 200, chat.text
    # A null (or omitted) model is the one served, as vLLM takes it.
    missing = await post(url, "/v1/completions", completion_body(model=None))
    assert missing.status_code == 200 and missing.json()["model"] == MODEL, missing.text


async def test_a_served_model_is_retrieved_and_a_trailing_slash_is_served(served):
    _, url, _, _ = served
    c = client(url)
    assert (await c.models.retrieve(MODEL)).id == MODEL
    with pytest.raises(openai.NotFoundError) as info:
        await c.models.retrieve("gpt-nope")
    assert info.value.body["type"] == "not_found_error"
    async with httpx.AsyncClient(timeout=60) as http:
        slash = await http.post(f"{url}/v1/completions/", json=completion_body())
        models = await http.get(f"{url}/v1/models/")
    assert slash.status_code == 200 and slash.json()["object"] == "text_completion", slash.text
    assert models.status_code == 200 and models.json()["data"][0]["id"] == MODEL


async def test_streamed_chunks_carry_null_usage_before_the_last(served):
    _, url, _, _ = served
    for path, body in (("/v1/completions", completion_body(max_tokens=3)), ("/v1/chat/completions", chat_body())):
        reply = await post(url, path, {**body, "stream": True, "stream_options": {"include_usage": True}})
        events = [json.loads(e.removeprefix("data: ")) for e in reply.text.split("\n\n")[:-2]]
        assert all("usage" in e and e["usage"] is None for e in events[:-1]), events
        assert events[-1]["choices"] == [] and events[-1]["usage"]["total_tokens"] > 0
        plain = await post(url, path, {**body, "stream": True})
        assert all("usage" not in json.loads(e.removeprefix("data: ")) for e in plain.text.split("\n\n")[:-2])


async def test_a_body_past_the_limit_is_a_413_without_being_read(served):
    _, _, _, target = served
    async with front_door([target.address], http_max_body_bytes=4096) as (_, url, _):
        big = json.dumps(completion_body(prompt="x" * 5000)).encode()
        declared = await post(url, "/v1/completions", big)
        assert declared.status_code == 413, declared.text
        assert declared.json()["error"]["code"] == "request_too_large"
        assert "4096 bytes" in declared.json()["error"]["message"]

        async def chunked():  # no Content-Length: refused as it arrives
            for i in range(0, len(big), 1000):
                yield big[i:i + 1000]

        streamed = await post(url, "/v1/completions", chunked())
        assert streamed.status_code == 413, streamed.text
        fits = await post(url, "/v1/completions", json.dumps(completion_body(prompt="x" * 100)).encode())
        assert fits.status_code == 200


async def test_a_chunked_body_is_read_only_up_to_the_limit():
    from router.http.app import BodyTooLarge, read_body

    sent = []

    class Chunked:  # the part of starlette's Request read_body uses
        headers = {}

        async def stream(self):
            for i in range(1000):
                sent.append(i)
                yield b"x" * 1024

    with pytest.raises(BodyTooLarge):
        await read_body(Chunked(), 10 * 1024)
    assert len(sent) == 11


async def test_without_max_tokens_a_long_prompt_gets_what_the_context_leaves(served, tiny_models):
    """As vLLM: the default bound (16 for completions, 256 for chat) is lowered
    to the room the context (256 tokens here) leaves; a bound sent must fit."""
    _, url, _, _ = served
    prompt = tiny_models.tokenizer.encode("The meaning of life " * 80)[:250]
    reply = await post(url, "/v1/completions", {"model": MODEL, "prompt": prompt, "temperature": 0,
                                                "ignore_eos": True})
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"] == {"prompt_tokens": 250, "completion_tokens": 6, "total_tokens": 256}
    assert reply.json()["choices"][0]["finish_reason"] == "length"
    short = await post(url, "/v1/completions", {"model": MODEL, "prompt": prompt[:20], "ignore_eos": True})
    assert short.json()["usage"]["completion_tokens"] == 16
    words = tiny_models.tokenizer.decode(prompt[:230])
    chat = await post(url, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": words}],
                                                    "ignore_eos": True, "max_tokens": None})
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["prompt_tokens"] + 16 > 256 >= chat.json()["usage"]["total_tokens"]
    for sent in ({"max_tokens": 16}, {"max_completion_tokens": 100}):
        refused = await post(url, "/v1/chat/completions",
                             {"model": MODEL, "messages": [{"role": "user", "content": words}], **sent})
        assert refused.status_code == 400 and "context" in refused.json()["error"]["message"], refused.text
        assert refused.json()["error"]["param"] == next(iter(sent))


async def test_tokens_of_part_of_a_character_are_bytes_and_offsets_stay_in_the_text(served, tiny_models):
    """As vLLM and OpenAI: a token that is not UTF-8 on its own is "bytes:\\xNN...";
    text_offset counts characters (a token inside a character is at that
    character), non-decreasing and never past the text."""
    _, url, _, _ = served
    prompt = "日本語 🎉 é"
    ids = tiny_models.tokenizer.encode(prompt)
    for stream in (False, True):
        reply = await post(url, "/v1/completions", completion_body(prompt=prompt, max_tokens=4, echo=True, logprobs=1, ignore_eos=True,
                                                                   temperature=0, stream=stream))
        assert reply.status_code == 200, reply.text
        if stream:
            events = [json.loads(e.removeprefix("data: ")) for e in reply.text.split("\n\n")[:-2]]
            text = "".join(e["choices"][0]["text"] for e in events)
            lp = {k: [v for e in events for v in e["choices"][0]["logprobs"][k]] for k in ("tokens", "text_offset")}
        else:
            text, lp = reply.json()["choices"][0]["text"], reply.json()["choices"][0]["logprobs"]
        tokens, offsets = lp["tokens"], lp["text_offset"]
        assert len(tokens) == len(ids) + 4 and "\ufffd" not in "".join(tokens[:len(ids)])
        raw = b"".join(bytes.fromhex(t[6:].replace("\\x", "")) if t.startswith("bytes:") else t.encode()
                       for t in tokens[:len(ids)])
        assert raw.decode() == prompt
        assert offsets == sorted(offsets) and offsets[-1] <= len(text)
        assert offsets[0] == 0 and offsets[len(ids) - 1] == len(prompt) - 1  # "é" is the last prompt character
        assert {offsets[i] for i, t in enumerate(tokens[:len(ids)]) if not t.startswith("bytes:")} <= \
            {i for i in range(len(prompt))}
        assert any(t.startswith("bytes:\\x") for t in tokens)


def test_token_bytes_of_a_byte_level_bpe(tiny_models):
    from services.serving.token_bytes import token_bytes

    tok = tiny_models.tokenizer
    ids = tok.encode("日本 x")
    texts = tok.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
    assert any("\ufffd" in t for t in texts)
    assert b"".join(token_bytes(tok, ids, texts)) == "日本 x".encode()


async def test_a_request_of_more_choices_than_a_targets_queue_is_served_a_turn_at_a_time(tiny_models, monkeypatch):
    """Its choices generate at most MAX_CONCURRENT_CHOICES at once, so a request the
    target's queue could never hold whole is answered (it was a 429 however long the
    client waited, and its queued choices crowded out other clients)."""
    from router.http import app as http_app

    monkeypatch.setattr(http_app, "MAX_CONCURRENT_CHOICES", 4)
    # A queue of 12: room (with a margin) for a turn's 4 (they wait for the engine's next step) and the 4 of the
    # turn before, whose last chunk may reach the client before the engine frees their slots;
    # 80 at once (8 running, 12 waiting) would be a 429.
    target = await start_target(tiny_models, max_queue=12)
    try:
        async with front_door([target.address]) as (_, url, _):
            out = await client(url).completions.create(model=MODEL, prompt=[f"p{i}" for i in range(10)], n=8,
                                                       max_tokens=2, temperature=0)
            assert len(out.choices) == 80 and all(c.finish_reason for c in out.choices)
            assert sorted(c.index for c in out.choices) == list(range(80))
    finally:
        await target.stop(0)
