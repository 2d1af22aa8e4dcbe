"""Server bootstrap shared by every service.

Every server gets, in this order: the OpenTelemetry aio interceptor (trace
context in, span per call), the error interceptor (the one place where
exceptions become status codes), the access interceptor (the admin boundary
and the router's client token, :mod:`services.common.access`), the standard
``grpc.health.v1`` service (NOT_SERVING until the service says it is ready),
server reflection, a TLS port when the config names TLS files (mutual TLS
unless ``tls_client_auth`` is false, :mod:`services.common.tls`), and a
graceful shutdown on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from opentelemetry.trace import TracerProvider

from services.common import lifeline, telemetry
from services.common.access import Access, AccessInterceptor
from services.common import errors
from services.common.config import BaseConfig
from services.common.stats_service import StatsServicer
from services.common.status import ErrorInterceptor
from services.common.stubs import SERVICE_NAMES, stats_pb2, stats_pb2_grpc
from services.common.tls import MAX_MESSAGE_BYTES, is_loopback
from services.common.waits import wait_event

log = logging.getLogger(__name__)

#: Largest request message a server takes: room for a prompt at llmesh's 2 MiB
#: limit, or a draft stream's first message at a 1 M-token context; grpc
#: answers RESOURCE_EXHAUSTED to more, before anything is parsed.
MAX_REQUEST_BYTES = 8 * 1024 * 1024
#: Calls grpc core holds for a server before the application takes them. Past its
#: default (1000, hard 3000) a burst of calls is cut off with CANCELLED before
#: any handler sees it (1600 one-token calls at once: 48 cut off), so neither
#: the service's own admission (RESOURCE_EXHAUSTED with a retry-after) nor the
#: router's failover can act on them. A pending call costs a few KiB; the
#: service's admission bounds what it then holds.
MAX_PENDING_CALLS = 1 << 16
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
    # gRPC sets SO_REUSEPORT by default: a second server on a port in use would
    # bind beside the first and the kernel would split connections between them.
    ("grpc.so_reuseport", 0),
    ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
    ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
]


class _Writes:
    """A servicer context that passes a health watch's writes on and says when
    NOT_SERVING has gone out (after the write completed: no write is then in
    flight on the call)."""

    def __init__(self, context) -> None:
        self._context = context
        self.not_serving = asyncio.Event()

    async def write(self, reply: health_pb2.HealthCheckResponse) -> None:
        await self._context.write(reply)
        if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
            self.not_serving.set()

    def __getattr__(self, name: str):
        return getattr(self._context, name)


class _HealthServicer(health.aio.HealthServicer):
    """grpc's health servicer, whose Watch streams end (OK) once ``ending`` is
    set at shutdown and the watcher has been told NOT_SERVING. A server's
    graceful stop waits for every call, and a watch never ends by itself: one
    watcher (the router's) held a lone service's stop for its whole grace
    period, and its cancellation then was logged as an ERROR. A watch of a
    name this server does not know (SERVICE_UNKNOWN, never NOT_SERVING) ends
    ``UNKNOWN_NAME_S`` seconds after ``ending``."""

    UNKNOWN_NAME_S = 1.0

    def __init__(self, ending: asyncio.Event) -> None:
        super().__init__()
        self._ending = ending
        #: name -> status, as set (grpc's servicer keeps its own privately and has no List).
        self._statuses: dict[str, int] = {"": health_pb2.HealthCheckResponse.SERVING}

    async def set(self, service: str, status) -> None:
        if not self._ending.is_set():  # after shutdown every name stays NOT_SERVING, as grpc's does
            self._statuses[service] = status
        await super().set(service, status)

    async def enter_graceful_shutdown(self) -> None:
        self._statuses = dict.fromkeys(self._statuses, health_pb2.HealthCheckResponse.NOT_SERVING)
        await super().enter_graceful_shutdown()

    async def List(self, request, context) -> health_pb2.HealthListResponse:  # noqa: N802 - the gRPC method's name
        """Every name this server reports on, with its status (grpc.health.v1's List;
        grpcio's servicer leaves it unimplemented)."""
        return health_pb2.HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=status) for name, status in self._statuses.items()})

    async def Watch(self, request, context) -> None:  # noqa: N802 - the gRPC method's name
        writes = _Writes(context)
        watch = asyncio.ensure_future(super().Watch(request, writes))
        ended = asyncio.ensure_future(self._told(writes))
        try:
            await asyncio.wait({watch, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
            watch.cancel()  # parked on the status condition, not in a write (see _Writes)
            await asyncio.gather(watch, ended, return_exceptions=True)

    async def _told(self, writes: _Writes) -> None:
        await self._ending.wait()
        await wait_event(writes.not_serving, self.UNKNOWN_NAME_S)


class Health:
    """The service's standard health servicer and the names it reports on.
    ``ending`` is set once it shuts down: long-lived streams (health and
    Stats watches) end then, so that they do not hold the server's stop."""

    def __init__(self, service_names: Iterable[str]) -> None:
        self.ending = asyncio.Event()
        self.servicer = _HealthServicer(self.ending)
        self.names = ["", *service_names]

    async def set(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in self.names:
            await self.servicer.set(name, status)

    async def shutdown(self) -> None:
        """Marks every name NOT_SERVING for good (later set() calls are ignored)
        and ends the watch streams."""
        await self.servicer.enter_graceful_shutdown()
        self.ending.set()


def access_of(config: BaseConfig, service_names: Iterable[str] = (), client_token: str = "") -> Access:
    """The access rules of a server with ``config``: admin RPCs are open only
    on plaintext loopback with no admin token; ``client_token`` guards every
    method of ``service_names`` (the service's own, not Stats or health)."""
    identities = config.admin_identities
    if isinstance(identities, str):
        identities = [i.strip() for i in identities.split(",") if i.strip()]
    token = config.admin_secret()
    return Access(admin_token=token, admin_identities=identities,
                  admin_open=not token and config.tls() is None and is_loopback(config.host),
                  client_token=client_token, client_services=service_names)


#: grpc.reflection.v1: the same messages as v1alpha under its final name (grpcio-reflection serves only
#: v1alpha; clients written against v1, e.g. Node's @grpc/reflection, ask for this one).
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def add_reflection(server: grpc.aio.Server, service_names: list[str]) -> None:
    """Server reflection of ``service_names`` under both names of the protocol:
    ``grpc.reflection.v1alpha`` (grpcio-reflection's servicer) and
    ``grpc.reflection.v1``, whose messages are the same field for field, so
    the one servicer answers both."""
    servicer = reflection.aio.ReflectionServicer([*service_names, reflection.SERVICE_NAME, REFLECTION_V1])
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(REFLECTION_V1, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)}),))


