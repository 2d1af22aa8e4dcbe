"""Sends a generation to a target instance and streams its chunks back.

One request may travel to several instances (at most ``max_attempts``): a
failure before the first token retries elsewhere, a failure after it resumes
elsewhere from the tokens already streamed (:mod:`router.failover`). Every
attempt carries the client's remaining deadline; the client cancelling (or
going away) cancels the upstream call, which frees the target's KV cache.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable

import grpc

from router import codec
from router.config import RouterConfig
from router.failover import Outcome, decide, is_instance_fault, short_reason
from router.fleet import Fleet
from router.registry import Instance, Role
from services.common.errors import DeadlineExceeded, LlmeshError, Relayed, ResourceExhausted, Unavailable
from services.common.stubs import generation_pb2 as gen
from services.common.stubs import model_pb2_grpc
from services.engine.metrics import EngineMetrics

log = logging.getLogger(__name__)

#: Upstream codes that say "this instance cannot serve now"; they reach the
#: client as the router's own UNAVAILABLE with the fleet's state, not as is.
_TRANSPORT = frozenset({"UNAVAILABLE", "CANCELLED"})


class UpstreamError(Relayed):
    """A status from a target instance, relayed to the client unchanged
    (code, details and trailing metadata such as ``retry-after-ms``)."""

    def __init__(self, code: str, details: str, trailers: tuple[tuple[str, str], ...] = (),
                 instance_id: str = "") -> None:
        super().__init__(code, details, trailers)
        self.instance_id = instance_id

    @classmethod
    def of(cls, exc: grpc.aio.AioRpcError, instance_id: str) -> "UpstreamError":
        trailers = tuple((k, v) for k, v in (exc.trailing_metadata() or ())
                         if isinstance(v, str) and not k.startswith("grpc-"))
        return cls(exc.code().name, exc.details() or "", trailers, instance_id)


class Forwarder:
    """Routes each generation to an instance chosen by the fleet's policy."""

    def __init__(self, fleet: Fleet, config: RouterConfig, metrics: EngineMetrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.fleet = fleet
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.in_flight = 0

    async def generate(self, request: gen.GenerateRequest,
                       time_remaining: Callable[[], float | None]) -> AsyncIterator[gen.GenerateChunk]:
        """The chunks of one generation. ``time_remaining()`` is the client's
        remaining deadline in seconds (None: no deadline). Raises domain
        errors and :class:`UpstreamError`."""
        codec.validate_request(request)
        bound = self.config.max_in_flight
        if bound and self.in_flight >= bound:
            self.metrics.record_rejected()
            raise ResourceExhausted(f"the router has {self.in_flight} requests in flight (its bound); "
                                    "retry later", retry_after_s=0.1)
        self.in_flight += 1
        started = self.clock()
        first_at = last_at = None
        tokens = 0
        failed = True
        try:
            async for chunk in self._forward(request, time_remaining):
                if chunk.token_ids:
                    last_at = self.clock()
                    first_at = first_at or last_at
                    tokens += len(chunk.token_ids)
                    self.metrics.record_tokens(last_at, len(chunk.token_ids))
                yield chunk
            failed = False
        except (asyncio.CancelledError, GeneratorExit):
            failed = False  # the client went away: not an error of the fleet
            raise
        finally:
            self.in_flight -= 1
            now = self.clock()
            ttft = first_at - started if first_at is not None else None
            tpot = (last_at - first_at) / (tokens - 1) if first_at is not None and tokens > 1 else None
            self.metrics.record_request(now, ttft, tpot, now - started, 0.0, error=failed)

    async def _forward(self, request: gen.GenerateRequest,
                       time_remaining: Callable[[], float | None]) -> AsyncIterator[gen.GenerateChunk]:
        req = gen.GenerateRequest()
        req.CopyFrom(request)
        if not req.request_id:
            req.request_id = uuid.uuid4().hex
        if req.sampling.temperature > 0 and not req.sampling.HasField("seed"):
            # A seed of the router's choosing keeps "random" sampling random
            # and makes a resumed stream exact.
            req.sampling.seed = random.getrandbits(63)
        pool = self.config.pool
        sequence = self.fleet.next_sequence()
        streamed: list[int] = []
        tried: list[str] = []
        last: UpstreamError | None = None
        while True:
            if len(req.resume_tokens) + len(streamed) >= req.sampling.max_new_tokens:
                # The stream broke after its last token but before its last chunk.
                yield gen.GenerateChunk(request_id=req.request_id, finish_reason=gen.FINISH_REASON_LENGTH,
                                        instance_id=tried[-1])
                return
            inst = self.fleet.choose(Role.TARGET, pool, sequence, frozenset(tried))
            if inst is None:
                raise self._nothing_left(pool, tried, last)
            tried.append(inst.id)
            attempt = self._attempt_request(req, streamed, pool, sequence)
            remaining = time_remaining()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded("the request's deadline passed")
            resumed = len(streamed)
            error = None
            self.fleet.registry.started(inst.id)
            call = model_pb2_grpc.TargetModelStub(self.fleet.channel(inst.id)).Generate(attempt, timeout=remaining)
            finished = False
            try:
                async for chunk in call:
                    chunk.instance_id = inst.id
                    if resumed and chunk.HasField("usage"):
                        chunk.usage.prompt_tokens -= resumed
                    streamed.extend(chunk.token_ids)
                    yield chunk
                    if chunk.finish_reason != gen.FINISH_REASON_UNSPECIFIED:
                        # Read on to the stream's end (it follows at once), so the call
                        # and its client span close normally instead of being cancelled.
                        finished = True
                        self.fleet.registry.record_success(inst.id)
                if finished:
                    return
                error = UpstreamError("UNAVAILABLE", "the stream ended before its last chunk", (), inst.id)
            except grpc.aio.AioRpcError as exc:
                error = UpstreamError.of(exc, inst.id)
            finally:
                self.fleet.registry.finished(inst.id)
                call.cancel()
            self._record_failure(inst, error)
            outcome = decide(error.code, len(streamed), len(tried), self.config.max_attempts, self.config.resume)
            log.info("request %s on %s failed (%s: %s) after %d tokens: %s", req.request_id, inst.id,
                     error.code, short_reason(error.details), len(streamed), outcome.value)
            if outcome is Outcome.FAIL:
                raise self._unavailable(error, tried) if error.code in _TRANSPORT else error
            last = error

    def _attempt_request(self, req: gen.GenerateRequest, streamed: list[int], pool: str,
                         sequence: int) -> gen.GenerateRequest:
        attempt = gen.GenerateRequest()
        attempt.CopyFrom(req)
        attempt.resume_tokens.extend(streamed)
        if streamed:
            attempt.echo_prompt = False  # the client has it already
        if codec.wants_draft(req):
            draft = self.fleet.choose(Role.DRAFT, pool, sequence)
            if draft is not None:
                attempt.draft_address = draft.address
        return attempt

    def _record_failure(self, inst: Instance, error: UpstreamError) -> None:
        if not is_instance_fault(error.code):
            return
        unreachable = short_reason(error.details) if error.code in _TRANSPORT else None
        self.fleet.registry.record_failure(inst.id, self.clock(), unreachable)
        if unreachable is not None:
            self.fleet.suspect(inst.id)

    def _nothing_left(self, pool: str, tried: list[str], last: UpstreamError | None) -> LlmeshError:
        if last is not None and last.code not in _TRANSPORT:
            return last  # e.g. RESOURCE_EXHAUSTED everywhere: its retry-after goes to the client
        message = self.fleet.why_none(Role.TARGET, pool, frozenset(tried))
        if last is not None:
            message += f"; last error from {last.instance_id}: {last.code} ({short_reason(last.details)})"
        return Unavailable(message)

    def _unavailable(self, error: UpstreamError, tried: list[str]) -> Unavailable:
        return Unavailable(f"gave up after {len(tried)} attempt(s) ({', '.join(tried)}); last error from "
                           f"{error.instance_id}: {error.code} ({short_reason(error.details)})")
