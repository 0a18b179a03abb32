"""``batchbridge metrics``: the Prometheus endpoint on its own, for ``celery worker`` users."""

from __future__ import annotations

import signal
import threading
import time
from typing import Annotated

import typer

from shared.embedded_redis import RedisUnavailable, resolve_redis_url
from worker.cli_requests import err_console, fail, load_settings
from worker.interrupts import StopRequest


def metrics(
    port: Annotated[int, typer.Option(min=0, max=65535, help="the port to listen on")] = 9808,
    host: Annotated[str, typer.Option(help="the address to listen on")] = "127.0.0.1",
) -> None:
    """Serve Prometheus metrics for the workers on this Redis/SQL (for `celery worker` users).

    Every value is read from Redis and SQL when scraped, so any number of these servers
    report the same numbers. Exit 2 when Redis cannot be found or the port is taken.
    """
    from worker.metrics_server import MetricsServer

    settings = load_settings()
    try:
        # Said up front, in one line: a server that only ever reports "redis down" helps no one.
        resolve_redis_url(settings)
    except RedisUnavailable as exc:
        raise fail(exc) from None
    try:
        server = MetricsServer(settings, host, port)
    except OSError as exc:
        raise fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    err_console.print(f"serving Prometheus metrics at http://{host}:{server.port}/metrics")
    # Served from a thread, so Ctrl-C or SIGTERM only asks the main thread to stop it
    # (worker/interrupts.py) rather than interrupting the server wherever it is.
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    try:
        with StopRequest((signal.SIGINT, signal.SIGTERM)) as stop:
            serving.start()
            while not stop.asked and serving.is_alive():
                stop.sleep_until(time.monotonic() + 0.5)
            server.shutdown()
    except KeyboardInterrupt:
        pass  # asked twice: stop without waiting
    finally:
        server.close()
