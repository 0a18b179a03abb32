"""The local provider: Together's Batch API semantics on top of a LocalStore, no network."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from shared.limits import BATCH_ENDPOINT
from shared.providers.base import ProviderBatch, ProviderBatchStatus, ProviderError
from shared.providers.local._fs import copy_stream
from shared.providers.local.faults import CallFaults, Faults
from shared.providers.local.records import BatchJob
from shared.providers.local.store import LocalStore, NotFound

log = logging.getLogger(__name__)


class LocalProvider:
    """A ``BatchProvider`` backed by a LocalStore.

    ``dispatch(job_id)`` is called after a batch is created and decides where it runs (the
    worker sends a task that calls ``run_job``); with ``dispatch=None`` a job stays VALIDATING
    until someone calls ``run_job`` on it. ``faults`` break calls as the local HTTP API does:
    ``fail_rate`` raises a retryable ProviderError (429 or 500) before the call does anything,
    ``lost_answer_rate`` raises a retryable 500 or 504 after a create took effect,
    ``answer_delay`` answers late, and ``not_found_window`` makes ``get_batch`` answer 404.
    The other knobs are for whoever runs the jobs (``run_job(faults=...)``).

    ``timeout`` plays the HTTP client's timeout: an answer later than that is given up on
    (after the call took effect) with a retryable "timed out" ProviderError.
    """

    def __init__(
        self,
        store: LocalStore,
        *,
        dispatch: Callable[[str], None] | None = None,
        name: str = "local",
        faults: Faults | None = None,
        timeout: float | None = None,
    ) -> None:
        self.store = store
        self.name = name
        self.faults = faults or Faults()
        self.timeout = timeout
        self._dispatch = dispatch
        self._call_faults = CallFaults(self.faults)

    def upload_file(self, path: Path) -> str:
        """Stream a JSONL input file into the store and return its file id."""
        with self._call("upload_file"):
            try:
                return self.store.add_file_from_path(path, filename=path.name).id
            except FileNotFoundError as exc:
                raise ProviderError(f"cannot upload {path}: {exc}", retryable=False) from exc
            except OSError as exc:
                raise ProviderError(f"cannot upload {path}: {exc}", retryable=True) from exc

    def create_batch(self, input_file_id: str, *, model: str) -> ProviderBatch:
        """Create a VALIDATING job over an uploaded file and hand it to ``dispatch``."""
        with self._call("create_batch"):
            try:
                job = self.store.create_job(input_file_id, BATCH_ENDPOINT, model_id=model)
            except NotFound as exc:
                raise ProviderError(str(exc), retryable=False, status_code=404) from exc
            if self._dispatch is not None:
                try:
                    self._dispatch(job.id)
                except Exception:
                    # The job exists, as it would at a real provider once create returned: it
                    # stays VALIDATING until a sweep dispatches it again. Failing it here would
                    # fail every request of the batch over a momentary broker hiccup.
                    log.warning(
                        "local job %s created but not dispatched yet", job.id, exc_info=True
                    )
                job = self.store.get_job(job.id)
            lost = self._call_faults.draw_lost_answer()
            if lost is not None:
                raise ProviderError(
                    f"create_batch: {lost.message}", retryable=True, status_code=lost.status_code
                )
            return to_provider_batch(job)

    def get_batch(self, batch_id: str) -> ProviderBatch:
        """Return a batch's current state."""
        with self._call("get_batch"):
            try:
                if self._call_faults.hides_batches():
                    raise NotFound(
                        f"batch job {batch_id!r} not found (injected by not_found_window)"
                    )
                return to_provider_batch(self.store.get_job(batch_id))
            except NotFound as exc:
                raise ProviderError(str(exc), retryable=False, status_code=404) from exc

    def cancel_batch(self, batch_id: str) -> ProviderBatch:
        """Cancel a batch; a running one finishes as CANCELLED once its runner notices."""
        with self._call("cancel_batch"):
            try:
                return to_provider_batch(self.store.request_cancel(batch_id))
            except NotFound as exc:
                raise ProviderError(str(exc), retryable=False, status_code=404) from exc

    def list_batches(self) -> list[ProviderBatch]:
        """Every batch in the store, oldest first."""
        with self._call("list_batches"):
            return [to_provider_batch(job) for job in self.store.list_jobs()]

    def file_exists(self, file_id: str) -> bool:
        """True if the store still has this file (False for an unknown or malformed id)."""
        with self._call("file_exists"):
            try:
                self.store.get_file(file_id)
            except NotFound:
                return False
            return True

    def download_file(self, file_id: str, dest: Path) -> None:
        """Stream a stored file to ``dest`` (replaced atomically)."""
        with self._call("download_file"):
            try:
                src = self.store.file_path(file_id)
            except NotFound as exc:
                raise ProviderError(str(exc), retryable=False, status_code=404) from exc
            copy_stream(src, dest)

    def delete_file(self, file_id: str) -> None:
        """Delete a stored file and its content; an unknown or malformed id is already gone."""
        with self._call("delete_file"):
            try:
                self.store.delete_file(file_id)
            except NotFound:
                return
            except OSError as exc:
                raise ProviderError(f"cannot delete file {file_id}: {exc}", retryable=True) from exc

    @contextmanager
    def _call(self, operation: str) -> Iterator[None]:
        # An injected failure is drawn before touching anything, so it never has side effects;
        # a late answer comes after the call's effect, whatever the call's outcome.
        failure = self._call_faults.draw()
        if failure is not None:
            raise ProviderError(
                f"{operation}: {failure.message}",
                retryable=True,
                status_code=failure.status_code,
                retry_after=failure.retry_after,
            )
        try:
            yield
        finally:
            self._answer_late(operation)

    def _answer_late(self, operation: str) -> None:
        delay = self.faults.answer_delay
        if delay <= 0:
            return
        if self.timeout is not None and delay > self.timeout:
            time.sleep(self.timeout)
            # Raised from ``finally``: replaces the answer (or error) the caller never got.
            raise ProviderError(
                f"{operation} timed out after {self.timeout:g}s (injected by answer_delay "
                f"{delay:g}s; the call may have taken effect)",
                retryable=True,
            )
        time.sleep(delay)


def to_provider_batch(job: BatchJob) -> ProviderBatch:
    """Map a stored job to the provider-neutral ProviderBatch."""
    return ProviderBatch(
        id=job.id,
        status=ProviderBatchStatus.from_together(job.status.value),
        raw_status=job.status.value,
        input_file_id=job.input_file_id,
        output_file_id=job.output_file_id,
        error_file_id=job.error_file_id,
        error=job.error,
        progress=job.progress,
        model=job.model_id,
        created_at=_utc(job.created_at),
        completed_at=_utc(job.completed_at),
    )


def _utc(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=UTC)
