"""The engine seen from asyncio: requests as async iterators of events.

Everything here runs on one event loop (the one that called it); the engine
delivers events from its thread with ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from services.engine.engine import Engine
from services.engine.sequence import GenerationRequest, Sequence, SequenceEvent


class AsyncEngine:
    """An :class:`Engine` for coroutines of one event loop: call it from that
    loop only (events come back through ``loop.call_soon_threadsafe``)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _open(self, request: GenerationRequest) -> tuple[Sequence, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[SequenceEvent] = asyncio.Queue()
        seq = self.engine.submit(request, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        return seq, events

    async def generate(self, request: GenerationRequest) -> AsyncIterator[SequenceEvent]:
        """Events of one request until its finishing event. Leaving the loop
        early (client gone, deadline) cancels the sequence in the engine.
        Raises what :meth:`Engine.submit` raises; a failure later on arrives as
        the finishing event's ``error``."""
        seq, events = self._open(request)
        finished = False
        try:
            while True:
                event = await events.get()
                finished = event.finish_reason is not None
                yield event
                if finished:
                    return
        finally:
            if not finished:
                self.engine.cancel(seq)

    def persistent(self, request: GenerationRequest) -> "PersistentSequence":
        """A persistent sequence (``request.persistent``) that generates
        ``max_new_tokens`` tokens, then a budget per round. Raises what
        :meth:`Engine.submit` raises."""
        seq, events = self._open(request)
        return PersistentSequence(self.engine, seq, events)


class PersistentSequence:
    """Rounds of a persistent sequence: it keeps its KV cache between rounds
    (what the draft service's proposers run on). Event loop only."""

    def __init__(self, engine: Engine, seq: Sequence, events: asyncio.Queue) -> None:
        self._engine = engine
        self.seq = seq
        self._events = events
        self.closed = False

    async def next_round(self) -> list[SequenceEvent]:
        """The events of the round under way, up to the one that pauses (or ends) it."""
        out = []
        while True:
            event = await self._events.get()
            out.append(event)
            if event.paused or event.finish_reason is not None:
                if event.finish_reason is not None:
                    self.closed = True
                return out

    def resume(self, discard: int, append: list[int], budget: int) -> None:
        """Starts the next round: drop the last ``discard`` tokens, take
        ``append``, generate ``budget`` tokens. Raises Unavailable once the
        engine has stopped."""
        self._engine.resume(self.seq, discard, append, budget)

    def close(self) -> None:
        """Ends the sequence (its slot is freed at the next step)."""
        if not self.closed:
            self.closed = True
            self._engine.cancel(self.seq)
