"""The router's composition root: ``python -m router.main``."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Sequence

from opentelemetry.trace import TracerProvider

from router import codec
from router.config import RouterConfig, split_target
from router.upstreams import Upstreams
from router.forwarder import Forwarder
from router.registry import InstanceSpec
from router.servicer import RouterServicer
from router.http.app import FrontDoor, create_app
from router.http.server import HttpServer
from services.common import telemetry
from services.common.load import Role
from services.common.server import ServiceApp, access_of, run_service, setup_logging
from services.common.stubs import SERVICE_NAMES, router_pb2_grpc, stats_pb2
from services.common.metrics import WindowedMetrics

log = logging.getLogger(__name__)


class RouterApp(ServiceApp):
    """One router process: its server, upstreams, forwarder and health."""

    def __init__(self, config: RouterConfig, provider: TracerProvider) -> None:
        self.provider = provider
        # The client token (--auth-token) and the admin boundary: the server's access interceptor.
        self.bind(config, "router", provider, client_token=config.auth_token)
        self.metrics = WindowedMetrics(config.metrics_window_s, started_at=time.monotonic())
        self.upstreams = Upstreams(config)
        self.forwarder = Forwarder(self.upstreams, config, self.metrics, provider=provider)
        router_pb2_grpc.add_RouterServicer_to_server(RouterServicer(self.upstreams, self.forwarder), self.server)
        self.http: HttpServer | None = None
        self._ending = asyncio.Event()
        self._stall_sweeps: asyncio.Task | None = None
        if config.http_port:
            door = FrontDoor(self.forwarder, self.upstreams,
                             access_of(config, [SERVICE_NAMES["router"]], config.auth_token), config.http_timeout_s,
                             config.http_max_body_bytes)
            tls = config.tls()
            app = create_app(door, provider, allowed_origins=[o for o in config.http_allowed_origins if o])
            self.http = HttpServer(app, config.host, config.http_port,
                                   ssl=(str(tls.cert), str(tls.key)) if tls is not None and tls.cert else None,
                                   client_ca=str(tls.ca) if tls is not None and config.tls_client_auth else None)

    def report(self) -> stats_pb2.LoadReport:
        return codec.router_report(self.metrics.snapshot(time.monotonic()), self.forwarder.in_flight,
                                   self.instance_id, time.time())

    async def start(self) -> None:
        """Serves, registers the configured instances, and turns SERVING (the
        router serves even before any target is healthy)."""
        await self.server.start()
        if self.http is not None:
            try:
                await self.http.start()
            except BaseException:
                await self.server.stop(0)
                raise
        for role, addresses in ((Role.TARGET, self.config.targets), (Role.DRAFT, self.config.drafts)):
            for entry in addresses:
                pool, address = split_target(entry, self.config.pool)
                self.upstreams.register(InstanceSpec(id=address, address=address, role=role, pool=pool))
        self._stall_sweeps = asyncio.create_task(self.forwarder.stalls.run(self._ending), name="stall-watch")
        await self.health.set(True)
        log.info("%s routing on %s (%s%s%s%s)", self.instance_id, self.address, self.config.policy.value,
                 f", HTTP on port {self.http.port}" if self.http is not None else "",
                 f", cache of {self.config.cache_size}" if self.config.cache_size else "",
                 ", bearer token required" if self.config.auth_token else "")

    async def close(self) -> None:
        """Cancels every watcher and closes every channel (after the server has stopped)."""
        self._ending.set()
        if self._stall_sweeps is not None:
            await self._stall_sweeps
        if self.http is not None:
            await self.http.stop()
        await self.upstreams.close()


def create_server(config: RouterConfig, provider: TracerProvider | None = None) -> RouterApp:
    """The router, bound (``app.port``) but not started; ``await app.start()`` serves."""
    provider = provider or telemetry.make_tracer_provider("llmesh-router", config.instance_id)
    return RouterApp(config, provider)


async def serve(config: RouterConfig) -> None:
    await create_server(config).serve("router")


def main(argv: Sequence[str] | None = None) -> int:
    config = RouterConfig.from_command_line(argv, prog="llmesh-router")
    setup_logging(config.log_level)
    return run_service("llmesh serve router", lambda: serve(config))


if __name__ == "__main__":
    sys.exit(main())
