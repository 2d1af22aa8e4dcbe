"""The scaler's composition root: ``python -m scaler.main --router HOST:PORT``."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable, Sequence

from opentelemetry.sdk.trace import TracerProvider

from scaler.config import Backend, ScalerConfig
from scaler.fleet import RouterFleet
from scaler.policy import Policy
from scaler.servicer import ScalerServicer
from scaler.state import ScalerState
from services.common import telemetry
from services.common.server import insecure_channel, new_server, serve_until_signal, setup_logging
from services.common.stats_service import StatsServicer
from services.common.stubs import SERVICE_NAMES, scaler_pb2_grpc, stats_pb2, stats_pb2_grpc

log = logging.getLogger(__name__)


class ScalerApp:
    """One scaler process: its server, its state and its router channel."""

    def __init__(self, config: ScalerConfig, provider: TracerProvider,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.server, self.port, self.health = new_server(
            config, [SERVICE_NAMES["scaler"], SERVICE_NAMES["stats"]], provider)
        self.instance_id = config.instance_id or f"scaler@{config.host}:{self.port}"
        self.state = ScalerState(Policy(min_instances=config.default_min_instances,
                                        max_instances=config.default_max_instances),
                                 config.backend.value, config.history_limit)
        self.router_channel = insecure_channel(config.router, provider)
        self.fleet = RouterFleet(self.router_channel, self.state, config.rpc_timeout_s, clock)
        scaler_pb2_grpc.add_ScalerServicer_to_server(ScalerServicer(self.state, self.fleet, clock), self.server)
        stats_pb2_grpc.add_StatsServicer_to_server(StatsServicer(self.report, config.stats_interval_s), self.server)

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def report(self) -> stats_pb2.LoadReport:
        return stats_pb2.LoadReport(instance_id=self.instance_id, role=stats_pb2.ROLE_SCALER, timestamp=self.clock())

    async def start(self) -> None:
        await self.server.start()
        await self.health.set(True)
        if self.config.backend != Backend.LOCAL:
            log.warning("backend %s: instances are listed but not started or stopped yet", self.config.backend.value)
        log.info("%s serving on %s (router %s, backend %s)", self.instance_id, self.address, self.config.router,
                 self.config.backend.value)

    async def stop(self, grace_s: float | None = None) -> None:
        await self.health.shutdown()
        await self.server.stop(self.config.grace_period_s if grace_s is None else grace_s)
        await self.close()

    async def close(self) -> None:
        await self.router_channel.close()


def create_server(config: ScalerConfig, provider: TracerProvider | None = None) -> ScalerApp:
    """The service, bound (``app.port``) but not started; ``await app.start()`` serves."""
    provider = provider or telemetry.make_tracer_provider("llmesh-scaler", config.instance_id)
    return ScalerApp(config, provider)


async def serve(config: ScalerConfig) -> None:
    app = create_server(config)
    await app.start()
    print(f"scaler serving on {app.address}", flush=True)
    await serve_until_signal(app.server, app.health, config.grace_period_s, on_stop=app.close)


def main(argv: Sequence[str] | None = None) -> int:
    config = ScalerConfig.from_args(argv, prog="llmesh-scaler")
    setup_logging(config.log_level)
    asyncio.run(serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
