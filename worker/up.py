"""``batchbridge up``: the whole stack in the foreground, supervised.

Redis (embedded when ``BATCHBRIDGE_REDIS_URL`` is unset), a worker with the one beat, Flower,
the metrics server and, when the Together adapter points at this machine, ``local-api``.
Every child runs in its own session (a terminal's Ctrl-C reaches only ``up``, which then
stops them in order) and gets a parent-death signal, so none outlives a SIGKILLed ``up``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

from shared.embedded_redis import EmbeddedRedis, child_environment, embedded_redis_dir
from shared.settings import Settings
from shared.startup_checks import LOOPBACK_HOSTS, SetupError, check_all, ensure_data_dir
from shared.urls import safe_url
from worker.processes import ChildProcess, Supervised, Supervisor, WorkerProcess

Say = Callable[[str], None]


@dataclass(frozen=True)
class UpOptions:
    """What ``batchbridge up`` was asked to run."""

    concurrency: int
    loglevel: str = "INFO"
    max_restarts: int = 5
    restart_window: float = 60.0
    flower: bool = True
    flower_port: int = 5555
    metrics: bool = True
    metrics_port: int = 9808
    local_api: bool | None = None  # None: when TOGETHER_BASE_URL is on this machine


class DataDirLock:
    """An exclusive lock on the data directory, held for as long as ``up`` runs.

    Two ``up`` on one directory would start two Redis servers on one append-only file and
    remove each other's ``redis.url``. The kernel drops the lock when its holder dies, even by
    SIGKILL, so a stale lock file never blocks a restart.
    """

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "up.lock"
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock or raise SetupError naming its holder."""
        handle = open(self.path, "a+")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise SetupError(
                f"another `batchbridge up` ({holder}) is running on {self.path.parent}; stop "
                "it first, or give this one its own BATCHBRIDGE_DATA_DIR"
            ) from None
        handle.seek(0)
        handle.truncate()
        started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        """Give the lock up."""
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None


def stop_on_signals() -> Callable[[], bool]:
    """Turn SIGINT and SIGTERM into a flag the supervisor polls (no KeyboardInterrupt)."""
    requested = False

    def handler(_signum: int, _frame: object) -> None:
        nonlocal requested
        requested = True

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return lambda: requested


def local_api_address(settings: Settings) -> tuple[str, int] | None:
    """(host, port) of TOGETHER_BASE_URL when the Together adapter points at this machine."""
    base = os.environ.get("TOGETHER_BASE_URL", "")
    if settings.default_provider != "together" or not base:
        return None
    parts = urlsplit(base)
    if parts.scheme != "http" or parts.hostname not in LOOPBACK_HOSTS:
        return None
    return parts.hostname or "127.0.0.1", parts.port or 80


def run_up(settings: Settings, options: UpOptions, say: Say, warn: Say) -> None:
    """Run the stack until SIGINT/SIGTERM; SetupError or GaveUp when it cannot."""
    stop = stop_on_signals()
    ensure_data_dir(settings)
    lock = DataDirLock(settings.data_dir)
    lock.acquire()
    try:
        with _redis(settings, say) as (url, server):
            check_all(settings, url)
            if stop():
                return
            _run_children(settings, options, url, server, stop, say, warn)
    finally:
        lock.release()


@contextlib.contextmanager
def _redis(settings: Settings, say: Say) -> Iterator[tuple[str, EmbeddedRedis | None]]:
    configured = settings.configured_redis_url
    if configured:
        say(f"  redis      {safe_url(configured)} (BATCHBRIDGE_REDIS_URL)")
        yield configured, None
        return
    server = EmbeddedRedis(embedded_redis_dir(settings), appendfsync=settings.redis_appendfsync)
    url = server.start()
    say(f"  redis      {url} (embedded; data in {server.directory})")
    try:
        yield url, server
    finally:
        server.stop()


