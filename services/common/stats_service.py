"""``llmesh.v1.Stats/Watch`` for any service: a stream of its load reports."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from services.common.errors import InvalidArgument
from services.common.stubs import stats_pb2, stats_pb2_grpc

#: Bounds of a Watch's interval, in seconds.
MIN_INTERVAL_S = 0.05
MAX_INTERVAL_S = 3600.0


class StatsServicer(stats_pb2_grpc.StatsServicer):
    """Streams ``report()`` at once and then every interval until cancelled
    (event loop; ``report`` is called on it). A request's ``interval_s`` outside
    [MIN_INTERVAL_S, MAX_INTERVAL_S] (0: the default) is InvalidArgument."""

    def __init__(self, report: Callable[[], stats_pb2.LoadReport], default_interval_s: float) -> None:
        self._report = report
        self._default_interval_s = default_interval_s

    async def Watch(self, request, context):
        interval = request.interval_s or self._default_interval_s
        if not MIN_INTERVAL_S <= interval <= MAX_INTERVAL_S:  # also rejects NaN and infinity
            raise InvalidArgument("interval_s", f"must be in [{MIN_INTERVAL_S}, {MAX_INTERVAL_S:g}] seconds "
                                                f"(or 0 for the default), got {interval}")
        while True:
            yield self._report()
            await asyncio.sleep(interval)
