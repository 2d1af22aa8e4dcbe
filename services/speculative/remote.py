"""The remote proposer: a Proposer over one ``DraftModel.Propose`` stream.

The engine thread calls :meth:`RemoteProposer.propose`; the round runs on
the asyncio loop (write the request, read the proposal) and the result goes
back through the callback, from the loop's thread. Rounds of a sequence are
sent in order on its stream; a failure ends the stream and is reported once
(as ``Unavailable``), so the sequence goes on without speculation.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable

import grpc

from services.common.errors import Unavailable
from services.common.tls import Channels
from services.common.stubs import generation_pb2 as gen
from services.common.stubs import model_pb2, model_pb2_grpc
from services.engine.sequence import SamplingOptions
from services.speculative.state import Proposal, ProposalCallback
from services.speculative.sync import Round

log = logging.getLogger(__name__)


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
        self._stubs: dict[str, model_pb2_grpc.DraftModelStub] = {}
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

    def proposer(self, address: str, request_id: str, sampling: SamplingOptions, vocab_size: int
                 ) -> "RemoteProposer":
        """A proposer for one sequence on the draft at ``address`` ("host:port"),
        sampling as ``sampling`` says (temperature, top_p, top_k and seed;
        a sampled request's seed must be the one the target samples with, so
        that the draft draws with the target's noise); proposals must be ids
        in ``[0, vocab_size)``. Connects lazily: an unreachable draft shows as
        the first round's error."""
        stub = self._stubs.get(address)
        if stub is None:
            channel = self._channels_factory.open(address, self._provider)
            self._channels.append(channel)
            stub = self._stubs[address] = model_pb2_grpc.DraftModelStub(channel)
        draft_sampling = gen.SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                                            top_k=sampling.top_k)
        if sampling.seed is not None:
            draft_sampling.seed = sampling.seed
        return RemoteProposer(stub, asyncio.get_running_loop(), request_id, draft_sampling, vocab_size,
                              context=lambda: self._contexts.get(address),
                              learning=self._learn(address, stub))

    async def close(self) -> None:
        """Closes every channel (in-flight streams fail)."""
        for task in list(self._asking.values()):
            task.cancel()
        for channel in self._channels:
            await channel.close()


class RemoteProposer:
    """A Proposer whose draft is a ``DraftModel.Propose`` stream.
    ``context()`` gives the draft's context length once known (None before);
    ``learning`` is the request for it under way, which the first round waits for."""

    def __init__(self, stub: model_pb2_grpc.DraftModelStub, loop: asyncio.AbstractEventLoop, request_id: str,
                 sampling: gen.SamplingParams, vocab_size: int,
                 context: Callable[[], int | None] = lambda: None, learning: asyncio.Task | None = None) -> None:
        self._context_of = context
        self._learning = learning
        self._stub = stub
        self._loop = loop
        self._request_id = request_id
        self._sampling = sampling
        self._vocab_size = vocab_size
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._closed = False
        # The stream's span joins the trace of the request that opened the proposer,
        # not the engine thread's (empty) context the rounds are requested from.
        self._context = contextvars.copy_context()

    @property
    def max_context(self) -> int | None:
        """The most tokens the draft holds (context + proposal), None while
        unknown. Any thread."""
        return self._context_of()

    # -- called from the engine thread (any thread works) ---------------------------
    def propose(self, round_: Round, on_result: ProposalCallback) -> None:
        """Queues ``round_`` on the stream; ``on_result`` is called on the loop."""
        self._loop.call_soon_threadsafe(self._enqueue, (round_, on_result))

    def close(self) -> None:
        """Half-closes the stream after the rounds already queued."""
        self._loop.call_soon_threadsafe(self._finish)

    # -- on the loop ---------------------------------------------------------------------
    def _enqueue(self, item) -> None:
        if self._closed:
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
                    first = False
                await call.write(msg)
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    raise Unavailable("the draft closed the stream")
                self._check(reply, round_.gamma)
                pending = None
                on_result(Proposal(list(reply.tokens), reply.compute_ms), None)
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # noqa: BLE001 - reported to the engine, which decodes on without the draft
            log.warning("draft stream for %s failed: %s", self._request_id, _describe(exc))
            if pending is not None:
                pending[1](None, Unavailable(_describe(exc)))
        finally:
            self._closed = True
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
    return str(exc) or type(exc).__name__
