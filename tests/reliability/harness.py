"""What every reliability scenario is made of: real processes, a producer, and the ledger.

A scenario runs a Celery worker (its pool children are the only children of its main
process: beat runs as a process of its own, so the suite can kill, restart and multiply
it), one ``local-api`` as the provider, and a producer submitting in waves. It ends with
:meth:`Scenario.finish`, which settles the ledger, prints and records it, and fails unless
nothing was lost, duplicated, unexpected, double-billed or stuck.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil
from redis import Redis
from redis.exceptions import RedisError

from producer import PartialSubmitError, Producer, Result
from shared.embedded_redis import child_environment
from shared.providers.local import LocalStore
from shared.redis_layout import Keys
from shared.settings import Settings
from tests.conftest import LocalApiServer, settings_env
from tests.reliability.ledger import Expected, Ledger, LedgerSource, report, settle
from worker.processes import WorkerProcess

# Fast ticks and short leases: a dead holder's work is taken over within seconds.
CHAOS_SETTINGS: dict[str, object] = {
    "provider": "together",
    "max_batch_requests": 500,
    "max_wait_seconds": 0.5,
    "poll_interval_seconds": 0.5,
    "aggregate_interval_seconds": 0.3,
    "submit_interval_seconds": 0.3,
    "reap_interval_seconds": 1.0,
    "lease_seconds": 2.0,
    "claim_timeout_seconds": 5.0,
    "provider_timeout_seconds": 5.0,
    "webhook_interval_seconds": 0.3,
    "webhook_retry_schedule": "0,0.2,0.5,1,2,2,2,2,2,2",
    "webhook_allow_cidrs": "127.0.0.0/8",
}
LEDGER_DIR_VARIABLE = "BATCHBRIDGE_TEST_LEDGER_DIR"


def worker_env(settings: Settings, api: LocalApiServer, **extra: str) -> dict[str, str]:
    """The environment a worker or beat of ``settings`` runs with, on ``api``."""
    assert settings.configured_redis_url is not None
    env = child_environment(settings, settings.configured_redis_url)
    env.update(settings_env(settings))
    env.update(TOGETHER_BASE_URL=api.url, TOGETHER_API_KEY=api.api_key, **extra)
    return env


class ProcessGroup:
    """A command in a session of its own, its output to ``log``; killed as a whole group."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def kill(self) -> None:
        """SIGKILL it and everything it started: a machine that died."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        """Warm shutdown (SIGTERM), then whatever is left of its group."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(30)
        self.kill()


class Beat(ProcessGroup):
    """A ``celery beat`` process of its own."""

    def __init__(self, env: dict[str, str], schedule: Path, log: Path) -> None:
        cmd = [sys.executable, "-m", "celery", "-A", "worker.app", "beat", "-s", str(schedule)]
        super().__init__([*cmd, "--loglevel", "INFO"], env, log)


