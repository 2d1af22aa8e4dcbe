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

import grpc
import torch

from services.speculative.distributions import distribution_of
from services.common.errors import Unavailable
from services.common.tls import Channels
from services.common.stubs import generation_pb2 as gen
from services.common.stubs import model_pb2, model_pb2_grpc
from services.speculative.state import Proposal, ProposalCallback
from services.speculative.sync import Round

log = logging.getLogger(__name__)


class ProposerClient:
    """Opens remote proposers: one channel per draft address, shared by every
    sequence that uses it. Event loop only."""

    def __init__(self, provider=None, channels: Channels | None = None) -> None:
        self._provider = provider
        self._channels_factory = channels or Channels()
        self._stubs: dict[str, model_pb2_grpc.DraftModelStub] = {}
        self._channels: list[grpc.aio.Channel] = []

    def proposer(self, address: str, request_id: str, sampling: gen.SamplingParams, vocab_size: int
                 ) -> "RemoteProposer":
        """A proposer for one sequence on the draft at ``address`` ("host:port"),
        sampling as ``sampling`` says (temperature, top_p, top_k, seed only);
        ``vocab_size`` sizes the draft's sparse distributions. Connects lazily:
        an unreachable draft shows as the first round's error."""
        stub = self._stubs.get(address)
        if stub is None:
            channel = self._channels_factory.open(address, self._provider)
            self._channels.append(channel)
            stub = self._stubs[address] = model_pb2_grpc.DraftModelStub(channel)
        draft_sampling = gen.SamplingParams(temperature=sampling.temperature)
        for name in ("top_p", "top_k", "seed"):
            if sampling.HasField(name):
                setattr(draft_sampling, name, getattr(sampling, name))
        return RemoteProposer(stub, asyncio.get_running_loop(), request_id, draft_sampling, vocab_size)

    async def close(self) -> None:
        """Closes every channel (in-flight streams fail)."""
        for channel in self._channels:
            await channel.close()


class RemoteProposer:
    """A Proposer whose draft is a ``DraftModel.Propose`` stream."""

    def __init__(self, stub: model_pb2_grpc.DraftModelStub, loop: asyncio.AbstractEventLoop, request_id: str,
                 sampling: gen.SamplingParams, vocab_size: int) -> None:
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
                q = None
                if reply.distributions:
                    q = torch.stack([distribution_of(d, self._vocab_size) for d in reply.distributions])
                pending = None
                on_result(Proposal(list(reply.tokens), q, reply.compute_ms), None)
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # noqa: BLE001 - reported to the engine, which decodes on without the draft
            log.warning("draft stream for %s failed: %s", self._request_id, _describe(exc))
            if pending is not None:
                pending[1](None, Unavailable(_describe(exc)))
        finally:
            self._closed = True
            call.cancel()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc) or type(exc).__name__
