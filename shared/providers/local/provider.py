"""The local provider: Together's Batch API semantics on top of a LocalStore, no network."""

from __future__ import annotations

import logging
from collections.abc import Callable
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
    until someone calls ``run_job`` on it. ``faults.fail_rate`` makes that fraction of calls
    raise a retryable ProviderError (429 or 500), as the local HTTP API answers them; the
    other knobs of ``faults`` are for whoever runs the jobs (``run_job(faults=...)``).
    """

    def __init__(
        self,
        store: LocalStore,
        *,
        dispatch: Callable[[str], None] | None = None,
        name: str = "local",
        faults: Faults | None = None,
    ) -> None:
        self.store = store
        self.name = name
        self.faults = faults or Faults()
        self._dispatch = dispatch
        self._call_faults = CallFaults(self.faults)

    def upload_file(self, path: Path) -> str:
        """Stream a JSONL input file into the store and return its file id."""
        self._maybe_fail("upload_file")
        try:
            return self.store.add_file_from_path(path, filename=path.name).id
        except FileNotFoundError as exc:
            raise ProviderError(f"cannot upload {path}: {exc}", retryable=False) from exc
        except OSError as exc:
            raise ProviderError(f"cannot upload {path}: {exc}", retryable=True) from exc

    def create_batch(self, input_file_id: str, *, model: str) -> ProviderBatch:
        """Create a VALIDATING job over an uploaded file and hand it to ``dispatch``."""
        self._maybe_fail("create_batch")
        try:
            job = self.store.create_job(input_file_id, BATCH_ENDPOINT, model_id=model)
        except NotFound as exc:
            raise ProviderError(str(exc), retryable=False, status_code=404) from exc
        if self._dispatch is not None:
            try:
                self._dispatch(job.id)
            except Exception:
                # The job exists, as it would at a real provider once create returned: it stays
                # VALIDATING until a sweep dispatches it again. Failing it here would fail every
                # request of the batch over a momentary broker hiccup.
                log.warning("local job %s created but not dispatched yet", job.id, exc_info=True)
            job = self.store.get_job(job.id)
        return to_provider_batch(job)

    def get_batch(self, batch_id: str) -> ProviderBatch:
        """Return a batch's current state."""
        self._maybe_fail("get_batch")
        try:
            return to_provider_batch(self.store.get_job(batch_id))
        except NotFound as exc:
            raise ProviderError(str(exc), retryable=False, status_code=404) from exc

    def cancel_batch(self, batch_id: str) -> ProviderBatch:
        """Cancel a batch; a running one finishes as CANCELLED once its runner notices."""
        self._maybe_fail("cancel_batch")
        try:
            return to_provider_batch(self.store.request_cancel(batch_id))
        except NotFound as exc:
            raise ProviderError(str(exc), retryable=False, status_code=404) from exc

    def list_batches(self) -> list[ProviderBatch]:
        """Every batch in the store, oldest first."""
        self._maybe_fail("list_batches")
        return [to_provider_batch(job) for job in self.store.list_jobs()]

    def download_file(self, file_id: str, dest: Path) -> None:
        """Stream a stored file to ``dest`` (replaced atomically)."""
        self._maybe_fail("download_file")
        try:
            src = self.store.file_path(file_id)
        except NotFound as exc:
            raise ProviderError(str(exc), retryable=False, status_code=404) from exc
        copy_stream(src, dest)

    def _maybe_fail(self, operation: str) -> None:
        # Drawn before touching anything, so an injected failure never has side effects.
        failure = self._call_faults.draw()
        if failure is not None:
            raise ProviderError(
                f"{operation}: {failure.message}",
                retryable=True,
                status_code=failure.status_code,
                retry_after=failure.retry_after,
            )


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