def _run_children(
    settings: Settings,
    options: UpOptions,
    url: str,
    server: EmbeddedRedis | None,
    stop: Callable[[], bool],
    say: Say,
    warn: Say,
) -> None:
    env = child_environment(settings, url)
    worker = WorkerProcess(
        env,
        concurrency=options.concurrency,
        loglevel=options.loglevel,
        schedule_path=settings.data_dir / "celerybeat-schedule",
        parent_death_signal=signal.SIGQUIT,
    )
    others = _other_children(settings, options, env)
    supervised: list[Supervised] = []
    if server is not None:
        supervised.append(_supervised_redis(server))
    local_api = [c for c in others if c.name == "local-api"]
    for child in local_api:  # the worker's first submit should find it listening
        child.start()
        say(f"  local-api  {child.address} (TOGETHER_BASE_URL)")
    worker.start()
    say(f"  worker     pid {worker.process.pid if worker.process else '?'}, "
        f"{options.concurrency} processes, with the beat")  # fmt: skip
    supervised.append(_supervised_worker(worker))
    for child in others:
        if child not in local_api:
            child.start()
            say(f"  {child.name:<10} {child.address}")
        supervised.append(child.supervised())
    say(f"batchbridge is up: provider {settings.default_provider}; Ctrl-C stops it")
    try:
        Supervisor(
            supervised, max_deaths=options.max_restarts, window=options.restart_window, say=warn
        ).watch(stop)
    finally:
        say("stopping ...")
        for child in reversed(others):
            child.stop()
        worker.stop()


def _other_children(
    settings: Settings, options: UpOptions, env: dict[str, str]
) -> list[ChildProcess]:
    cli = [sys.executable, "-m", "worker.cli"]
    children = []
    address = local_api_address(settings) if options.local_api is not False else None
    if options.local_api and address is None:
        raise SetupError(
            "--local-api needs BATCHBRIDGE_PROVIDER=together and TOGETHER_BASE_URL=http://"
            "127.0.0.1:PORT (the address local-api is to serve)"
        )
    if address is not None:
        host, port = address
        api_env = dict(env)
        if settings.together_api_key is not None:
            api_env["BATCHBRIDGE_LOCAL_API_KEY"] = settings.together_api_key.get_secret_value()
        command = [*cli, "local-api", "--host", host, "--port", str(port)]
        children.append(ChildProcess("local-api", command, api_env, f"http://{host}:{port}"))
    if options.flower:
        children.append(_flower(env, options.flower_port))
    if options.metrics:
        command = [*cli, "metrics", "--host", "127.0.0.1", "--port", str(options.metrics_port)]
        where = f"http://127.0.0.1:{options.metrics_port}/metrics"
        children.append(ChildProcess("metrics", command, env, where))
    return children


def _flower(env: dict[str, str], port: int) -> ChildProcess:
    flower_env = dict(env)
    # Flower's HTTP API refuses every call unless auth is configured or this is set. It
    # listens on loopback only, so the API is opened to this machine's users; set
    # FLOWER_BASIC_AUTH=user:password (read by Flower itself) to require a login instead.
    if not any(k in env for k in ("FLOWER_BASIC_AUTH", "FLOWER_AUTH")):
        flower_env.setdefault("FLOWER_UNAUTHENTICATED_API", "true")
    command = [
        sys.executable, "-m", "celery", "-A", "worker.app", "flower",
        "--address=127.0.0.1", f"--port={port}",
        "--tasks_columns=name,uuid,state,result,received,runtime,worker",
        "--logging=warning",  # one access-log line per page refresh drowns everything else
    ]  # fmt: skip
    return ChildProcess("flower", command, flower_env, f"http://127.0.0.1:{port}")


def _supervised_worker(worker: WorkerProcess) -> Supervised:
    def restart() -> None:
        worker.stop()  # leaves none of the dead worker's pool or beat behind
        worker.start()

    def exit_code() -> int | None:
        return worker.process.poll() if worker.process is not None else None

    return Supervised("the worker", restart, worker.alive, exit_code)


def _supervised_redis(server: EmbeddedRedis) -> Supervised:
    def restart() -> None:
        server.kill()  # reap the dead process; the same port and files come back
        server.start()

    return Supervised(
        f"the embedded Redis (port {server.port})", restart, server.alive, server.exit_code
    )
