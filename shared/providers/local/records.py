"""The records the local store keeps (uploaded files, batch jobs), in Together's vocabulary."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from typing import Any

# Together's user ids are 24 hex characters; the local provider has a single fixed account.
LOCAL_USER_ID = "6c6f63616c2d757365722d31"
JOB_WINDOW_SECONDS = 24 * 3600


class JobStatus(enum.StrEnum):
    """A batch job's status, spelled exactly as Together's API returns it."""

    VALIDATING = "VALIDATING"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    EXPIRED = "EXPIRED"
    CANCELLED = "CANCELLED"

    @property
    def is_terminal(self) -> bool:
        """True once the job will not change any more."""
        return self not in (JobStatus.VALIDATING, JobStatus.IN_PROGRESS)


def iso_z(ts: float | None) -> str | None:
    """Format a unix timestamp as Together does: ISO-8601 with microseconds and a ``Z``."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, slots=True)
class StoredFile:
    """One file in the store: an uploaded batch input or a generated output/error file."""

    id: str
    filename: str
    bytes: int
    purpose: str
    created_at: int
    line_count: int
    file_type: str = "jsonl"

    def to_together(self) -> dict[str, object]:
        """Together's FileResponse body for this file."""
        return {
            "id": self.id,
            "object": "file",
            "created_at": self.created_at,
            "filename": self.filename,
            "bytes": self.bytes,
            "purpose": self.purpose,
            "FileType": self.file_type,
            "Processed": True,
            "LineCount": self.line_count,
            "processing_status": "COMPLETED",
            "validation_report": None,
        }

    def to_record(self) -> dict[str, object]:
        """The dict persisted on disk."""
        return asdict(self)

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> StoredFile:
        """Rebuild from the persisted dict, ignoring keys a newer version may have added."""
        return cls(**_known(cls, data))


@dataclass(frozen=True, slots=True)
class BatchJob:
    """A batch job: Together's BatchJob fields plus the runner's bookkeeping.

    Times are unix seconds (float) internally; ``to_together`` renders them as Together does.
    ``cancel_requested``, ``attempts``, ``runner_token`` and ``heartbeat_at`` are internal:
    the runner that last claimed the job owns it (``runner_token``) and proves it is alive by
    refreshing ``heartbeat_at``.
    """

    id: str
    input_file_id: str
    endpoint: str
    created_at: float
    job_deadline: float
    user_id: str = LOCAL_USER_ID
    file_size_bytes: int = 0
    status: JobStatus = JobStatus.VALIDATING
    completed_at: float | None = None
    progress: float = 0.0
    model_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    error: str | None = None
    cancel_requested: bool = False
    attempts: int = 0
    runner_token: str | None = None
    heartbeat_at: float | None = None

    @property
    def is_terminal(self) -> bool:
        """True once the job will not change any more."""
        return self.status.is_terminal

    def to_together(self) -> dict[str, object]:
        """Together's BatchJob body for this job (internal fields left out)."""
        return {
            "id": self.id,
            "user_id": self.user_id,
            "input_file_id": self.input_file_id,
            "file_size_bytes": self.file_size_bytes,
            "status": self.status.value,
            "job_deadline": iso_z(self.job_deadline),
            "created_at": iso_z(self.created_at),
            "endpoint": self.endpoint,
            "progress": self.progress,
            "model_id": self.model_id,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "error": self.error,
            "completed_at": iso_z(self.completed_at),
        }

    def to_record(self) -> dict[str, object]:
        """The dict persisted on disk."""
        return asdict(self)

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> BatchJob:
        """Rebuild from the persisted dict, ignoring keys a newer version may have added."""
        known = _known(cls, data)
        known["status"] = JobStatus(known.get("status", JobStatus.VALIDATING))
        return cls(**known)


@dataclass(frozen=True, slots=True)
class PendingUpload:
    """A file id handed out before its bytes arrive (Together's 3-step upload).

    ``token`` authorises the bytes' upload, which carries no API key; ``checksum`` is the
    SHA-256 hex digest the client announced, if any.
    """

    file_id: str
    token: str
    filename: str
    purpose: str
    file_type: str
    created_at: float
    checksum: str | None = None

    def to_record(self) -> dict[str, object]:
        """The dict persisted on disk."""
        return asdict(self)

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> PendingUpload:
        """Rebuild from the persisted dict, ignoring keys a newer version may have added."""
        return cls(**_known(cls, data))


def _known(
    cls: type[StoredFile] | type[BatchJob] | type[PendingUpload], data: dict[str, Any]
) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}
