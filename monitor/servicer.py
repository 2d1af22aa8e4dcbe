"""Monitor RPCs: decode, compute from a store snapshot, encode."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from monitor import codec
from monitor.alerts import AlertHub
from monitor.analysis import Thresholds, analyze
from monitor.metrics import STANDARD_WINDOWS_S, resolve_window, standard_windows, throughput
from monitor.store import ReportStore
from services.common.streams import until
from services.common.stubs import monitor_pb2, monitor_pb2_grpc


class MonitorServicer(monitor_pb2_grpc.MonitorServicer):
    def __init__(self, store: ReportStore, alerts: AlertHub, default_window_s: float,
                 clock: Callable[[], float], thresholds: Thresholds = Thresholds(),
                 windows_s: tuple[float, ...] = STANDARD_WINDOWS_S, ending: asyncio.Event | None = None) -> None:
        """``ending``: set when the service shuts down; WatchAlerts streams end then."""
        self.ending = ending or asyncio.Event()
        self.store = store
        self.windows_s = windows_s
        self.alerts = alerts
        self.default_window_s = default_window_s
        self.clock = clock
        self.thresholds = thresholds

    async def GetThroughput(self, request, context):
        window = resolve_window(request.window_s, self.default_window_s)
        scope = codec.scope_of(request.scope)
        snapshot, now = self.store.snapshot(), self.clock()
        result = throughput(snapshot, window, scope, now)
        return codec.throughput_response(result, scope, standard_windows(snapshot, self.windows_s, scope, now))

    async def Analyze(self, request, context):
        window = resolve_window(request.window_s, self.default_window_s)
        scope = codec.scope_of(request.scope)
        analysis = analyze(self.store.snapshot(), window, scope, self.clock(), self.thresholds)
        return monitor_pb2.AnalyzeResponse(metrics=codec.throughput_pb(analysis.result.metrics),
                                           recommendations=[codec.recommendation_pb(r)
                                                            for r in analysis.recommendations])

    async def WatchAlerts(self, request, context):
        async for alert in until(self.ending, self.alerts.watch(codec.severity_of(request.min_severity))):
            yield codec.alert_pb(alert)
