"""Runs batch jobs in the background of the API server, on a small pool of threads."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from shared.providers.local.engines import Engine
from shared.providers.local.faults import Faults
from shared.providers.local.records import BatchJob, JobStatus
from shared.providers.local.runner import run_job
from shared.providers.local.store import LocalStore, NotFound

log = logging.getLogger(__name__)


class JobExecutor:
    """Executes jobs with ``run_job`` on ``concurrency`` worker threads.

    All state is in the store, so nothing is lost when the process stops: ``resume`` queues
    every unfinished job again, and ``run_job`` restarts it from scratch.
    """

    def __init__(
        self, store: LocalStore, engine: Engine, *, faults: Faults, concurrency: int
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1 (got {concurrency})")
        self._store = store
        self._engine = engine
        self._faults = faults
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="local-api-job")
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._queued: set[str] = set()

    def submit(self, job_id: str) -> None:
        """Queue a job unless it is already queued or running."""
        with self._lock:
            if self._stop.is_set() or job_id in self._queued:
                return
            self._queued.add(job_id)
        self._pool.submit(self._run, job_id)

    def resume(self) -> int:
        """Queue every job that is not finished (after a restart); returns how many."""
        pending = [job.id for job in self._store.list_jobs() if not job.is_terminal]
        for job_id in pending:
            self.submit(job_id)
        return len(pending)

    def close(self) -> None:
        """Stop: running jobs are given up unfinished (resumed on the next start), queued ones
        are dropped from the queue but stay unfinished on disk."""
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _run(self, job_id: str) -> None:
        try:
            run_job(self._store, job_id, self._engine, faults=self._faults, stop=self._stop)
        except Exception as exc:
            log.exception("local batch job %s crashed", job_id)
            reason = f"internal error while running the batch: {type(exc).__name__}: {exc}"
            try:
                self._store.update_job(job_id, lambda job: _crashed(job, reason, self._store))
            except (NotFound, OSError):
                log.exception("could not mark local batch job %s as failed", job_id)
        finally:
            with self._lock:
                self._queued.discard(job_id)


def _crashed(job: BatchJob, reason: str, store: LocalStore) -> BatchJob:
    # A job that cannot run must end, or pollers wait forever.
    if job.is_terminal:
        return job
    return replace(
        job,
        status=JobStatus.FAILED,
        error=reason,
        completed_at=store.clock(),
        runner_token=None,
        heartbeat_at=None,
    )
