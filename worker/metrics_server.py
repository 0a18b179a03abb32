"""The HTTP endpoint for Prometheus: ``/metrics`` from a registry holding only our collector."""

from __future__ import annotations

import logging
import socket
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from shared.settings import Settings
from worker.metrics import BatchbridgeCollector

log = logging.getLogger(__name__)


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    # A slow scrape (a busy SQL server) must not hold up the next one, nor shutdown.
    daemon_threads = True


class _ThreadingServer6(_ThreadingServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Nothing: a line per scrape every few seconds would drown the logs."""


class MetricsServer:
    """A bound, not yet serving, metrics endpoint; ``serve_forever`` blocks until shutdown."""

    def __init__(self, settings: Settings, host: str, port: int) -> None:
        self.collector = BatchbridgeCollector(settings)
        # Only our collector: the process metrics of a metrics server would only confuse.
        self.registry = CollectorRegistry()
        self.registry.register(self.collector)
        try:
            self._server = make_server(
                host,
                port,
                make_wsgi_app(self.registry),
                server_class=_ThreadingServer6 if ":" in host else _ThreadingServer,
                handler_class=_QuietHandler,
            )
        except OSError:
            self.collector.close()
            raise

    @property
    def port(self) -> int:
        """The port listened on (the one chosen, when asked for port 0)."""
        return int(self._server.server_address[1])

    def serve_forever(self) -> None:
        """Answer scrapes until ``shutdown`` is called (from another thread)."""
        self._server.serve_forever(poll_interval=0.5)

    def shutdown(self) -> None:
        """Stop ``serve_forever`` (call from another thread)."""
        self._server.shutdown()

    def close(self) -> None:
        """Release the socket and the connections."""
        self._server.server_close()
        self.collector.close()


def serve_metrics(settings: Settings, host: str, port: int) -> None:
    """Serve ``/metrics`` on ``host:port`` until interrupted (OSError if it cannot listen)."""
    server = MetricsServer(settings, host, port)
    log.info("serving Prometheus metrics at http://%s:%d/metrics", host, server.port)
    try:
        server.serve_forever()
    finally:
        server.close()
