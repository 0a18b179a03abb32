"""Starting and stopping Celery worker processes (used by the CLI, the demo and the tests)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO

from shared import task_names


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
    ) -> None:
        self.env = env
        self.beat = beat
        self.concurrency = concurrency
        self.loglevel = loglevel
        self.log_path = log_path
        self.schedule_path = schedule_path
        self.hostname = hostname
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
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process is not None:
            # Pool children and the embedded beat share the group; leave none behind.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