def new_server(config: BaseConfig, service_names: Iterable[str],
               provider: TracerProvider, client_token: str = "") -> tuple[grpc.aio.Server, int, Health]:
    """A server bound to ``config.host:config.port`` with health and reflection,
    over TLS when the config names TLS files, its admin RPCs guarded
    (:func:`access_of`; ``client_token``: the token the first of
    ``service_names`` asks of every caller, empty for none).

    Returns the server (not started), the bound port (the real one when the
    config asks for port 0) and the health handle, NOT_SERVING. OSError when
    the port cannot be bound or a TLS file cannot be read.
    """
    names = list(service_names)
    tls = config.tls()
    mutual = tls is not None and config.tls_client_auth
    access = access_of(config, names[:1], client_token)
    server = grpc.aio.server(
        interceptors=[*telemetry.server_interceptors(provider), ErrorInterceptor(),
                      AccessInterceptor(access, verified_peers=mutual)],
        options=SERVER_OPTIONS,
    )
    health_handle = Health(names)
    health_pb2_grpc.add_HealthServicer_to_server(health_handle.servicer, server)
    add_reflection(server, [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name])
    where = f"{config.host}:{config.port}"
    try:
        port = (server.add_insecure_port(where) if tls is None
                else server.add_secure_port(where, tls.server_credentials(require_client_auth=mutual)))
    except RuntimeError:  # grpc's "Failed to bind to address": it returns 0 in older releases
        port = 0
    if port == 0:
        raise OSError(f"could not bind {where}: the port is in use or the host is not an address of this "
                      "machine; choose another --port or --host")
    if tls is None and not is_loopback(config.host):
        log.warning("serving plaintext on %s (--insecure): anyone on the network can read and send calls; "
                    "admin RPCs need the admin token", where)
    return server, port, health_handle


