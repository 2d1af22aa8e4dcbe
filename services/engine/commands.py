"""Commands from other threads to the engine thread, applied at step boundaries.

Any thread may :meth:`Commands.post`; only the engine thread applies them
(:meth:`Commands.apply`) or waits for them (:meth:`Commands.wait`). A command
that concerns one sequence names it, so that if the engine dies the
sequences whose commands were never applied can still be failed.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any


class Commands:
    """A FIFO of ``(fn, sequence or None)`` and the event that wakes the engine."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()

    def post(self, fn: Callable[[], None], seq: Any = None) -> None:
        """Queues ``fn`` and wakes the engine. Any thread."""
        self._queue.put((fn, seq))
        self._wake.set()

    def wake(self) -> None:
        """Wakes the engine without a command (it looks at its state again). Any thread."""
        self._wake.set()

    def apply(self) -> None:
        """Runs every queued command, in order. Engine thread; what a command
        raises propagates."""
        while True:
            try:
                fn, _ = self._queue.get_nowait()
            except queue.Empty:
                return
            fn()

    def wait(self, timeout_s: float | None) -> None:
        """Sleeps until a command or wake-up arrives, or ``timeout_s`` seconds
        pass (None: no limit). Engine thread."""
        if self._queue.empty():
            self._wake.wait(timeout_s)
        self._wake.clear()

    def drain(self) -> list[Any]:
        """Drops every queued command; returns the sequences they named. For a
        dead engine only."""
        seqs = []
        while True:
            try:
                _, seq = self._queue.get_nowait()
            except queue.Empty:
                return seqs
            if seq is not None:
                seqs.append(seq)
