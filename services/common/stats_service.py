"""``llmesh.v1.Stats`` for any service: a stream of its load reports, and for
services with a KV cache the stream of its prefix cache's block events."""

from __future__ import annotations

import asyncio

import grpc
from collections.abc import Callable
from typing import Any

from services.common.errors import InvalidArgument
from services.common.streams import until
from services.common.stubs import stats_pb2, stats_pb2_grpc

#: Bounds of a Watch's interval, in seconds.
MIN_INTERVAL_S = 0.05
MAX_INTERVAL_S = 3600.0
#: WatchKvEvents' interval bounds and default, in seconds.
KV_MIN_INTERVAL_S, KV_MAX_INTERVAL_S, KV_DEFAULT_INTERVAL_S = 0.01, 60.0, 0.1


class StatsServicer(stats_pb2_grpc.StatsServicer):
    """Streams ``report()`` at once and then every interval until cancelled
    (event loop; ``report`` is called on it). A request's ``interval_s`` outside
    [MIN_INTERVAL_S, MAX_INTERVAL_S] (0: the default) is InvalidArgument."""

    def __init__(self, report: Callable[[], stats_pb2.LoadReport], default_interval_s: float,
                 kv_events: Any = None, ending: asyncio.Event | None = None) -> None:
        """``kv_events``: a ``services.engine.kv_events.KVEventLog`` (duck-typed:
        ``read(cursor)`` and ``block_size``), or None: WatchKvEvents is UNIMPLEMENTED.
        ``ending``: set when the service shuts down; every stream then ends (OK),
        so that none holds the server's graceful stop for its whole grace period."""
        self._report = report
        self._default_interval_s = default_interval_s
        self._kv_events = kv_events
        self._ending = ending or asyncio.Event()

    async def Watch(self, request, context):
        interval = request.interval_s or self._default_interval_s
        if not MIN_INTERVAL_S <= interval <= MAX_INTERVAL_S:  # also rejects NaN and infinity
            raise InvalidArgument("interval_s", f"must be in [{MIN_INTERVAL_S}, {MAX_INTERVAL_S:g}] seconds "
                                                f"(or 0 for the default), got {interval}")
        async for report in until(self._ending, self._reports(interval)):
            yield report

    async def _reports(self, interval: float):
        while True:
            yield self._report()
            await asyncio.sleep(interval)

    async def WatchKvEvents(self, request, context):
        if self._kv_events is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this service has no KV cache to report")
        interval = request.interval_s or KV_DEFAULT_INTERVAL_S
        if not KV_MIN_INTERVAL_S <= interval <= KV_MAX_INTERVAL_S:
            raise InvalidArgument("interval_s", f"must be in [{KV_MIN_INTERVAL_S}, {KV_MAX_INTERVAL_S:g}] seconds "
                                                f"(or 0 for {KV_DEFAULT_INTERVAL_S} s), got {interval}")
        async for events in until(self._ending, self._kv_batches(interval)):
            yield events

    async def _kv_batches(self, interval: float):
        cursor = None
        while True:
            batch = self._kv_events.read(cursor)
            cursor = batch.cursor
            if not batch.empty:
                yield stats_pb2.KvEvents(snapshot=batch.snapshot, stored=batch.stored, removed=batch.removed,
                                         block_size=self._kv_events.block_size)
            await asyncio.sleep(interval)
