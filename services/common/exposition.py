"""A Prometheus ``/metrics`` endpoint over HTTP for one registry (never the process-global one)."""

from __future__ import annotations

import logging
import threading

from prometheus_client import start_http_server
from prometheus_client.registry import CollectorRegistry

log = logging.getLogger(__name__)


class MetricsEndpoint:
    """Serves ``registry`` at ``http://HOST:PORT/metrics`` from a daemon thread
    (prometheus-client's own server). :meth:`start` raises OSError when the port is taken."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int | None:
        """The bound port (port 0 asks for any free one); None before start."""
        return self._server.server_port if self._server is not None else None

    def start(self, host: str, port: int) -> None:
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        log.info("Prometheus metrics on http://%s:%d/metrics", host, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = self._thread = None
