"""The monitor's composition root: ``python -m monitor.main --router HOST:PORT``."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence

from opentelemetry.trace import TracerProvider

from monitor.alerts import AlertHub
from monitor.analysis import AlertTracker
from monitor.subscriber import StatsSubscriber
from monitor.config import MonitorConfig
from monitor.prometheus import PrometheusCollector, PrometheusExporter
from monitor.servicer import MonitorServicer
from monitor.store import ReportStore
from services.common import telemetry
from services.common.server import ServiceApp, run_service, setup_logging
from services.common.stubs import monitor_pb2_grpc, stats_pb2

log = logging.getLogger(__name__)


class MonitorApp(ServiceApp):
    """One monitor process: its server, the stats subscriptions, the alert loop, the exporter."""

    def __init__(self, config: MonitorConfig, provider: TracerProvider,
                 clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.bind(config, "monitor", provider)
        self.store = ReportStore(config.retention_s)
        # Client channels are not traced: a span per 2-s listing and per endless
        # stats stream would bury the request traces.
        self.subscriber = StatsSubscriber(
            config.router, self.store, watch_interval_s=config.watch_interval_s,
            list_interval_s=config.list_interval_s, rpc_timeout_s=config.rpc_timeout_s,
            reconnect_initial_s=config.reconnect_initial_s, reconnect_max_s=config.reconnect_max_s,
            channel_factory=config.channels().open, clock=clock)
        thresholds = config.thresholds()
        self.alerts = AlertHub(self.store.snapshot, AlertTracker(config.alert_for_s, config.alert_clear_s,
                                                                  config.alert_startup_grace_s),
                               window_s=config.default_window_s, interval_s=config.analysis_interval_s, clock=clock,
                               thresholds=thresholds)
        self.exporter = PrometheusExporter(PrometheusCollector(self.store.snapshot, config.default_window_s, clock,
                                                               lambda: list(self.alerts.firing)))
        monitor_pb2_grpc.add_MonitorServicer_to_server(
            MonitorServicer(self.store, self.alerts, config.default_window_s, clock, thresholds,
                            tuple(config.windows_s), ending=self.health.ending), self.server)

    def report(self) -> stats_pb2.LoadReport:
        return stats_pb2.LoadReport(instance_id=self.instance_id, role=stats_pb2.ROLE_MONITOR,
                                    timestamp=self.clock())

    async def start(self) -> None:
        """Serves at once (SERVING); the subscriber keeps retrying the router until it answers."""
        await self.server.start()
        if self.config.prometheus_port:
            self.exporter.start(self.config.host, self.config.prometheus_port)
        self.subscriber.start()
        self.alerts.start()
        await self.health.set(True)
        log.info("%s serving on %s, watching router %s", self.instance_id, self.address, self.config.router)

    async def close(self) -> None:
        """Stops the loops and the exporter (after the server has stopped)."""
        await self.alerts.stop()
        await self.subscriber.stop()
        self.exporter.stop()


def create_server(config: MonitorConfig, provider: TracerProvider | None = None) -> MonitorApp:
    """The service, bound (``app.port``) but not started; ``await app.start()`` serves."""
    provider = provider or telemetry.make_tracer_provider("llmesh-monitor", config.instance_id)
    return MonitorApp(config, provider)


async def serve(config: MonitorConfig) -> None:
    await create_server(config).serve("monitor")


def main(argv: Sequence[str] | None = None) -> int:
    config = MonitorConfig.from_command_line(argv, prog="llmesh-monitor")
    setup_logging(config.log_level)
    return run_service("llmesh serve monitor", lambda: serve(config))


if __name__ == "__main__":
    sys.exit(main())
