"""Lifecycle shared by the model services: bind, load, warm up, serve, drain.

The server starts before the model loads, so health answers NOT_SERVING
while weights load; it turns SERVING only after a warm-up forward pass. If
the engine's loop dies, health turns NOT_SERVING at once, the server drains
and the process exits with status 1, for its supervisor (launcher, scaler,
compose, Kubernetes) to restart it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc
from opentelemetry.trace import TracerProvider

from services.common.accelerator import nvml_for
from services.common.errors import Unavailable
from services.common.exposition import MetricsEndpoint
from services.common.load_codec import role_of
from services.serving.model_service import ModelServiceConfig, load_report
from services.serving.prometheus_metrics import ServingMetrics
from services.serving.prompts import PromptEncoder, chat_text, max_token_bytes
from services.common.server import new_server, run_service, serve_until_signal, setup_logging
from services.common.stats_service import StatsServicer
from services.common.stubs import SERVICE_NAMES, generation_pb2, stats_pb2, stats_pb2_grpc
from services.engine.build import LoadedModel, build_engine
from services.engine.speculation import Speculation

log = logging.getLogger(__name__)


class ModelApp:
    """One model service process: its server, its engine once loaded, its health."""

    def __init__(self, config: ModelServiceConfig, role: int, service_key: str,
                 servicer_factory: Callable[["ModelApp"], object],
                 add_servicer: Callable[[object, grpc.aio.Server], None],
                 provider: TracerProvider, speculation: Callable[[], Speculation] | None = None,
                 build: Callable[[Speculation | None], LoadedModel] | None = None) -> None:
        """``build``: loads the engine given its speculation strategy (blocking;
        default: :func:`services.engine.build.build_engine` from the config), e.g.
        over a group of parallel ranks."""
        self.config = config
        self._speculation = speculation
        self._build = build
        #: Set (on the event loop) when the process should stop: the engine died.
        self.stopped = asyncio.Event()
        #: The engine's fatal error, once it died.
        self.failure: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.role = role
        self.provider = provider
        self.server, self.port, self.health = new_server(
            config, [SERVICE_NAMES[service_key], SERVICE_NAMES["stats"]], provider)
        self.instance_id = config.instance_id or f"{service_key}@{config.host}:{self.port}"
        self.loaded: LoadedModel | None = None
        #: Tokenizes text prompts (set once the model is loaded).
        self.prompts: PromptEncoder | None = None
        self._nvml = None
        #: This instance's Prometheus /metrics (None with --metrics-port -1); serves once the model is loaded.
        self.metrics: MetricsEndpoint | None = None
        self.servicer = servicer_factory(self)
        add_servicer(self.servicer, self.server)
        stats_pb2_grpc.add_StatsServicer_to_server(
            StatsServicer(self.report, config.stats_interval_s, kv_events=_EngineKVEvents(self),
                          ending=self.health.ending), self.server)

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    def require_loaded(self) -> LoadedModel:
        if self.loaded is None:
            raise Unavailable("the model is still loading; retry in a few seconds")
        return self.loaded

    async def prompt_ids(self, prompt: generation_pb2.Prompt) -> list[int]:
        """The token ids of a checked prompt: its ids, or its text tokenized off
        the event loop. OutOfRange, before tokenizing, for a text too long for
        the context; Unavailable while the model loads."""
        loaded = self.require_loaded()
        kind = prompt.WhichOneof("kind")
        if kind == "text":
            return await self.prompts.encode(prompt.text)
        if kind == "chat":
            return await self.prompts.encode(chat_text(loaded.engine.tokenizer, loaded.model_name, prompt.chat),
                                             "prompt.chat")
        return list(prompt.tokens.ids)

    def report(self) -> stats_pb2.LoadReport:
        if self.loaded is None:
            return stats_pb2.LoadReport(instance_id=self.instance_id, role=self.role, timestamp=time.time())
        utilization = (self._nvml.read(), stats_pb2.UTILIZATION_SOURCE_NVML) if self._nvml else None
        return load_report(self.loaded.engine.load(), self.instance_id, self.role, time.time(), utilization)

    async def start(self) -> None:
        """Starts serving RPCs (NOT_SERVING), loads and warms the model, then SERVING."""
        self._loop = asyncio.get_running_loop()
        await self.server.start()
        await self.health.set(False)
        try:
            await self._load()
        except BaseException:
            await self.server.stop(0)  # a server left running past the loop's end only complains
            raise
        await self.health.set(True)
        log.info("%s serving %s on %s", self.instance_id, self.loaded.model_name, self.address)

    async def _load(self) -> None:
        """Loads the model, warms it up and starts the engine (off the event
        loop). FileNotFoundError for a path with no model; what loading raised."""
        c = self.config
        speculation = self._speculation() if self._speculation else None
        if self._build is not None:
            loaded = await asyncio.to_thread(self._build, speculation)
        else:
            loaded = await asyncio.to_thread(
                build_engine, c.model, c.engine_settings(), device=c.device, dtype=c.dtype, threads=c.threads,
                max_context=c.max_context, prepack=c.prepack_weights, lean=c.lean_forward, metrics_window_s=c.metrics_window_s,
                model_name=c.model_name, speculation=speculation, block_size=c.block_size,
                kv_cache_memory=c.kv_cache_memory_bytes(), num_kv_blocks=c.num_kv_blocks,
                prefix_caching=not c.no_prefix_cache)
        engine = loaded.engine
        self.prompts = PromptEncoder(engine.tokenizer, engine.max_context,
                                     await asyncio.to_thread(max_token_bytes, engine.tokenizer))
        self.loaded = loaded
        self._nvml = nvml_for(self.loaded.device)
        if c.warmup:
            await asyncio.to_thread(self.loaded.engine.runner.warmup)
        if c.metrics_port >= 0:
            # A target exports its draft positions up to the highest gamma (a draft has none).
            observer = ServingMetrics(loaded.model_name, self.instance_id, role_of(self.role).value, engine.load,
                                      draft_positions=getattr(c, "gamma_max", 0) if self._speculation else 0)
            self.metrics = MetricsEndpoint(observer.registry)
            self.metrics.start(c.host, c.metrics_port)
            engine.observer = observer  # before the engine thread starts: it alone calls the observer
        self.loaded.engine.start(on_fatal=self._engine_died)

    def _engine_died(self, exc: BaseException) -> None:
        """Engine thread: the engine failed its sequences and stopped; the loop
        turns health NOT_SERVING and asks the process to stop."""
        self._loop.call_soon_threadsafe(self._stop_serving, exc)

    def _stop_serving(self, exc: BaseException) -> None:
        self.failure = exc
        self._health_task = asyncio.ensure_future(self.health.set(False))
        self.stopped.set()

    @property
    def exit_code(self) -> int:
        """The process's exit status: 1 once the engine died, else 0."""
        return 1 if self.failure is not None else 0

    async def stop(self, grace_s: float | None = None) -> None:
        await self.health.shutdown()
        await self.server.stop(self.config.grace_period_s if grace_s is None else grace_s)
        self.close_engine()

    def close_engine(self) -> None:
        if self.loaded is not None:
            self.loaded.engine.stop()
            if self.loaded.close is not None:
                self.loaded.close()
        if self.metrics is not None:
            self.metrics.stop()


