"""Sends a generation to a target instance and streams its chunks back.

One request may travel to several instances (at most ``max_attempts``): a
failure before the first token retries elsewhere, a failure after it resumes
elsewhere from the tokens already streamed (:mod:`router.failover`). Every
attempt carries the client's remaining deadline; the client cancelling (or
going away) cancels the upstream call, which frees the target's KV cache.

This is the router's hot path, so chunks travel as they came: the upstream
chunk object itself is handed to ``emit`` (``context.write`` for
Router.Generate) with only ``instance_id`` set, with no generator layers in
between, and the upstream call is made without client interceptors (the
trace context is injected by hand, with one client span per attempt).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable

import grpc
from opentelemetry import trace
from opentelemetry.propagate import inject
from opentelemetry.trace import TracerProvider

from router import codec
from router.admission import Admission
from router.cache import ResponseCache
from router.config import RouterConfig
from router.failover import DraftVerdict, Fault, Outcome, decide, draft_verdict, fault_of, relayed_as_is, short_reason
from router.upstreams import GENERATE_METHOD, Upstreams
from router.registry import Instance, Role
from router.stalls import StallWatch
from services.common import status
from services.common.errors import (DeadlineExceeded, InvalidArgument, LlmeshError, Relayed, ResourceExhausted,
                                    Unavailable)
from services.common.stubs import generation_pb2 as gen
from services.common.metrics import WindowedMetrics, ttft_tpot

log = logging.getLogger(__name__)

#: Where the chunks of a generation go (``context.write``, a CompletionBuilder's ``add``).
Emit = Callable[[gen.GenerateChunk], Awaitable[None]]

class UpstreamError(Relayed):
    """A status from a target instance: relayed to the client unchanged (code,
    details and trailing metadata such as ``retry-after-ms``) when it is the
    request's own fault or a full fleet's (:func:`router.failover.relayed_as_is`),
    else named in the router's UNAVAILABLE."""

    def __init__(self, code: str, details: str, trailers: tuple[tuple[str, str], ...] = (),
                 instance_id: str = "") -> None:
        super().__init__(code, details, trailers)
        self.instance_id = instance_id

    @classmethod
    def of(cls, exc: grpc.aio.AioRpcError, instance_id: str) -> "UpstreamError":
        trailers = tuple((k, v) for k, v in (exc.trailing_metadata() or ())
                         if isinstance(v, str) and not k.startswith("grpc-"))
        return cls(exc.code().name, exc.details() or "", trailers, instance_id)


def status_name(exc: BaseException) -> str:
    """The gRPC status name an error a request ended with is answered as ("INTERNAL" for an
    exception that is no status of llmesh's)."""
    if isinstance(exc, Relayed):
        return exc.code
    if isinstance(exc, LlmeshError):
        return status.status_of(exc)[0].name
    return "INTERNAL"


def fault_of_error(exc: BaseException) -> Fault:
    """Whose fault the error a request ended with is (:func:`router.failover.fault_of` of its status)."""
    return fault_of(status_name(exc))


class _Tally:
    """What one request has streamed so far (for metrics and the cache)."""

    __slots__ = ("started", "first_at", "last_at", "tokens", "chunks", "kept")

    def __init__(self, keep: bool, started: float) -> None:
        #: When the router took the request (its clock): TTFT counts from here.
        self.started = started
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.tokens = 0
        #: Chunks sent to the client (a chunk may carry no token: the echoed prompt).
        self.chunks = 0
        self.kept: list[gen.GenerateChunk] | None = [] if keep else None


