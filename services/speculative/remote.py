"""The remote proposer: a Proposer over one ``DraftModel.Propose`` stream.

The engine thread calls :meth:`RemoteProposer.propose`; the round runs on
the asyncio loop (write the request, read the proposal) and the result goes
back through the callback, from the loop's thread. Rounds of a sequence are
sent in order on its stream; a failure ends the stream and is reported once
(as ``Unavailable``), so the sequence goes on without speculation.

A draft that is alive but silent (its engine stuck, its health SERVING) is
noticed by the engine's deadlines: when a sequence gives up on it
(:meth:`RemoteProposer.unresponsive`), the client marks the draft's address
unresponsive. Until the draft answers again, new proposers for that address
fail their first round at once (no sequence waits on it), the rounds other
sequences are waiting for there fail at once too, and a probe asks the draft
for one token every few seconds (:data:`PROBE_MIN_S` doubling up to
:data:`PROBE_MAX_S`); the probe's answer, or a late answer on any stream,
clears the mark.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable

import grpc

from services.common.backoff import Backoff
from services.common.errors import Unavailable
from services.common.tls import Channels
from services.common.stubs import generation_pb2 as gen
from services.common.stubs import model_pb2, model_pb2_grpc
from services.engine.sequence import SamplingOptions
from services.speculative.state import Proposal, ProposalCallback
from services.speculative.sync import Round

log = logging.getLogger(__name__)

#: First and longest wait between probes of an unresponsive draft (seconds).
PROBE_MIN_S = 0.25
PROBE_MAX_S = 5.0
#: Longest wait for a probe's answer (seconds): one token on a one-token context.
PROBE_TIMEOUT_S = 2.0


class DraftLink:
    """What this target knows of one draft address: the stub every sequence
    shares, whether the draft is unresponsive, and its probe. Event loop only."""

    def __init__(self, address: str, stub: model_pb2_grpc.DraftModelStub) -> None:
        self.address = address
        self.stub = stub
        #: Why the draft is taken to be unresponsive ("" while it answers).
        self.unresponsive = ""
        #: Proposers with a stream open on this draft.
        self.proposers: set[RemoteProposer] = set()
        self._probe: asyncio.Task | None = None

    def mark(self, reason: str) -> None:
        """The draft stopped answering: fail what waits on it, probe until it answers."""
        if self.unresponsive:
            return
        self.unresponsive = reason
        log.warning("draft %s unresponsive (%s): no speculation through it until it answers again",
                    self.address, reason)
        for proposer in list(self.proposers):
            proposer.abort(f"draft {self.address} is unresponsive")
        self._probe = asyncio.get_running_loop().create_task(self._probe_loop(), name=f"probe:{self.address}")

    def answered(self) -> None:
        """The draft answered a round (or a probe): it is responsive again."""
        if not self.unresponsive:
            return
        self.unresponsive = ""
        log.info("draft %s answers again: speculating through it", self.address)
        if self._probe is not None and self._probe is not asyncio.current_task():
            self._probe.cancel()
        self._probe = None

    async def _probe_loop(self) -> None:
        backoff = Backoff(PROBE_MIN_S, PROBE_MAX_S)
        while self.unresponsive:
            await asyncio.sleep(backoff.next())
            if await self._probe_once():
                self.answered()
                return

    async def _probe_once(self) -> bool:
        """One round of one token on a one-token context; whether it was answered in time."""
        call = self.stub.Propose()
        try:
            await call.write(model_pb2.ProposeRequest(request_id=f"probe:{self.address}", append_tokens=[0], gamma=1,
                                                      sampling=gen.SamplingParams(temperature=0.0)))
            reply = await asyncio.wait_for(call.read(), PROBE_TIMEOUT_S)
            return reply is not grpc.aio.EOF
        except (asyncio.TimeoutError, grpc.aio.AioRpcError) as exc:
            log.debug("probe of draft %s: %s", self.address, _describe(exc))
            return False
        finally:
            call.cancel()

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)


#: Seconds a draft has to answer GetInfo (its context length).
INFO_TIMEOUT_S = 5.0


class ProposerClient:
    """Opens remote proposers: one channel per draft address, shared by every
    sequence that uses it, and the draft's context length, asked once per
    address (``DraftModel.GetInfo``; asked again while it has not answered).
    Event loop only."""

    def __init__(self, provider=None, channels: Channels | None = None) -> None:
        self._provider = provider
        self._channels_factory = channels or Channels()
        self._links: dict[str, DraftLink] = {}
        self._channels: list[grpc.aio.Channel] = []
        self._contexts: dict[str, int] = {}
        self._asking: dict[str, asyncio.Task] = {}

    def _learn(self, address: str, stub: model_pb2_grpc.DraftModelStub) -> asyncio.Task | None:
        """Asks the draft at ``address`` for its context unless known or asked."""
        if address in self._contexts:
            return None
        task = self._asking.get(address)
        if task is None:
            task = self._asking[address] = asyncio.get_running_loop().create_task(self._ask(address, stub))
        return task

    async def _ask(self, address: str, stub: model_pb2_grpc.DraftModelStub) -> None:
        try:
            info = await stub.GetInfo(model_pb2.GetInfoRequest(), timeout=INFO_TIMEOUT_S)
            if info.max_context > 0:
                self._contexts[address] = info.max_context
        except grpc.aio.AioRpcError as exc:
            log.warning("draft %s did not say its context: %s", address, _describe(exc))
        finally:
            self._asking.pop(address, None)

    def proposer(self, address: str, request_id: str, sampling: SamplingOptions, vocab_size: int,
                 ngram: bool = False) -> "RemoteProposer":
        """A proposer for one sequence on the draft at ``address`` ("host:port"),
        sampling as ``sampling`` says (temperature, top_p, top_k and seed;
        a sampled request's seed must be the one the target samples with, so
        that the draft draws with the target's noise); proposals must be ids
        in ``[0, vocab_size)``. Connects lazily: an unreachable draft shows as
        the first round's error, and so does one marked unresponsive (at once:
        the sequence does not wait)."""
        link = self.link(address)
        stub = link.stub
        draft_sampling = gen.SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                                            top_k=sampling.top_k)
        if sampling.seed is not None:
            draft_sampling.seed = sampling.seed
        proposer = RemoteProposer(stub, asyncio.get_running_loop(), request_id, draft_sampling, vocab_size,
                                  context=lambda: self._contexts.get(address),
                                  learning=self._learn(address, stub), link=link, ngram=ngram)
        if link.unresponsive:
            proposer.refuse(f"draft {address} is unresponsive ({link.unresponsive}); not waiting for it")
        return proposer

    def link(self, address: str) -> DraftLink:
        """The link to the draft at ``address`` (made on first use)."""
        link = self._links.get(address)
        if link is None:
            channel = self._channels_factory.open(address, self._provider)
            self._channels.append(channel)
            link = self._links[address] = DraftLink(address, model_pb2_grpc.DraftModelStub(channel))
        return link

    async def close(self) -> None:
        """Closes every channel (in-flight streams fail) and stops the probes."""
        for task in list(self._asking.values()):
            task.cancel()
        for link in self._links.values():
            await link.close()
        for channel in self._channels:
            await channel.close()


class RemoteProposer:
    """A Proposer whose draft is a ``DraftModel.Propose`` stream.
    ``context()`` gives the draft's context length once known (None before);
    ``learning`` is the request for it under way, which the first round waits for."""

    def __init__(self, stub: model_pb2_grpc.DraftModelStub, loop: asyncio.AbstractEventLoop, request_id: str,
                 sampling: gen.SamplingParams, vocab_size: int,
                 context: Callable[[], int | None] = lambda: None, learning: asyncio.Task | None = None,
                 link: DraftLink | None = None, ngram: bool = False) -> None:
        self._context_of = context
        self._method = gen.SPECULATION_METHOD_NGRAM if ngram else gen.SPECULATION_METHOD_DRAFT_MODEL
        self._learning = learning
        self._stub = stub
        self._loop = loop
        self._request_id = request_id
        self._sampling = sampling
        self._vocab_size = vocab_size
        self._link = link
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._closed = False
        #: Why every round fails at once without asking the draft ("": it is asked).
        self._refused = ""
        #: Why the stream was cut while a round waited (the draft went unresponsive).
        self._aborted = ""
        # The stream's span joins the trace of the request that opened the proposer,
        # not the engine thread's (empty) context the rounds are requested from.
        self._context = contextvars.copy_context()

    @property
    def kind(self) -> str:
        """How the draft proposes: "ngram" or "draft_model" (the cost model keeps their costs apart)."""
        return "ngram" if self._method == gen.SPECULATION_METHOD_NGRAM else "draft_model"

    @property
    def max_context(self) -> int | None:
        """The most tokens the draft holds (context + proposal), None while
        unknown. Any thread."""
        return self._context_of()

    # -- called from the engine thread (any thread works) ---------------------------
    def propose(self, round_: Round, on_result: ProposalCallback) -> None:
        """Queues ``round_`` on the stream; ``on_result`` is called on the loop
        (for a refused proposer: at once, on the caller's thread)."""
        if self._refused:
            on_result(None, Unavailable(self._refused))
            return
        self._loop.call_soon_threadsafe(self._enqueue, (round_, on_result))

    def close(self) -> None:
        """Half-closes the stream after the rounds already queued."""
        self._loop.call_soon_threadsafe(self._finish)

    def unresponsive(self, reason: str) -> None:
        """The sequence gave up on the draft for missing its deadlines: the
        draft's address is marked (see the module's docstring)."""
        if self._link is not None:
            self._loop.call_soon_threadsafe(self._link.mark, reason)

    # -- on the loop ---------------------------------------------------------------------
    def refuse(self, reason: str) -> None:
        """Every round fails at once with Unavailable(``reason``); no stream is opened."""
        self._refused = reason

    def abort(self, reason: str) -> None:
        """Cuts the stream; the round it waits for (if any) fails with Unavailable(``reason``)."""
        if self._task is not None and not self._task.done():
            self._aborted = reason
            self._task.cancel()

    def _enqueue(self, item) -> None:
        if self._closed:  # every round asked is answered: the engine counts the rounds a draft computes
            item[1](None, Unavailable(self._aborted or "the draft stream is closed"))
            return
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._task = self._loop.create_task(self._run(), context=self._context)
        self._queue.put_nowait(item)

    def _finish(self) -> None:
        """Ends the stream the way a client should: no more requests, then read
        to the server's end (the draft frees the sequence's cache)."""
        if self._closed:
            return
        self._closed = True
        if self._queue is not None:
            self._queue.put_nowait(None)

    async def _run(self) -> None:
        call = self._stub.Propose()
        first = True
        pending = None
        reason = "the draft stream ended"
        link = self._link
        if link is not None:
            link.proposers.add(self)
        try:
            while True:
                pending = await self._queue.get()
                if pending is None:
                    await call.done_writing()
                    while await call.read() is not grpc.aio.EOF:
                        pass
                    return
                round_, on_result = pending
                if first:
                    await self._fits(round_)
                msg = model_pb2.ProposeRequest(append_tokens=round_.append, discard=round_.discard,
                                               gamma=round_.gamma)
                if first:
                    msg.request_id = self._request_id
                    msg.sampling.CopyFrom(self._sampling)
                    msg.method = self._method
                    first = False
                await call.write(msg)
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    raise Unavailable("the draft closed the stream")
                if link is not None:
                    link.answered()
                self._check(reply, round_.gamma)
                pending = None
                on_result(Proposal(list(reply.tokens), reply.compute_ms), None)
        except asyncio.CancelledError:
            reason = self._aborted or "the draft stream was cancelled"
        except Exception as exc:  # noqa: BLE001 - reported to the engine, which decodes on without the draft
            reason = _describe(exc)
            log.warning("draft stream for %s failed: %s", self._request_id, reason)
        finally:
            self._closed = True
            # The round under way and the ones queued behind it fail alike: every round asked is answered.
            while pending is not None:
                pending[1](None, Unavailable(reason))
                pending = self._queue.get_nowait() if not self._queue.empty() else None
            if link is not None:
                link.proposers.discard(self)
            call.cancel()

    async def _fits(self, first: Round) -> None:
        """The first round (the whole context) must leave the draft room to
        propose; else the draft is not asked (the sequence decodes on alone)."""
        if self._learning is not None:
            await asyncio.shield(self._learning)
        limit = self.max_context
        if limit is not None and len(first.append) >= limit:
            raise Unavailable(f"the draft's context ({limit} tokens) cannot hold this sequence "
                              f"({len(first.append)} tokens)")

    def _check(self, reply: model_pb2.ProposeResponse, gamma: int) -> None:
        """A proposal the target may score: at most ``gamma`` ids in its vocabulary."""
        if len(reply.tokens) > gamma:
            raise Unavailable(f"the draft proposed {len(reply.tokens)} tokens when asked for {gamma}")
        bad = [t for t in reply.tokens if not 0 <= t < self._vocab_size]
        if bad:
            raise Unavailable(f"the draft proposed token id {bad[0]}, outside the vocabulary [0, {self._vocab_size})")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, asyncio.TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__