async def serve_until_signal(server: grpc.aio.Server, health_handle: Health, grace_s: float,
                             on_stop: Callable[[], Awaitable[None]] | None = None,
                             stop_event: asyncio.Event | None = None) -> None:
    """Serves until SIGTERM/SIGINT (or ``stop_event``), then shuts down gracefully.

    Health turns NOT_SERVING first (load balancers stop sending), then the
    server stops taking new calls and gives running ones ``grace_s`` seconds.
    A service started by a launcher also stops when the launcher dies.
    """
    stop = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - non-main thread
            pass
    if not lifeline.bind_to_launcher():
        log.warning("the launcher that started this service is gone; stopping")
        stop.set()
    await stop.wait()
    log.info("shutting down: finishing running calls within %.1f s", grace_s)
    await health_handle.shutdown()
    await server.stop(grace_s)
    if on_stop is not None:
        await on_stop()
    log.info("stopped")


class ServiceApp:
    """What every service process shares once its parts are built: a bound server
    (``server``, ``port``, ``health``, from :func:`new_server`) and its config.

    Subclasses build their parts in ``__init__``, override :meth:`start` and,
    when they hold loops or channels, :meth:`close`. Event-loop thread only.
    """

    config: BaseConfig
    server: grpc.aio.Server
    port: int
    health: Health
    instance_id: str

    def bind(self, config: BaseConfig, service: str, provider: TracerProvider | None,
             client_token: str = "") -> None:
        """Builds the bound server of ``service`` (a SERVICE_NAMES key) and its Stats service,
        and names the instance (``config.instance_id``, else ``service@host:port``);
        ``client_token``: see :func:`new_server`. OSError when the port cannot be bound."""
        self.config = config
        self.server, self.port, self.health = new_server(
            config, [SERVICE_NAMES[service], SERVICE_NAMES["stats"]], provider, client_token)
        self.instance_id = config.instance_id or f"{service}@{config.host}:{self.port}"
        stats_pb2_grpc.add_StatsServicer_to_server(
            StatsServicer(self.report, config.stats_interval_s, ending=self.health.ending), self.server)

    def report(self) -> stats_pb2.LoadReport:
        """The load report Stats/Watch streams (called on the event loop at each interval)."""
        raise NotImplementedError

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    async def start(self) -> None:
        await self.server.start()

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, then the server stops and gives running calls ``grace_s``
        seconds (default ``config.grace_period_s``), then :meth:`close`."""
        await self.health.shutdown()
        await self.server.stop(self.config.grace_period_s if grace_s is None else grace_s)
        await self.close()

    async def close(self) -> None:
        """Stops what the service runs besides its server (after the server has stopped)."""

    async def serve(self, name: str) -> None:
        """Starts, says where it serves on stdout, and serves until SIGTERM/SIGINT
        (:func:`serve_until_signal`), then closes."""
        await self.start()
        print(f"{name} serving on {self.address}", flush=True)
        await serve_until_signal(self.server, self.health, self.config.grace_period_s, on_stop=self.close)


#: What a service that cannot start raises: a model path with no model, a port
#: it cannot bind, certificates it cannot read, a config it cannot use.
STARTUP_ERRORS = (OSError, ValueError, errors.LlmeshError)


def run_service(label: str, serve: Callable[[], Awaitable[int | None]]) -> int:
    """A service process's ``asyncio.run``: returns ``serve()``'s exit status
    (None counts as 0). A start-up failure is one line on stderr naming the
    service and what to fix, exit status 1, not a traceback (which is logged
    at DEBUG)."""
    try:
        return asyncio.run(serve()) or 0
    except STARTUP_ERRORS as exc:
        log.debug("%s could not start", label, exc_info=exc)
        print(f"{label}: cannot start: {exc}", file=sys.stderr, flush=True)
        return 1


def setup_logging(level: str) -> None:
    """``level``: a :class:`~services.common.config.LogLevel` (checked when the flags are parsed)."""
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