async def serve_app(make_app: Callable[[], ModelApp], label: str) -> int:
    """Builds the app inside the running loop (grpc.aio binds to it), starts it
    and serves until SIGTERM/SIGINT or until its engine dies. Returns the
    process's exit status (:attr:`ModelApp.exit_code`)."""
    app = make_app()
    await app.start()
    print(f"{label} serving on {app.address}", flush=True)

    async def close() -> None:
        app.close_engine()

    await serve_until_signal(app.server, app.health, app.config.grace_period_s, on_stop=close,
                             stop_event=app.stopped)
    if app.failure is not None:
        log.critical("%s exits: its engine stopped (%s)", app.instance_id, type(app.failure).__name__)
    return app.exit_code


def run_main(config_cls, create_server: Callable[..., ModelApp], label: str, argv,
             route: Callable[[object], int | None] | None = None) -> int:
    """A model service's ``main``: config from flags and environment, then
    serve. Returns the exit status: 0 after a signal, 1 if the engine died.
    ``route(config)``: an exit status when this process does something else
    than serve (a worker rank of a parallel group), None to serve."""
    config = config_cls.from_command_line(argv, prog=f"llmesh serve {label.split('-')[0]}")
    setup_logging(config.log_level)
    if route is not None and (status := route(config)) is not None:
        return status
    return run_service(f"llmesh serve {label.split('-')[0]}", lambda: serve_app(lambda: create_server(config), label))


class _EngineKVEvents:
    """The loaded engine's KV event log for Stats/WatchKvEvents (Unavailable until loaded)."""

    def __init__(self, app) -> None:
        self._app = app

    @property
    def block_size(self) -> int:
        return self._app.require_loaded().engine.kv_events.block_size

    def read(self, cursor):
        return self._app.require_loaded().engine.kv_events.read(cursor)
