"""A Prometheus ``/metrics`` endpoint over HTTP for one registry (never the process-global one).

It always answers in the classic text format (0.0.4). prometheus-client 0.26,
asked for OpenMetrics 1.0.0 without an ``escaping`` parameter (Prometheus 2.x
asks first for exactly that), escapes every name to underscores, colons
included: ``llmesh:generation_tokens_total`` would reach Prometheus as
``llmesh_generation_tokens_total`` and no vLLM-style query would find it.
"""

from __future__ import annotations

import logging
import socket
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.registry import CollectorRegistry

log = logging.getLogger(__name__)

TEXT_FORMAT = "text/plain; version=0.0.4"


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Quiet(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        pass


class MetricsEndpoint:
    """Serves ``registry`` at ``http://HOST:PORT/metrics`` from a daemon thread
    (prometheus-client's WSGI app). :meth:`start` raises OSError when the port is taken."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int | None:
        """The bound port (port 0 asks for any free one); None before start."""
        return self._server.server_port if self._server is not None else None

    def start(self, host: str, port: int) -> None:
        metrics = make_wsgi_app(self.registry)

        def app(environ, start_response):
            return metrics({**environ, "HTTP_ACCEPT": TEXT_FORMAT}, start_response)

        server_class = _Server6 if ":" in host else _Server
        self._server = make_server(host, port, app, server_class, handler_class=_Quiet)
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()
        log.info("Prometheus metrics on http://%s:%d/metrics", host, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = self._thread = None
