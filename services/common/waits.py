"""Waiting on an asyncio event with a timeout, safe to cancel. Event-loop thread.

Python 3.11's ``asyncio.wait_for`` can swallow a cancellation that arrives
as its timeout fires (CPython gh-86296, fixed in 3.12): a loop that sleeps
in it between ticks then ticks on after its task was cancelled, and whoever
awaits that task at shutdown waits for ever (2026-12-02: the scaler's control
loop held its service's stop until pytest-timeout's 300 s, 3 of about 60
runs under load). ``asyncio.wait`` never swallows one.
"""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Returns when ``event`` is set (True) or after ``timeout_s`` seconds
    (False). A cancellation of the caller is always raised."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=timeout_s)
    finally:
        waiter.cancel()
    return bool(done)
