"""Streams on a target that stopped answering: found and cut, so that they resume elsewhere.

A target that is frozen (SIGSTOP, a hung GPU driver, a VM paused) keeps its
TCP connections open: its streams get no chunk and no error, and without
this a request waits until its deadline while the router already routes new
requests around the target (its load reports stop, and after
``stale_after_s`` its health is unknown). Envoy's ``stream_idle_timeout``
cuts such streams by time alone; here a stream is cut only when both hold:
it has had no chunk for ``stale_after_s`` and its target's load reports are
that old too (a long prefill or a long queue keeps reporting; a target that
never reported, or that left the registry, is not judged by them). And only
where the request may still move (``movable``: another target of its pools it
has not tried may take it, and it has attempts left): the cut stream then
resumes there as after a broken connection (the router's resume, exact), and
where it may not it keeps waiting, since the target may come back.

Event loop only; times in seconds of the forwarder's clock (``time.monotonic``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.common.waits import wait_event


@dataclass(eq=False)
class LiveCall:
    """One upstream stream in flight: when its last chunk came, and why it was cut ("": it was not)."""

    instance_id: str
    #: Whether the request may resume elsewhere now (an untried routable target, attempts left).
    movable: Callable[[], bool]
    call: Any
    last_at: float
    lost: str = ""


@dataclass
class StallWatch:
    """The streams in flight per target, and :meth:`sweep`, which cuts the stalled ones."""

    registry: Any
    stale_after_s: float
    clock: Callable[[], float]
    _live: dict[str, set[LiveCall]] = field(default_factory=dict)

    def open(self, instance_id: str, movable: Callable[[], bool], call: Any) -> LiveCall:
        live = LiveCall(instance_id, movable, call, self.clock())
        self._live.setdefault(instance_id, set()).add(live)
        return live

    def close(self, live: LiveCall) -> None:
        calls = self._live.get(live.instance_id)
        if calls is not None:
            calls.discard(live)
            if not calls:
                del self._live[live.instance_id]

    def sweep(self) -> list[LiveCall]:
        """Cuts (``call.cancel()``, ``lost`` set) every stream with no chunk for ``stale_after_s``
        on a target whose load reports are as old (or that left the registry), where the stream's
        request may move (``movable()``). Returns the streams cut."""
        now, cut = self.clock(), []
        for instance_id, calls in list(self._live.items()):
            inst = self.registry.find(instance_id)
            age = inst.load_age(now) if inst is not None else None
            if inst is not None and (age is None or age <= self.stale_after_s):
                continue  # reporting (or never judged by reports): however long a stream waits there
            for live in list(calls):
                if live.lost or now - live.last_at <= self.stale_after_s:
                    continue
                if not live.movable():
                    continue  # nowhere to resume: waiting for this one is all there is
                silent = f"{age:.1f} s" if age is not None else "ever"
                live.lost = (f"{instance_id} stopped answering: no chunk for {now - live.last_at:.1f} s and no load "
                             f"report for {silent}")
                live.call.cancel()
                cut.append(live)
        return cut

    async def run(self, stop: asyncio.Event) -> None:
        """Sweeps every half ``stale_after_s`` until ``stop`` is set."""
        while not await wait_event(stop, self.stale_after_s / 2):
            self.sweep()