class Forwarder:
    """Routes each generation to an instance chosen by the routing policy."""

    def __init__(self, upstreams: Upstreams, config: RouterConfig, metrics: WindowedMetrics,
                 clock: Callable[[], float] = time.monotonic, provider: TracerProvider | None = None) -> None:
        self.upstreams = upstreams
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.tracer = (provider or trace.NoOpTracerProvider()).get_tracer("llmesh.router")
        self.in_flight = 0
        self.admission = Admission(config.pool_max_in_flight, config.pool_bounds())
        self.cache: ResponseCache[tuple[gen.GenerateChunk, ...]] | None = (
            ResponseCache(config.cache_size, config.cache_ttl_s) if config.cache_size else None)
        #: Streams in flight per target: the stalled ones on a target that stopped answering are cut to resume.
        self.stalls = StallWatch(upstreams.registry, config.stale_after_s, clock)
        #: Admission needs to know which pools can serve only when a pool has a bound or a spillover.
        self._pools_matter = bool(config.pool_max_in_flight or config.pool_bounds() or config.spillover_map())

    async def generate(self, request: gen.GenerateRequest, time_remaining: Callable[[], float | None],
                       emit: Emit) -> None:
        """Streams one generation's chunks to ``emit``. ``time_remaining()`` is
        the client's remaining deadline in seconds (None: no deadline). Raises
        domain errors and :class:`UpstreamError`."""
        codec.validate_request(request)
        self._check_router_fields(request)
        pools = self.upstreams.pools_for(codec.PRIORITY_CLASS[request.priority])
        key = codec.cache_key(request, pools[0]) if self.cache is not None else None
        started = self.clock()
        if key is not None:
            hit = self.cache.get(key, started)
            if hit is not None:
                await self._replay(hit, request, started, emit)
                return
        bound = self.config.max_in_flight
        if bound and self.in_flight >= bound:
            self.metrics.record_rejected()
            raise ResourceExhausted(f"the router has {self.in_flight} requests in flight (its bound); "
                                    "retry later", retry_after_s=0.1)
        if self._pools_matter:
            try:
                pool = self.admission.admit(pools, lambda p: self.upstreams.routable(Role.TARGET, p))
            except ResourceExhausted:
                self.metrics.record_rejected()
                raise
            if pool != pools[0]:  # spilled over: try that pool first, then the others in order
                pools = (pool, *(p for p in pools if p != pool))
        else:
            pool = pools[0]
            self.admission.take(pool)
        self.in_flight += 1
        tally = _Tally(keep=key is not None, started=started)
        succeeded = failed = False
        try:
            await self._forward(request, pools, time_remaining, emit, tally)
            succeeded = True
        except asyncio.CancelledError:
            tally.kept = None  # the client went away: not an error of the fleet
            raise
        except Exception as exc:
            # Bad input a target found is the request's fault, not the fleet's error, as when the router
            # finds it (its own checks come before any count); a passed deadline is the fleet's (too slow);
            # a full fleet's refusal counts as rejected.
            fault = fault_of_error(exc)
            failed = fault not in (Fault.REQUEST, Fault.BUSY) or status_name(exc) == "DEADLINE_EXCEEDED"
            if fault is Fault.BUSY:
                self.metrics.record_rejected()
            raise
        finally:
            self.in_flight -= 1
            now = self.clock()
            # Only a served request's time is a service time (Admission's retry-after divides it).
            self.admission.release(pool, now - started if succeeded else None)
            first_at, tokens = tally.first_at, tally.tokens
            _, tpot = ttft_tpot(started, first_at, tally.last_at, tokens)
            self.metrics.record_request(now, tpot, now - started, error=failed)
            kept = tally.kept
            if kept and succeeded and kept[-1].finish_reason in codec.COMPLETE:
                self.cache.put(key, tuple(kept), now)

    def _check_router_fields(self, request: gen.GenerateRequest) -> None:
        """The fields the router sets for a target, as a client may send them:
        ``draft_address`` only naming a draft registered with this router (else
        a caller of the public port could make a target connect anywhere), and
        no ``resume_tokens`` (the router's own, for a stream it resumes; a
        client continues a generation by putting the tokens in its prompt).
        Raises InvalidArgument naming the field."""
        if request.resume_tokens:
            raise InvalidArgument("resume_tokens", "is set by the router when it resumes a broken stream; "
                                                   "to continue a generation, put its tokens in the prompt")
        address = request.draft_address
        if address and all(i.address != address for i in self.upstreams.registry.select(Role.DRAFT)):
            raise InvalidArgument("draft_address", f"{address} is not the address of a draft registered with this "
                                                   "router (as ListInstances shows it); leave it empty and the "
                                                   "router chooses one")

    async def _replay(self, chunks: tuple[gen.GenerateChunk, ...], request: gen.GenerateRequest,
                      started: float, emit: Emit) -> None:
        """A cached answer, streamed (and counted) like a live one."""
        request_id = request.request_id or uuid.uuid4().hex
        tokens, first = 0, None
        for chunk in codec.replay(chunks, request_id):
            if chunk.token_ids:
                now = self.clock()
                if not tokens:
                    first = now - started
                    self.metrics.record_first_token(now, first)
                tokens += len(chunk.token_ids)
                self.metrics.record_tokens(now, len(chunk.token_ids))
            if chunk.HasField("timing"):  # the original's timing is not this request's
                chunk.timing.CopyFrom(codec.replay_timing(first, self.clock() - started, tokens))
            await emit(chunk)
        now = self.clock()
        self.metrics.record_request(now, 0.0 if tokens > 1 else None, now - started)

    async def _forward(self, request: gen.GenerateRequest, pools: tuple[str, ...],
                       time_remaining: Callable[[], float | None], emit: Emit, tally: _Tally) -> None:
        req = gen.GenerateRequest()
        req.CopyFrom(request)
        if not req.request_id:
            req.request_id = uuid.uuid4().hex
        if req.sampling.temperature > 0 and not req.sampling.HasField("seed"):
            # A seed of the router's choosing keeps "random" sampling random
            # and makes a resumed stream exact.
            req.sampling.seed = random.getrandbits(63)
        sequence = self.upstreams.next_sequence()
        prefix = self.upstreams.prefix_blocks(codec.prompt_units(req.prompt))
        streamed: list[int] = []
        tried: list[str] = []
        last: UpstreamError | None = None
        while True:
            if streamed and len(streamed) >= req.sampling.max_new_tokens:
                # The stream broke after its last token but before its last chunk.
                await emit(gen.GenerateChunk(request_id=req.request_id, finish_reason=gen.FINISH_REASON_LENGTH,
                                             instance_id=tried[-1]))
                return
            inst = self.upstreams.choose(Role.TARGET, pools, sequence, frozenset(tried), prefix)
            if inst is None:
                raise self._nothing_left(pools, tried, last)
            tried.append(inst.id)
            attempt, draft = self._attempt_request(req, streamed, tally.chunks > 0, inst, pools, sequence, prefix)
            remaining = time_remaining()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded("the request's deadline passed")
            try:
                movable = lambda: (len(tried) < self.config.max_attempts  # noqa: E731
                                   and self.upstreams.routable_besides(Role.TARGET, pools, tried))
                error = await self._attempt(inst, attempt, draft, remaining, streamed, emit, tally, sequence,
                                            movable)
            finally:
                self.upstreams.finished(inst.id, sequence)
            if error is None:
                return
            self._record_failure(inst, error)
            outcome = decide(error.code, len(streamed), len(tried), self.config.max_attempts, self.config.resume)
            log.info("request %s on %s failed (%s: %s) after %d tokens: %s", req.request_id, inst.id,
                     error.code, short_reason(error.details), len(streamed), outcome.value)
            if outcome is Outcome.FAIL:
                raise error if relayed_as_is(error.code) else self._unavailable(error, tried)
            last = error

    async def _attempt(self, inst: Instance, attempt: gen.GenerateRequest, draft: Instance | None,
                       timeout: float | None, streamed: list[int], emit: Emit, tally: _Tally,
                       sequence: int, movable: Callable[[], bool]) -> UpstreamError | None:
        """One upstream call, its chunks passed on as they come; the error that
        ended it early, or None when it finished. The last chunk's speculation
        figures are what the router learns of ``draft`` (the draft it chose).
        A call :class:`router.stalls.StallWatch` cut (its target stopped
        answering) ends with UNAVAILABLE, and resumes elsewhere."""
        instance_id, resumed, prefilling = inst.id, len(streamed), True
        clock, record_tokens, kept = self.clock, self.metrics.record_tokens, tally.kept
        registry = self.upstreams.registry
        with self.tracer.start_as_current_span(GENERATE_METHOD, kind=trace.SpanKind.CLIENT,
                                               attributes={"rpc.system": "grpc", "rpc.service": "llmesh.v1.TargetModel",
                                                           "rpc.method": "Generate",
                                                           "llmesh.instance_id": instance_id}) as span:
            metadata: dict[str, str] = {}
            inject(metadata)
            registry.started(instance_id)
            call = self.upstreams.generate_method(instance_id)(attempt, timeout=timeout,
                                                         metadata=tuple(metadata.items()))
            live = self.stalls.open(instance_id, movable, call)
            try:
                async for chunk in call:
                    live.last_at = clock()
                    chunk.instance_id = instance_id
                    ids = chunk.token_ids
                    if ids:
                        if prefilling:
                            self.upstreams.prefilled(instance_id, sequence)
                            prefilling = False
                        n = len(ids)
                        streamed.extend(ids)
                        now = clock()
                        if tally.first_at is None:
                            tally.first_at = now
                            self.metrics.record_first_token(now, now - tally.started)
                        tally.last_at = now
                        tally.tokens += n
                        record_tokens(now, n)
                    if resumed and chunk.HasField("usage"):
                        chunk.usage.prompt_tokens -= resumed
                    if kept is not None:
                        kept.append(chunk)
                    tally.chunks += 1
                    await emit(chunk)
                    if chunk.finish_reason:
                        registry.record_success(instance_id)
                        if draft is not None and chunk.HasField("speculation"):
                            self._judge_draft(draft, inst, chunk.speculation)
                        return None
                error = UpstreamError("UNAVAILABLE", "the stream ended before its last chunk", (), instance_id)
            except grpc.aio.AioRpcError as exc:
                error = UpstreamError.of(exc, instance_id)
            except asyncio.CancelledError:
                # The stall watch's cut reads as a cancellation of the call, not of this task (whose
                # cancellation, the client gone, is raised on).
                if not live.lost or asyncio.current_task().cancelling():
                    raise
                error = UpstreamError("UNAVAILABLE", live.lost, (), instance_id)
            finally:
                self.stalls.close(live)
                registry.finished(instance_id)
                call.cancel()
            span.set_attribute("rpc.grpc.status_code", grpc.StatusCode[error.code].value[0])
            span.set_status(trace.Status(trace.StatusCode.ERROR, f"{error.code}: {short_reason(error.details)}"))
            return error

    def _attempt_request(self, req: gen.GenerateRequest, streamed: list[int], sent: bool, target: Instance,
                         pools: tuple[str, ...], sequence: int, prefix: tuple[int, ...]
                         ) -> tuple[gen.GenerateRequest, Instance | None]:
        """The request for one attempt (resuming after ``streamed``; ``sent``:
        some chunk reached the client already) and the draft chosen for it."""
        attempt = gen.GenerateRequest()
        attempt.CopyFrom(req)
        attempt.resume_tokens.extend(streamed)
        if sent:
            attempt.echo_prompt = False  # the client has it already
            attempt.prompt_logprobs = False
        draft = None
        if codec.wants_draft(req):
            # A draft of the target's pool, else of the pools the request may use.
            draft_pools = (target.spec.pool, *(p for p in pools if p != target.spec.pool))
            draft = self.upstreams.choose(Role.DRAFT, draft_pools, sequence, prefix=prefix)
            if draft is not None:
                attempt.draft_address = draft.address
        return attempt, draft

    def _judge_draft(self, draft: Instance, target: Instance, stats: gen.SpeculationStats) -> None:
        """A draft whose rounds timed out on the target (alive, maybe SERVING,
        but silent) is ejected until its engine steps again; one whose rounds
        were verified is a success, unless the request fell back to n-gram
        lookup (see router.failover.draft_verdict)."""
        verdict = draft_verdict(stats.rounds, stats.draft_timeouts, fell_back=bool(stats.fallback_reason))
        if verdict is DraftVerdict.STALLED:
            reason = f"stalled ({stats.draft_timeouts} draft rounds timed out on {target.id})"
            log.warning("draft %s %s: out of rotation until it steps again", draft.id, reason)
            self.upstreams.registry.record_stall(draft.id, self.clock(), reason)
        elif verdict is DraftVerdict.ANSWERED:
            self.upstreams.registry.record_success(draft.id)

    def _record_failure(self, inst: Instance, error: UpstreamError) -> None:
        """Counts an instance's fault against it (see router.failover.FAULTS); a
        call cut off is not counted, but has its health looked at again (a
        server that stops cuts its calls off)."""
        fault = fault_of(error.code)
        if fault is Fault.CUT_OFF:
            self.upstreams.registry.record_cut_off(inst.id, self.clock())
            self.upstreams.suspect(inst.id)
            return
        if fault in (Fault.REQUEST, Fault.BUSY):
            return
        unreachable = short_reason(error.details) if fault is Fault.UNREACHABLE else None
        self.upstreams.registry.record_failure(inst.id, self.clock(), unreachable)
        if unreachable is not None:
            self.upstreams.suspect(inst.id)
        elif fault is Fault.WRONG_KIND:
            self.upstreams.verify(inst.id)

    def _nothing_left(self, pools: tuple[str, ...], tried: list[str], last: UpstreamError | None) -> LlmeshError:
        if last is not None and relayed_as_is(last.code):
            return last  # e.g. RESOURCE_EXHAUSTED everywhere: its retry-after goes to the client
        message = self.upstreams.why_none(Role.TARGET, pools, frozenset(tried))
        if last is not None:
            message += f"; last error from {last.instance_id}: {last.code} ({short_reason(last.details)})"
        return Unavailable(message)

    def _unavailable(self, error: UpstreamError, tried: list[str]) -> Unavailable:
        return Unavailable(f"gave up after {len(tried)} attempt(s) ({', '.join(tried)}); last error from "
                           f"{error.instance_id}: {error.code} ({short_reason(error.details)})")
