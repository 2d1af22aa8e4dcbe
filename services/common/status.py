"""The one place where domain errors become gRPC status codes.

:class:`ErrorInterceptor` wraps every handler of a server. Domain errors
(:mod:`services.common.errors`) become their status code with the error's own
message; anything else is logged with its traceback and becomes ``INTERNAL``
with an incident id, so no traceback ever reaches a client.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import uuid

import grpc

from services.common import errors

log = logging.getLogger(__name__)

RETRY_AFTER_KEY = "retry-after-ms"

_CODES: list[tuple[type[errors.LlmeshError], grpc.StatusCode]] = [
    (errors.OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.ModelFault, grpc.StatusCode.INTERNAL),
]


def retry_after_s(trailers, default: float = 1.0) -> float:
    """Seconds the ``retry-after-ms`` trailer among ``trailers`` ((key, value) pairs) says,
    ``default`` where there is none or it is not a number of milliseconds."""
    ms = dict(trailers).get(RETRY_AFTER_KEY)
    return int(ms) / 1000 if ms and ms.isdigit() else default


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """The status code, client-safe message and trailing metadata for an exception."""
    if isinstance(exc, errors.Relayed):
        return grpc.StatusCode[exc.code], exc.details, exc.trailers
    if isinstance(exc, errors.LlmeshError):
        for cls, code in _CODES:
            if isinstance(exc, cls):
                trailers: tuple[tuple[str, str], ...] = ()
                if isinstance(exc, errors.ResourceExhausted):
                    trailers = ((RETRY_AFTER_KEY, str(int(exc.retry_after_s * 1000))),)
                return code, exc.message, trailers
    if isinstance(exc, NotImplementedError):
        # A generated servicer's method that the service does not implement (grpc's own stubs raise this).
        return grpc.StatusCode.UNIMPLEMENTED, "this service does not implement the method", ()
    incident = uuid.uuid4().hex[:12]
    log.error("internal error (incident %s)", incident, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (incident {incident}); see the service log", ()


#: Longest status message sent: a message that quotes a client's huge input
#: must not exceed the trailing-metadata limit (8 KiB by default), which would
#: turn the status into another one on the client's side.
MAX_MESSAGE_CHARS = 1024


def _bounded(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS - 1] + "…"


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    code, message, trailers = status_of(exc)
    message = _bounded(message)
    if trailers:
        context.set_trailing_metadata(trailers)
    await context.abort(code, message)


def _passes_through(exc: BaseException) -> bool:
    # AbortError is how context.abort() unwinds; cancellation must propagate.
    return isinstance(exc, (grpc.aio.AbortError, asyncio.CancelledError))


def _client_gone(context: grpc.aio.ServicerContext, exc: BaseException) -> bool:
    """True when the call had already ended (the client cancelled, its deadline
    passed or its connection died) when ``exc`` was raised: typically a write
    to it failing (grpc's ExecuteBatchError). Nothing can be sent, and it is no
    fault of the service's: it is logged at debug level, not as an incident."""
    if not (context.cancelled() or context.done()):
        return False
    log.debug("the call ended before its handler did (%s: %s)", type(exc).__name__, exc)
    return True


def _wrap_unary(behavior):
    async def handler(request_or_iterator, context):
        try:
            return await behavior(request_or_iterator, context)
        except BaseException as exc:  # noqa: BLE001 - every error is mapped here
            if _passes_through(exc):
                raise
            if not _client_gone(context, exc):
                await _abort(context, exc)

    return handler


def _wrap_stream(behavior):
    if not inspect.isasyncgenfunction(behavior):
        return _wrap_writer(behavior)

    async def handler(request_or_iterator, context):
        try:
            async for response in behavior(request_or_iterator, context):
                yield response
        except BaseException as exc:  # noqa: BLE001 - every error is mapped here
            if _passes_through(exc) or isinstance(exc, GeneratorExit):
                raise
            if not _client_gone(context, exc):
                await _abort(context, exc)

    return handler


def _wrap_writer(behavior):
    """A streaming handler written as a coroutine that calls context.write()
    (grpc's own HealthServicer.Watch), presented as an async generator that
    yields nothing, since interceptors outside this one iterate it."""
    async def handler(request_or_iterator, context):
        try:
            await behavior(request_or_iterator, context)
        except BaseException as exc:  # noqa: BLE001 - every error is mapped here
            if _passes_through(exc):
                raise
            if not _client_gone(context, exc):
                await _abort(context, exc)
        return
        yield  # pragma: no cover - makes this an async generator

    return handler


class _Undecodable:
    """What a request message that could not be parsed becomes, so that the
    handler (not grpc's core, which answers UNKNOWN) refuses it."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def refuse(self) -> errors.InvalidArgument:
        return errors.InvalidArgument("request", "is not a valid protobuf message of this method's request type "
                                                 f"(bytes that do not parse, or a string field that is not UTF-8): "
                                                 f"{type(self.error).__name__}")


def _tolerant(deserializer):
    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError and friends: the client sent bad bytes
            return _Undecodable(exc)

    return parse


def _checked_unary(behavior):
    async def checked(request, context):
        if isinstance(request, _Undecodable):
            raise request.refuse()
        return await behavior(request, context)

    return checked


async def _checked_messages(request_iterator):
    async for message in request_iterator:
        if isinstance(message, _Undecodable):
            raise message.refuse()
        yield message


def _checked_stream_in(behavior):
    if inspect.isasyncgenfunction(behavior):
        async def checked_gen(request_iterator, context):
            async for response in behavior(_checked_messages(request_iterator), context):
                yield response

        return checked_gen

    async def checked(request_iterator, context):
        return await behavior(_checked_messages(request_iterator), context)

    return checked


def _checked_unary_in_stream_out(behavior):
    if not inspect.isasyncgenfunction(behavior):
        return _checked_unary(behavior)

    async def checked(request, context):
        if isinstance(request, _Undecodable):
            raise request.refuse()
        async for response in behavior(request, context):
            yield response

    return checked


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions raised by any handler to a gRPC status.

    Requests whose bytes do not parse (or hold invalid UTF-8 in a string
    field) reach the handler as a marker and are refused INVALID_ARGUMENT
    here, instead of grpc's ``UNKNOWN: Unexpected DecodeError``.
    """

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if handler.request_deserializer is not None:
            handler = handler._replace(request_deserializer=_tolerant(handler.request_deserializer))
        else:
            return self._wrap(handler)
        if handler.unary_unary:
            handler = handler._replace(unary_unary=_checked_unary(handler.unary_unary))
        elif handler.stream_unary:
            handler = handler._replace(stream_unary=_checked_stream_in(handler.stream_unary))
        elif handler.unary_stream:
            handler = handler._replace(unary_stream=_checked_unary_in_stream_out(handler.unary_stream))
        elif handler.stream_stream:
            handler = handler._replace(stream_stream=_checked_stream_in(handler.stream_stream))
        return self._wrap(handler)

    @staticmethod
    def _wrap(handler):
        if handler.unary_unary:
            return handler._replace(unary_unary=_wrap_unary(handler.unary_unary))
        if handler.stream_unary:
            return handler._replace(stream_unary=_wrap_unary(handler.stream_unary))
        if handler.unary_stream:
            return handler._replace(unary_stream=_wrap_stream(handler.unary_stream))
        if handler.stream_stream:
            return handler._replace(stream_stream=_wrap_stream(handler.stream_stream))
        return handler
