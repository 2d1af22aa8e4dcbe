"""Server streams that end when their service shuts down.

A gRPC server's graceful stop waits for every call, and a watch stream never
ends by itself: one open watch held a service's stop for its whole grace
period, then was cancelled. Event-loop thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeVar

T = TypeVar("T")


async def until(ending: asyncio.Event, stream: AsyncIterator[T]) -> AsyncIterator[T]:
    """``stream``'s items until ``ending`` is set; then it ends (OK), and
    ``stream`` is closed. Errors of ``stream`` pass through."""
    stopper = asyncio.ensure_future(ending.wait())
    item: asyncio.Future | None = None
    try:
        while True:
            item = asyncio.ensure_future(anext(stream))
            await asyncio.wait({item, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if not item.done():
                return
            try:
                value = item.result()
            except StopAsyncIteration:
                return
            item = None
            yield value
    finally:
        stopper.cancel()
        if item is not None and not item.done():
            item.cancel()
            await asyncio.gather(item, return_exceptions=True)
        await stream.aclose()