@dataclass
class Scenario:
    """One run: its settings, processes, what was submitted, and where effects are counted."""

    name: str
    settings: Settings
    api: LocalApiServer
    tmp: Path
    source: LedgerSource
    expected: Expected = field(default_factory=Expected)
    workers: list[WorkerProcess] = field(default_factory=list)
    beats: list[Beat] = field(default_factory=list)
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    worker_env_extra: dict[str, str] = field(default_factory=dict)
    acked_at: dict[str, float] = field(default_factory=dict)  # request id -> monotonic
    sent: dict[str, dict[str, Any]] = field(default_factory=dict)  # request id -> body
    worker_restarts: int = 0  # workers found dead and started again by :meth:`supervise`
    _producer: Producer | None = None
    _supervising: threading.Event | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def producer(self) -> Producer:
        """The scenario's producer (one connection, reused)."""
        if self._producer is None:
            self._producer = Producer(settings=self.settings)
        return self._producer

    def env(self) -> dict[str, str]:
        """The environment of this scenario's workers and beats."""
        return worker_env(self.settings, self.api, **self.worker_env_extra)

    def start_worker(self, concurrency: int = 2) -> WorkerProcess:
        """A Celery worker with no embedded beat."""
        n = len(self.workers)
        worker = WorkerProcess(
            self.env(),
            beat=False,
            concurrency=concurrency,
            log_path=self.tmp / f"worker-{n}.log",
            hostname=f"w{n}@%h",
        ).start()
        self.workers.append(worker)
        return worker

    def supervise(self) -> None:
        """Restart any worker whose main process exits, as compose or Kubernetes would.

        Celery's main process exits (``WorkerLostError: Could not start worker processes``)
        when a pool child dies before the pool has finished starting, so a SIGKILL that lands
        just after a (re)start takes the worker down; in production its supervisor brings it
        back. Workers this scenario kills on purpose are replaced by the scenario itself.
        """
        stop = self._supervising = threading.Event()

        def watch() -> None:
            while not stop.wait(0.5):
                with self._lock:
                    for n, worker in enumerate(self.workers):
                        if worker.process is not None and worker.process.poll() is not None:
                            self.workers[n] = self._restarted(worker)
                            self.worker_restarts += 1

        threading.Thread(target=watch, daemon=True).start()

    def start_beat(self) -> Beat:
        """One more beat (each with its own schedule file, as on separate hosts)."""
        n = len(self.beats)
        beat = Beat(self.env(), self.tmp / f"beat-{n}.schedule", self.tmp / f"beat-{n}.log")
        self.beats.append(beat)
        return beat

    def submit(
        self,
        n: int,
        *,
        queue: str = "svc",
        webhook_url: str | None = None,
        chunk: int = 500,
        pause: float = 0.0,
        label: str = "",
        retry_for: float = 0.0,
    ) -> list[str]:
        """Submit ``n`` requests in chunks; their ids, recorded as expected.

        With ``retry_for``, a chunk Redis did not answer is sent again (same idempotency
        keys, so what did arrive is not doubled) for up to that many seconds: what a
        producer does while its Redis restarts.
        """
        ids: list[str] = []
        key_label = re.sub(r"[^A-Za-z0-9_.-]", "-", label) or "r"
        for start in range(0, n, chunk):
            bodies = [
                {
                    "model": "m-x",
                    "messages": [{"role": "user", "content": f"{label} {start + i}"}],
                    "callback_queue": queue,
                    "idempotency_key": f"{key_label}:{start + i}",
                    **({"webhook_url": webhook_url} if webhook_url else {}),
                }
                for i in range(min(chunk, n - start))
            ]
            for handle, body in zip(self.submit_bodies(bodies, retry_for), bodies, strict=True):
                self.expected.add(handle.id, queue, webhook_url)
                self.acked_at[handle.id] = time.monotonic()
                self.sent[handle.id] = body
                ids.append(handle.id)
            if pause:
                time.sleep(pause)
        return ids

    def submit_bodies(self, bodies: list[dict[str, Any]], retry_for: float) -> list[Any]:
        """``submit_many(bodies)``, sent again while Redis does not answer (``retry_for`` s)."""
        deadline = time.monotonic() + retry_for
        while True:
            try:
                return self.producer.submit_many(bodies)
            except (RedisError, PartialSubmitError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def pool_children(self, worker: WorkerProcess | None = None) -> list[psutil.Process]:
        """The pool processes of ``worker`` (the first one by default)."""
        worker = worker or self.workers[0]
        if worker.process is None:
            return []
        try:
            return psutil.Process(worker.process.pid).children()
        except psutil.NoSuchProcess:
            return []

    def kill_random_child(self, worker: WorkerProcess | None = None) -> int | None:
        """SIGKILL one of the worker's pool children at random; its pid (None if none)."""
        children = self.pool_children(worker)
        if not children:
            return None
        victim = self.rng.choice(children)
        with contextlib.suppress(psutil.NoSuchProcess):
            victim.send_signal(signal.SIGKILL)
        return victim.pid

    def kill_worker(self, worker: WorkerProcess) -> None:
        """SIGKILL the worker's main process and its pool: a machine that died."""
        with self._lock:  # not to be mistaken for a crash by the supervisor
            if worker.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(worker.process.pid, signal.SIGKILL)
                worker.process.wait(10)
            worker.stop()

    def replace_worker(self, worker: WorkerProcess) -> WorkerProcess:
        """SIGKILL ``worker`` and start a new one in its place."""
        self.kill_worker(worker)
        with self._lock:
            new = self._restarted(worker)
            self.workers[self.workers.index(worker)] = new
        return new

    def _restarted(self, worker: WorkerProcess) -> WorkerProcess:
        worker.stop()
        return WorkerProcess(
            worker.env,
            beat=False,
            concurrency=worker.concurrency,
            log_path=worker.log_path,
            hostname=worker.hostname,
        ).start()

    def delivered_count(self) -> int:
        """Callback stream entries so far (progress, for timing kills): one XLEN per queue.

        Nobody consumes the streams, so their lengths count every entry ever added; the
        ledger, which also reads every provider file, is for the end.
        """
        keys = Keys(self.settings.key_prefix)
        queues = sorted(set(self.expected.queues.values()))
        pipe = self.producer.redis.pipeline(transaction=False)
        for queue in queues:
            pipe.xlen(keys.callback(queue))
        return sum(int(n) for n in pipe.execute())

    def wait_delivered(self, at_least: int, timeout: float) -> int:
        """Block until ``at_least`` results are out (or ``timeout``); how many are."""
        deadline = time.monotonic() + timeout
        while True:
            done = self.delivered_count()
            if done >= at_least or time.monotonic() > deadline:
                return done
            time.sleep(0.5)

    def finish(self, timeout: float, **extra: object) -> Ledger:
        """Settle, print and record the ledger; fail unless it is clean.

        ``extra`` values are printed beside it; callables are read after settling.
        """
        ledger = settle(self.source, self.expected, deadline=time.monotonic() + timeout)
        extra = {k: v() if callable(v) else v for k, v in extra.items()}
        line = report(self.name, ledger, extra)
        record(self.name, ledger, extra)
        assert ledger.accepted > 0, "the scenario submitted nothing"
        assert ledger.clean, f"{line}\nworker logs: {self.tmp}"
        return ledger

    def close(self) -> None:
        """Stop everything this scenario started."""
        if self._supervising is not None:
            self._supervising.set()
        for beat in self.beats:
            beat.kill()
        for worker in self.workers:
            worker.stop(timeout=10)
        if self._producer is not None:
            self._producer.close()
        if self.source.engine is not None:
            self.source.engine.dispose()


class Background(threading.Thread):
    """A call run in a thread whose exception, if any, is raised again by :meth:`join`."""

    def __init__(self, target: Callable[..., object], *args: object, **kwargs: object) -> None:
        super().__init__(daemon=True)
        self._call = lambda: target(*args, **kwargs)
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            self._call()
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float | None = None) -> None:
        """Wait for the call; raise what it raised."""
        super().join(timeout)
        if self.error is not None:
            raise self.error


def local_api_store(tmp: Path, n: int = 0) -> LocalStore:
    """The store of the ``n``-th local-api the conftest fixture started in ``tmp``."""
    return LocalStore(tmp / f"local-api-{n}" / "local_api")


def record(name: str, ledger: Ledger, extra: dict[str, Any]) -> None:
    """Write the ledger where ``make chaos`` collects them for RESULTS.md (when asked)."""
    folder = os.environ.get(LEDGER_DIR_VARIABLE)
    if not folder:
        return
    path = Path(folder) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"scenario": name, **ledger.counts(), **{k: str(v) for k, v in extra.items()}}
    path.write_bytes(orjson.dumps(data))


def results_statuses(scenario: Scenario) -> Iterable[str]:
    """Each delivered result's status (completed / failed / cancelled)."""
    client = Redis.from_url(scenario.settings.configured_redis_url or "")
    try:
        for queue in set(scenario.expected.queues.values()):
            key = Keys(scenario.settings.key_prefix).callback(queue)
            for _, fields in client.xrange(key):
                yield Result.from_json(fields[b"result"]).status
    finally:
        client.close()
