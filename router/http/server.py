"""The front door's HTTP server: uvicorn serving the FastAPI app as a task of
the router's event loop (no thread, no second loop)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl as _ssl

import uvicorn

log = logging.getLogger(__name__)


class HttpServer:
    """uvicorn on ``host:port``. :meth:`start` binds (OSError when the port is
    in use) and serves as a task; :meth:`stop` lets running requests finish
    for up to ``grace_s`` seconds. ``ssl``: (certfile, keyfile) for HTTPS;
    ``client_ca``: with HTTPS, every client must present a certificate signed
    by this CA (the router's ``--tls-client-auth``, as on its gRPC port).
    Event-loop thread."""

    def __init__(self, app, host: str, port: int, ssl: tuple[str, str] | None = None,
                 client_ca: str | None = None) -> None:
        self.host, self.port = host, port
        certfile, keyfile = ssl or (None, None)
        mutual = {"ssl_ca_certs": client_ca, "ssl_cert_reqs": _ssl.CERT_REQUIRED} if ssl and client_ca else {}
        self.config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                     lifespan="off", ssl_certfile=certfile, ssl_keyfile=keyfile,
                                     timeout_graceful_shutdown=5, **mutual)
        self.server = uvicorn.Server(self.config)
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # IPPROTO_TCP, not the default 0: asyncio turns Nagle's algorithm off
        # (TCP_NODELAY) only on sockets whose proto says TCP, and accepted sockets
        # take the listener's. With Nagle on, each small SSE event after the
        # headers waited for the client's delayed ACK (tens of ms). The option is
        # also set here, for the accepted sockets to inherit (Linux).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise OSError(f"could not bind HTTP {self.host}:{self.port} ({exc.strerror}): the port is in use; "
                          "choose another --http-port (0: no HTTP front door)") from None
        self.port = sock.getsockname()[1]
        sock.listen(2048)
        sock.setblocking(False)
        # uvicorn would take SIGTERM/SIGINT over with signal.signal; the router's own handlers stop it.
        self.server.capture_signals = contextlib.nullcontext
        self._task = asyncio.create_task(self.server.serve(sockets=[sock]), name="llmesh-http")
        while not self.server.started and not self._task.done():
            await asyncio.sleep(0.005)
        if self._task.done():
            self._task.result()

    async def stop(self) -> None:
        if self._task is None:
            return
        self.server.should_exit = True
        try:
            await self._task
        except Exception:  # noqa: BLE001 - stopping: what the server raised is logged, not fatal
            log.exception("the HTTP server stopped with an error")
        self._task = None
