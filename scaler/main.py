"""The scaler's composition root: ``python -m scaler.main --router HOST:PORT --monitor HOST:PORT``."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from opentelemetry.trace import TracerProvider

from scaler.backends import Backend as ScalingBackend
from scaler.backends import BackendError, refuse
from scaler.config import Backend, ScalerConfig
from scaler.controller import Controller
from scaler.router_client import RouterClient
from scaler.load import MonitorLoad
from scaler.metrics import ScalerMetrics
from scaler.policy import Policy
from scaler.servicer import ScalerServicer
from scaler.state import ScalerState
from services.common import telemetry
from services.common.config import ConfigError
from services.common.access import bearer_metadata
from services.common.exposition import MetricsEndpoint
from services.common.server import ServiceApp, run_service, setup_logging
from services.common.stubs import scaler_pb2_grpc, stats_pb2
from services.common.paths import default_home, default_model_path

log = logging.getLogger(__name__)


def make_backend(config: ScalerConfig) -> ScalingBackend:
    """The configured backend; BackendError for one that is not implemented yet or cannot start."""
    if config.backend == Backend.DOCKER:
        from scaler.backends.docker import DockerBackend

        return DockerBackend.from_config(config)
    if config.backend == Backend.KUBERNETES:
        from scaler.backends.kubernetes import from_cluster

        return from_cluster(config.k8s_namespace, config.k8s_cluster_domain)
    if config.backend != Backend.LOCAL:
        refuse(config.backend.value)
    from scaler.backends.local import LocalBackend

    return LocalBackend(config.target_model or default_model_path("target"),
                        Path(config.log_dir) if config.log_dir else default_home() / "logs" / "scaler",
                        host=config.instance_host, extra_args=config.target_args,
                        max_targets=config.max_local_targets)


class ScalerApp(ServiceApp):
    """One scaler process: its server, its state, its router and monitor channels, its control loop."""

    def __init__(self, config: ScalerConfig, provider: TracerProvider, backend: ScalingBackend,
                 clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.bind(config, "scaler", provider)
        self.state = ScalerState(Policy(min_instances=config.default_min_instances,
                                        max_instances=config.default_max_instances,
                                        capacity_tokens_per_second=config.default_capacity_tokens_per_s,
                                        scale_up_window_s=config.default_scale_up_window_s,
                                        scale_down_window_s=config.default_scale_down_window_s),
                                 backend.name, config.history_limit, host_limit=backend.max_targets())
        for pool in config.pools:  # governed from the start, under the default policy
            self.state.policies.setdefault(pool, self.state.default_policy)
        # Client channels are not traced: a span per 2-s look at the load would bury the request traces.
        channels = config.channels()
        self.router_channel = channels.open(config.router)
        self.monitor_channel = channels.open(config.monitor)
        self.router = RouterClient(self.router_channel, self.state, config.rpc_timeout_s, clock,
                                   labels={"managed-by": self.instance_id},
                                   metadata=bearer_metadata(config.admin_secret()))
        self.controller = Controller(
            self.state, self.router,
            MonitorLoad(self.monitor_channel, config.rpc_timeout_s, config.metrics_window_s, config.panic_window_s),
            backend, interval_s=config.interval_s, start_timeout_s=config.start_timeout_s,
            warmup_tokens=config.warmup_tokens, stop_grace_s=config.stop_grace_s,
            retry_after_s=config.retry_after_s, clock=clock, channels=channels)
        scaler_pb2_grpc.add_ScalerServicer_to_server(
            ScalerServicer(self.state, self.router, self.controller, clock, ending=self.health.ending), self.server)
        self.metrics = ScalerMetrics()
        self.metrics_endpoint = MetricsEndpoint(self.metrics.registry) if config.metrics_port >= 0 else None
        self._publisher: asyncio.Task | None = None

    def report(self) -> stats_pb2.LoadReport:
        return stats_pb2.LoadReport(instance_id=self.instance_id, role=stats_pb2.ROLE_SCALER, timestamp=self.clock())

    async def start(self) -> None:
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.start(self.config.host, self.config.metrics_port)
            self._publisher = asyncio.create_task(self._publish_metrics(), name="scaler-metrics")
        await self.server.start()
        self.controller.start()
        await self.health.set(True)
        log.info("%s serving on %s (router %s, monitor %s, backend %s)", self.instance_id, self.address,
                 self.config.router, self.config.monitor, self.state.backend)

    async def _publish_metrics(self) -> None:
        while True:
            self.metrics.publish(self.state.pools(self.clock()))
            await asyncio.sleep(self.config.interval_s)

    async def close(self) -> None:
        """Stops the control loop and the instances it started, then closes the channels."""
        if self._publisher is not None:
            self._publisher.cancel()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.stop()
        await self.controller.close()
        await self.router_channel.close()
        await self.monitor_channel.close()


def create_server(config: ScalerConfig, provider: TracerProvider | None = None,
                  backend: ScalingBackend | None = None) -> ScalerApp:
    """The service, bound (``app.port``) but not started; ``await app.start()`` serves.
    BackendError when the configured backend is not implemented."""
    backend = backend or make_backend(config)
    provider = provider or telemetry.make_tracer_provider("llmesh-scaler", config.instance_id)
    return ScalerApp(config, provider, backend)


async def serve(config: ScalerConfig, backend: ScalingBackend | None = None) -> None:
    await create_server(config, backend=backend).serve("scaler")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = ScalerConfig.from_args(argv, prog="llmesh-scaler")
        setup_logging(config.log_level)
        backend = make_backend(config)  # refuse an unimplemented or unreachable one before anything starts
    except (ConfigError, BackendError) as exc:
        print(f"llmesh-scaler: error: {exc}", file=sys.stderr)
        return 2
    return run_service("llmesh serve scaler", lambda: serve(config, backend))


if __name__ == "__main__":
    sys.exit(main())
