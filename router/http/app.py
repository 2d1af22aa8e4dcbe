"""The front door's routes (FastAPI): ``POST /v1/completions``,
``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``.

Every generation goes through :meth:`router.forwarder.Forwarder.generate`,
the function ``Router.Generate`` calls, on the router's event loop: this
module only translates (:mod:`router.http.translate`). The bearer token rules
are the gRPC front door's (:class:`services.common.access.Access`, checked as
a ``Router/Generate`` call). A client that goes away cancels its
generations: the upstream calls are cancelled and the target frees their KV
cache at its next step.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from opentelemetry import trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.trace import TracerProvider
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from router.config import MAX_BODY_BYTES
from router.forwarder import Forwarder
from router.http import translate
from router.http.invalid import explain
from router.http.schemas import ChatCompletionRequest, CompletionRequest, SamplingBody
from router.registry import Role
from router.upstreams import Upstreams
from services.common.access import Access
from services.common import status
from services.common.errors import InvalidArgument, LlmeshError, NotFound, Relayed, Unavailable

log = logging.getLogger(__name__)

#: The gRPC method whose access rules the HTTP routes follow.
GENERATE_METHOD = "/llmesh.v1.Router/Generate"
#: Generations of one request in flight at once; its other choices wait their turn inside
#: the request. A request of more choices than a target's queue holds (256 by default) would
#: otherwise be refused (429) however long its client waited, and fill the queue for everyone.
MAX_CONCURRENT_CHOICES = 64
#: Longest wait of a choice refused by a full queue before it asks again, and longest time its request
#: keeps asking (see :meth:`FrontDoor.start`).
MAX_CHOICE_RETRY_WAIT_S = 2.0
MAX_CHOICE_RETRIES_S = 120.0


class BodyTooLarge(Exception):
    """A request body past the front door's limit (HTTP 413)."""


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, at most ``limit`` bytes: BodyTooLarge from its
    Content-Length before anything is read, or, for a chunked body, as soon
    as what has arrived passes the limit (never held in full)."""
    too_large = f"the request body is larger than the {limit} bytes this server reads (--http-max-body-bytes)"
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise BodyTooLarge(too_large)
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise BodyTooLarge(too_large)
        parts.append(part)
    return b"".join(parts)


def error_response(exc: BaseException, max_tokens: str = "max_tokens", prompt: str = "prompt") -> JSONResponse:
    http, body, headers = translate.error_body(exc, max_tokens, prompt)
    return JSONResponse(body, status_code=http, headers=headers)


class FrontDoor:
    """The routes' state: the router's forwarder and upstreams, its access
    rules, the HTTP deadline (``timeout_s``, 0: none) and the largest request
    body read (``max_body_bytes``). Event-loop thread."""

    def __init__(self, forwarder: Forwarder, upstreams: Upstreams, access: Access, timeout_s: float = 0.0,
                 max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.forwarder = forwarder
        self.upstreams = upstreams
        self.access = access
        self.timeout_s = timeout_s
        self.max_body_bytes = max_body_bytes

    # -- checks -------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        """Raises Unauthenticated as Router/Generate would for this request's ``Authorization``."""
        header = request.headers.get("authorization")
        self.access.check(GENERATE_METHOD, [("authorization", header)] if header is not None else [])

    def model_names(self) -> list[str]:
        """The model names the registered targets answered GetInfo with, sorted."""
        return sorted({i.info.model_name for i in self.upstreams.registry.select(Role.TARGET)
                       if i.info is not None and i.info.model_name})

    def max_model_len(self, model: str) -> int | None:
        """The smallest context the registered targets serving ``model`` said they hold (what any of
        them can take), None where none said."""
        sizes = [i.info.max_context for i in self.upstreams.registry.select(Role.TARGET)
                 if i.info is not None and i.info.model_name == model and i.info.max_context > 0]
        return min(sizes) if sizes else None

    def check_model(self, model: str | None) -> str:
        """The model a request names, or the one served where it names none (as vLLM takes an
        omitted model); Unavailable while no target serves, NotFound for a model none serves,
        InvalidArgument for an omitted one where several are served."""
        names = self.model_names()
        if not names:
            raise Unavailable("no target serves now (none registered, none serving, or none has answered GetInfo "
                              "since it came back): no model to serve; retry shortly")
        if model is None:
            if len(names) > 1:
                raise InvalidArgument("model", f"is required where several are served: {', '.join(names)}")
            return names[0]
        if model not in names:
            raise NotFound(f"model {model!r} does not exist; models served: {', '.join(names)}")
        return model

    def serving(self) -> bool:
        return any(self.upstreams.routable(Role.TARGET, pool) for pool in self.upstreams.pools())

    def time_remaining(self) -> Callable[[], float | None]:
        if not self.timeout_s:
            return lambda: None
        deadline = time.monotonic() + self.timeout_s
        return lambda: deadline - time.monotonic()

    # -- generation ---------------------------------------------------------
    def start(self, requests, queue: asyncio.Queue) -> list[asyncio.Task]:
        """One task per choice through the forwarder, at most
        :data:`MAX_CONCURRENT_CHOICES` generating at once; each puts (index,
        chunk) items on ``queue``, then (index, None) or (index, exception).

        A choice a full queue refuses (RESOURCE_EXHAUSTED, before any chunk)
        while another choice of the same request is in flight or has finished
        waits the refusal's retry-after (at most :data:`MAX_CHOICE_RETRY_WAIT_S`,
        outside its turn) and asks again, for at most
        :data:`MAX_CHOICE_RETRIES_S` and the request's time: failing the
        request would throw away the generations already made for it
        (2026-12-02: 16 requests of 64 choices each, 12 answered 429 after their
        other choices had run). Where every choice in flight was refused and
        none has finished, the request fails at once, with the 429 and its
        Retry-After."""
        remaining = self.time_remaining()
        turns = asyncio.Semaphore(MAX_CONCURRENT_CHOICES)
        calling = [0]  # choices of this request inside a forwarder call
        finished = [0]  # choices of this request that finished
        started = time.monotonic()

        async def run(index: int, req) -> None:
            emitted = False

            async def emit(chunk) -> None:
                nonlocal emitted
                emitted = True
                queue.put_nowait((index, chunk))

            try:
                while True:
                    async with turns:
                        calling[0] += 1
                        try:
                            await self.forwarder.generate(req, remaining, emit)
                            finished[0] += 1
                            break
                        except Exception as exc:  # noqa: BLE001 - a refusal waits, the rest goes on below
                            others = calling[0] > 1 or finished[0] > 0
                            wait = None if emitted or not others else refused_for(exc)
                            left = remaining()
                            if (wait is None or (left is not None and left <= wait)
                                    or time.monotonic() - started + wait > MAX_CHOICE_RETRIES_S):
                                raise
                        finally:
                            calling[0] -= 1
                    await asyncio.sleep(wait)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the consumer answers it in the API's shape
                queue.put_nowait((index, exc))
                return
            queue.put_nowait((index, None))

        return [asyncio.create_task(run(i, r)) for i, r in enumerate(requests)]

    async def respond(self, request: Request, body: SamplingBody, chat: bool) -> Response:
        """The answer to an authorized request's validated ``body``."""
        body.model = self.check_model(body.model)
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        requests = translate.generate_requests(body, request_id)
        logprobs = bool(body.logprobs) if chat else body.logprobs is not None
        queue: asyncio.Queue = asyncio.Queue()
        tasks = self.start(requests, queue)
        head = {"id": request_id, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": body.model}
        choices = [translate.Choice(i) for i in range(len(requests))]
        if body.stream:
            first = await self._first(request, queue, tasks)
            if first is None:
                self._cancel(tasks)
                return Response(status_code=499)
            if isinstance(first[1], BaseException):
                self._cancel(tasks)
                return error_response(first[1], translate.max_tokens_name(body), translate.prompt_name(body))
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = self._events(first, queue, tasks, choices, head, chat, logprobs, include_usage, body.n,
                                  translate.max_tokens_name(body), translate.prompt_name(body))
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            done = await self._collect(request, queue, tasks, choices)
        finally:
            self._cancel(tasks)
        if not done:  # the client went away
            return Response(status_code=499)
        shape = translate.Choice.chat if chat else translate.Choice.completion
        return JSONResponse({**head, "choices": [shape(c, logprobs) for c in choices],
                             "usage": translate.usage_of(choices, body.n)})

    async def _collect(self, request: Request, queue: asyncio.Queue, tasks, choices) -> bool:
        """Folds every choice's chunks; False when the client disconnected first.
        Raises the first choice's error."""
        left = len(tasks)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while left:
                get = asyncio.ensure_future(queue.get())
                await asyncio.wait((get, gone), return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    return False
                index, item = get.result()
                if item is None:
                    left -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    c = choices[index]
                    c.add(item)
                    c.logprobs.extend(item.prompt_logprobs)
                    c.logprobs.extend(item.logprobs)
            return True
        finally:
            gone.cancel()

    async def _first(self, request: Request, queue: asyncio.Queue, tasks):
        """The first item of a stream (a chunk, or the error that comes before
        any); None when the client went away first."""
        gone = asyncio.ensure_future(_disconnected(request))
        get = asyncio.ensure_future(queue.get())
        try:
            await asyncio.wait((get, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not get.done():
            get.cancel()
            return None
        return get.result()

    async def _events(self, first, queue: asyncio.Queue, tasks, choices, head, chat: bool, logprobs: bool,
                      include_usage: bool, n: int, max_tokens: str = "max_tokens",
                      prompt: str = "prompt") -> AsyncIterator[bytes]:
        """The stream's Server-Sent Events; cancelling it (the client went away)
        cancels the generations. An error after the first chunk is one
        ``data: {"error": ...}`` event, then the stream ends (no [DONE]); it
        names the output bound ``max_tokens`` as the client did. With
        ``include_usage``, every chunk has ``"usage": null`` but the last, which
        has no choices and the usage (as the API streams it)."""
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        if include_usage:
            head["usage"] = None
        left = len(tasks)
        item = first
        try:
            if chat:
                for c in choices:
                    yield translate.sse({**head, "choices": [{"index": c.index, "delta": {"role": "assistant",
                                                                                          "content": ""},
                                                              "logprobs": None, "finish_reason": None}]})
            while True:
                index, chunk = item
                if chunk is None:
                    left -= 1
                    if not left:
                        break
                elif isinstance(chunk, BaseException):
                    yield translate.sse(translate.error_body(chunk, max_tokens, prompt)[1])
                    return
                else:
                    c = choices[index]
                    c.add(chunk)
                    yield translate.sse({**head, "choices": [self._delta(c, chunk, chat, logprobs)]})
                item = await queue.get()
            if include_usage:
                yield translate.sse({**head, "choices": [], "usage": translate.usage_of(choices, n)})
            yield translate.DONE
        finally:
            self._cancel(tasks)

    @staticmethod
    def _delta(c: translate.Choice, chunk, chat: bool, logprobs: bool) -> dict:
        entries = [*chunk.prompt_logprobs, *chunk.logprobs]
        if chat:
            return {"index": c.index, "delta": {"content": chunk.text} if chunk.text else {},
                    "logprobs": c.chat_logprobs(entries) if logprobs and entries else None,
                    "finish_reason": c.finish_reason}
        return {"index": c.index, "text": chunk.text,
                "logprobs": c.completion_logprobs(entries) if logprobs else None,
                "finish_reason": c.finish_reason}

    @staticmethod
    def _cancel(tasks) -> None:
        for t in tasks:
            t.cancel()


def refused_for(exc: BaseException) -> float | None:
    """Seconds to wait before asking again when ``exc`` is a full queue's
    refusal (RESOURCE_EXHAUSTED: its retry-after, at most
    :data:`MAX_CHOICE_RETRY_WAIT_S`), else None. Pure."""
    if not isinstance(exc, (LlmeshError, Relayed)):
        return None
    code, _, trailers = status.status_of(exc)
    if code != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    return min(MAX_CHOICE_RETRY_WAIT_S, max(0.05, status.retry_after_s(trailers)))


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read:
    the server's next message is ``http.disconnect``)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def invalid(exc: ValidationError, body: bytes = b"") -> JSONResponse:
    """A 400 naming the first field the body got wrong, as the client wrote it."""
    param, message = explain(exc, body)
    # A token id no vocabulary holds is out of range, as the target says of one past its own vocabulary.
    code = "out_of_range" if any(e["type"] == "token_id" for e in exc.errors()) else "invalid_argument"
    return JSONResponse(translate.error_payload(message, "invalid_request_error", code, param), status_code=400)


def create_app(door: FrontDoor, provider: TracerProvider | None = None, allowed_origins: list[str] = ()):
    """The ASGI application of ``door``: FastAPI routes, errors in the API's
    shape, inside OpenTelemetry's ASGI middleware (with ``provider``): where
    the provider exports, a server span per request (not per SSE event, not
    for ``/health``), continuing the client's W3C ``traceparent``, the router's
    upstream spans its children and the request's ``user`` its
    ``enduser.id``; where it does not (the no-op provider), the client's
    ``traceparent`` goes on to the upstream call unchanged. Browsers on
    ``allowed_origins`` (``*``: any) may call it: Starlette's CORS middleware
    answers their preflight ``OPTIONS`` and marks the responses, as vLLM's
    ``--allowed-origins`` does (no credentials: the bearer token is a header
    the page sets). The GET routes answer ``HEAD`` too."""
    app = FastAPI(title="llmesh", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)

    @app.exception_handler(Exception)
    async def failed(request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def no_route(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # An unknown path (404) or method (405): the API's error shape too.
        what = f"{request.method} {request.url.path}"
        message = {404: f"no such endpoint: {what}", 405: f"method not allowed: {what}"}.get(exc.status_code,
                                                                                             str(exc.detail))
        return JSONResponse(translate.error_payload(message, "invalid_request_error",
                                                    "not_found" if exc.status_code == 404 else None),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    # The body is parsed here, not by FastAPI: it is JSON whatever the Content-Type
    # says (`curl -d` sends application/x-www-form-urlencoded), as the reference server takes it.
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await answer(request, CompletionRequest, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await answer(request, ChatCompletionRequest, chat=True)

    async def answer(request: Request, schema, chat: bool) -> Response:
        try:
            door.authorize(request)  # before the body is read: a stranger's 16 MiB costs nothing
        except Exception as exc:  # noqa: BLE001 - answered in the API's shape
            return error_response(exc)
        try:
            raw = await read_body(request, door.max_body_bytes)
        except BodyTooLarge as exc:
            return JSONResponse(translate.error_payload(str(exc), "invalid_request_error", "request_too_large"),
                                status_code=413, headers={"Connection": "close"})
        try:
            body = schema.model_validate_json(raw)
        except ValidationError as exc:
            return invalid(exc, raw)
        if body.user:
            trace.get_current_span().set_attribute("enduser.id", body.user)
        try:
            return await door.respond(request, body, chat=chat)
        except Exception as exc:  # noqa: BLE001 - answered in the API's shape
            return error_response(exc, translate.max_tokens_name(body), translate.prompt_name(body))

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def models(request: Request) -> Response:
        try:
            door.authorize(request)
        except Exception as exc:  # noqa: BLE001
            return error_response(exc)
        return JSONResponse({"object": "list", "data": [model_object(name, door.max_model_len(name))
                                                        for name in door.model_names()]})

    @app.api_route("/v1/models/{model:path}", methods=["GET", "HEAD"])
    async def model(request: Request, model: str) -> Response:
        try:
            door.authorize(request)
            door.check_model(model)
        except Exception as exc:  # noqa: BLE001
            return error_response(exc)
        return JSONResponse(model_object(model, door.max_model_len(model)))

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> Response:
        if door.serving():
            return JSONResponse({"status": "ok"})
        return JSONResponse(translate.error_payload("no target instance can serve now", "service_unavailable_error",
                                                    "unavailable"), status_code=503)

    served = without_trailing_slash(app)
    if allowed_origins:
        served = CORSMiddleware(served, allow_origins=list(allowed_origins), allow_methods=["*"],
                                allow_headers=["*"])
    if provider is None:
        return served
    return OpenTelemetryMiddleware(served, excluded_urls="/health", tracer_provider=provider,
                                   exclude_spans=["receive", "send"])


def model_object(name: str, max_model_len: int | None = None) -> dict:
    """The API's model object of a served model name, with vLLM's ``root``,
    ``parent`` and ``max_model_len`` (the targets' context, where they said it).
    ``created`` is the time of the answer, as vLLM gives it."""
    out = {"id": name, "object": "model", "created": int(time.time()), "owned_by": "llmesh", "root": name,
           "parent": None}
    if max_model_len:
        out["max_model_len"] = max_model_len
    return out


def without_trailing_slash(app):
    """``app`` serving ``/v1/completions/`` as ``/v1/completions``: a redirect
    (Starlette's default) is not followed by curl, nor for a POST by most
    clients."""
    async def serve(scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and len(path) > 1 and path.endswith("/"):
            scope = {**scope, "path": path.rstrip("/") or "/"}
        await app(scope, receive, send)

    return serve
