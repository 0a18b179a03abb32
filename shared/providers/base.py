"""The small interface every Batch API provider implements, and the values it returns."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol, runtime_checkable


class ProviderBatchStatus(enum.StrEnum):
    """A provider batch's status, normalised; unknown future values map to UNKNOWN."""

    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    CANCELLING = "cancelling"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    UNKNOWN = "unknown"

    @property
    def is_terminal(self) -> bool:
        """True once the provider will not change the batch any more."""
        return self in _TERMINAL

    @classmethod
    def from_together(cls, raw: str | None) -> ProviderBatchStatus:
        """Map Together's upper-case status (or any unknown value) to our enum."""
        return _TOGETHER_STATUS.get((raw or "").upper(), cls.UNKNOWN)


_TERMINAL = frozenset(
    {
        ProviderBatchStatus.COMPLETED,
        ProviderBatchStatus.FAILED,
        ProviderBatchStatus.EXPIRED,
        ProviderBatchStatus.CANCELLED,
    }
)

_TOGETHER_STATUS = {
    "VALIDATING": ProviderBatchStatus.VALIDATING,
    "IN_PROGRESS": ProviderBatchStatus.IN_PROGRESS,
    "CANCELING": ProviderBatchStatus.CANCELLING,
    "CANCELLING": ProviderBatchStatus.CANCELLING,
    "COMPLETED": ProviderBatchStatus.COMPLETED,
    "FAILED": ProviderBatchStatus.FAILED,
    "EXPIRED": ProviderBatchStatus.EXPIRED,
    "CANCELLED": ProviderBatchStatus.CANCELLED,
}


@dataclass(frozen=True, slots=True)
class ProviderBatch:
    """What a provider reports about one batch job."""

    id: str
    status: ProviderBatchStatus
    raw_status: str
    input_file_id: str
    output_file_id: str | None = None
    error_file_id: str | None = None
    error: str | None = None
    progress: float = 0.0
    model: str | None = None
    created_at: datetime | None = None
    completed_at: datetime | None = None


class ProviderError(Exception):
    """A provider call failed; ``retryable`` says whether trying again may succeed."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        status_code: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status_code = status_code
        self.retry_after = retry_after


@runtime_checkable
class BatchProvider(Protocol):
    """A Batch API: upload a JSONL file, run it as a batch, fetch the result files."""

    name: str

    def upload_file(self, path: Path) -> str:
        """Upload a JSONL input file (streamed) and return the provider's file id."""
        ...

    def create_batch(self, input_file_id: str, *, model: str) -> ProviderBatch:
        """Create a batch job over an uploaded input file."""
        ...

    def get_batch(self, batch_id: str) -> ProviderBatch:
        """Fetch a batch job's current status."""
        ...

    def cancel_batch(self, batch_id: str) -> ProviderBatch:
        """Ask the provider to cancel a batch job."""
        ...

    def list_batches(self) -> list[ProviderBatch]:
        """List the account's batch jobs (used to reconcile a create that may have happened)."""
        ...

    def file_exists(self, file_id: str) -> bool:
        """True if the provider still has this file; False on 404; ProviderError otherwise."""
        ...

    def download_file(self, file_id: str, dest: Path) -> None:
        """Stream a file's content to ``dest`` without holding it in memory."""
        ...

    def delete_file(self, file_id: str) -> None:
        """Delete a file at the provider; a file already gone (404) is not an error.

        Raises ProviderError otherwise.
        """
        ...
