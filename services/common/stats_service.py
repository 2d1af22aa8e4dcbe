"""``llmesh.v1.Stats/Watch`` for any service: a stream of its load reports."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from services.common.errors import InvalidArgument
from services.common.stubs import stats_pb2, stats_pb2_grpc

MIN_INTERVAL_S = 0.05


class StatsServicer(stats_pb2_grpc.StatsServicer):
    """Streams ``report()`` at once and then every interval until cancelled."""

    def __init__(self, report: Callable[[], stats_pb2.LoadReport], default_interval_s: float) -> None:
        self._report = report
        self._default_interval_s = default_interval_s

    async def Watch(self, request, context):
        interval = request.interval_s or self._default_interval_s
        if not interval >= MIN_INTERVAL_S:  # also rejects NaN
            raise InvalidArgument("interval_s", f"must be >= {MIN_INTERVAL_S} (or 0 for the default)")
        while True:
            yield self._report()
            await asyncio.sleep(interval)
