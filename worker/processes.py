"""Starting and stopping Celery worker processes (used by the CLI, the demo and the tests)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from shared import task_names
from shared.parent_death import die_with_parent


class ChildProcess:
    """One supervised command (Flower, the metrics server, local-api) in its own session."""

    def __init__(
        self,
        name: str,
        command: list[str],
        env: dict[str, str],
        address: str = "",
        *,
        log_path: Path | None = None,
        parent_death_signal: int = signal.SIGTERM,
    ) -> None:
        self.name = name
        self.address = address  # where it listens, for people
        self.command = command
        self.env = env
        self.log_path = log_path
        self.parent_death_signal = parent_death_signal
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        """Start the command (output to ``log_path`` when given, else inherited)."""
        if self.log_path is not None and self._log is None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            self.command,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT if self._log else None,
            start_new_session=True,
            preexec_fn=die_with_parent(self.parent_death_signal),
        )

    def alive(self) -> bool:
        """Whether the command is running."""
        return self.process is not None and self.process.poll() is None

    def exit_code(self) -> int | None:
        """The exit code once it has exited."""
        return self.process.poll() if self.process is not None else None

    def restart(self) -> None:
        """Reap what is left of it, then start it again."""
        self.stop(timeout=5.0)
        self.start()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL of its process group if it lingers."""
        process, self.process = self.process, None
        if process is not None:
            _terminate(process, timeout)
        if self._log is not None:
            self._log.close()
            self._log = None

    def supervised(self) -> Supervised:
        """This child as the supervisor sees it."""
        return Supervised(self.name, self.restart, self.alive, self.exit_code)


def _terminate(process: subprocess.Popen[bytes], timeout: float) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    # Whatever it started shares its group; leave none behind.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


class WorkerProcess:
    """A ``celery -A worker.app worker`` child process, with an embedded beat if asked."""

    def __init__(
        self,
        env: dict[str, str],
        *,
        beat: bool = True,
        concurrency: int = 2,
        loglevel: str = "INFO",
        log_path: Path | None = None,
        schedule_path: Path | None = None,
        hostname: str | None = None,
        include: tuple[str, ...] = (),
        parent_death_signal: int | None = None,
    ) -> None:
        self.env = env
        self.beat = beat
        self.concurrency = concurrency
        self.loglevel = loglevel
        self.log_path = log_path
        self.schedule_path = schedule_path
        self.hostname = hostname
        self.include = include  # extra task modules to import (tests use it for probes)
        # SIGQUIT: Celery's cold shutdown, which stops the pool and the embedded beat at once.
        self.parent_death_signal = parent_death_signal
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def command(self) -> list[str]:
        """The command line this process runs."""
        cmd = [
            sys.executable, "-m", "celery", "-A", "worker.app", "worker",
            "-Q", task_names.QUEUE,
            "-c", str(self.concurrency),
            "--loglevel", self.loglevel,
            "--without-mingle", "--without-gossip",
        ]  # fmt: skip
        if self.beat:
            cmd.append("-B")
            if self.schedule_path is not None:
                cmd += ["-s", str(self.schedule_path)]
        if self.hostname:
            cmd += ["-n", self.hostname]
        if self.include:
            cmd += ["-I", ",".join(self.include)]
        return cmd

    def start(self) -> WorkerProcess:
        """Start the worker (its output goes to ``log_path`` when given, else inherited)."""
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            self.command(),
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT if self._log else None,
            start_new_session=True,  # Ctrl-C in a terminal reaches us, not the worker twice
            preexec_fn=None
            if self.parent_death_signal is None
            else die_with_parent(self.parent_death_signal),
        )
        return self

    def alive(self) -> bool:
        """Whether the worker's main process is running."""
        return self.process is not None and self.process.poll() is None

    def wait(self) -> int:
        """Block until the worker exits; its exit code."""
        assert self.process is not None
        return self.process.wait()

    def stop(self, timeout: float = 30.0) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL of the whole process group if it lingers."""
        process, self.process = self.process, None
        if process is not None:
            _terminate(process, timeout)  # pool children and the embedded beat too
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class GaveUp(RuntimeError):
    """A supervised child kept dying; the message says which and how."""


class Supervised:
    """Something ``batchbridge up`` keeps running: a worker, or the embedded Redis."""

    def __init__(
        self,
        name: str,
        start: Callable[[], None],
        alive: Callable[[], bool],
        exit_code: Callable[[], int | None],
    ) -> None:
        self.name = name
        self.start = start
        self.alive = alive
        self.exit_code = exit_code


class Supervisor:
    """Restarts children that die, with backoff; gives up on one that dies too often.

    A child that dies ``max_deaths`` times within ``window`` seconds is crash-looping (bad
    settings, a database that refuses it, a Redis it must not run on): :meth:`watch` raises
    :class:`GaveUp` saying so, rather than restarting it for ever.
    """

    def __init__(
        self,
        children: list[Supervised],
        *,
        max_deaths: int = 5,
        window: float = 60.0,
        first_delay: float = 0.5,
        max_delay: float = 10.0,
        say: Callable[[str], None] = print,
    ) -> None:
        self.children = children
        self.max_deaths = max_deaths
        self.window = window
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.say = say
        self.deaths: dict[str, list[float]] = {child.name: [] for child in children}

    def watch(self, stop: Callable[[], bool], poll: float = 0.2) -> None:
        """Until ``stop()``: restart whatever died (in order: Redis before the worker)."""
        while not stop():
            for child in self.children:
                if not child.alive() and not stop():
                    self._restart(child, stop)
            time.sleep(poll)

    def _restart(self, child: Supervised, stop: Callable[[], bool]) -> None:
        now = time.monotonic()
        recent = [t for t in self.deaths[child.name] if now - t < self.window] + [now]
        self.deaths[child.name] = recent
        code = child.exit_code()
        if len(recent) >= self.max_deaths:
            raise GaveUp(
                f"{child.name} died {len(recent)} times within {self.window:.0f} s (last exit "
                f"code {code}); giving up. Its output above says why"
            )
        delay = min(self.first_delay * 2 ** (len(recent) - 1), self.max_delay)
        self.say(f"{child.name} died (exit code {code}); restarting it in {delay:.1f} s")
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and not stop():
            time.sleep(0.05)
        if not stop():
            child.start()
