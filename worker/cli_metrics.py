"""``batchbridge metrics``: the Prometheus endpoint on its own, for ``celery worker`` users."""

from __future__ import annotations

import signal
import threading
from typing import Annotated

import typer

from shared.embedded_redis import RedisUnavailable, resolve_redis_url
from worker.cli_requests import err_console, fail, load_settings


def metrics(
    port: Annotated[int, typer.Option(help="the port to listen on")] = 9808,
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
    stopping = threading.Event()

    def stop(_signum: int, _frame: object) -> None:
        # Ctrl-C or SIGTERM asks serve_forever to return (shutdown() waits for it, so from a
        # thread) instead of raising KeyboardInterrupt wherever the main thread happens to
        # be, which can leave a lock taken and the process hanging on its way out.
        if stopping.is_set():
            raise KeyboardInterrupt  # asked twice: stop now
        stopping.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass  # Ctrl-C is how it is stopped: no traceback, exit 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.close()
