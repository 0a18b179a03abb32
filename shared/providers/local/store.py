"""On-disk store of files and batch jobs that survives restarts; the local provider's state."""

from __future__ import annotations

import os
import secrets
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

import orjson

from shared.limits import BATCH_ENDPOINT
from shared.providers.local._fs import (
    COPY_CHUNK,
    atomic_write,
    exclusive_lock,
    fsync_dir,
    read_json_object,
)
from shared.providers.local.file_writer import FileWriter
from shared.providers.local.records import (
    JOB_WINDOW_SECONDS,
    BatchJob,
    JobStatus,
    PendingUpload,
    StoredFile,
)

# Together's file purposes (docs and Go SDK enum, plus the Python SDK's "calibration").
FILE_PURPOSES = frozenset(
    {
        "batch-api",
        "batch-generated",
        "fine-tune",
        "calibration",
        "eval",
        "eval-sample",
        "eval-output",
        "eval-summary",
    }
)

# The file types Together's upload accepts (taken from the file's suffix by the SDK).
FILE_TYPES = frozenset({"jsonl", "parquet", "csv"})


class NotFound(LookupError):
    """The file or batch job does not exist (or the id is malformed)."""


class LocalStore:
    """Files and batch jobs under ``root``; every change is an atomic, fsynced file replace.

    ``clock`` gives unix time (tests may fake it). A runner whose heartbeat is older than
    ``runner_lease_seconds`` is presumed dead, so a cancel no longer waits for it.
    """

    def __init__(
        self,
        root: Path,
        *,
        clock: Callable[[], float] = time.time,
        runner_lease_seconds: float = 120.0,
    ) -> None:
        self.root = Path(root)
        self.clock = clock
        self.runner_lease_seconds = runner_lease_seconds
        self._files = self.root / "files"
        self._jobs = self.root / "jobs"
        self._uploads = self.root / "uploads"
        self.tmp_dir = self.root / "tmp"
        for directory in (self._files, self._jobs, self._uploads, self.tmp_dir):
            directory.mkdir(parents=True, exist_ok=True)

    # Files

    def add_file_from_path(
        self, src: Path, *, filename: str | None = None, purpose: str = "batch-api"
    ) -> StoredFile:
        """Copy a local file into the store, streaming."""
        with open(src, "rb") as fh:
            return self.add_file_from_stream(
                iter(lambda: fh.read(COPY_CHUNK), b""),
                filename=filename or Path(src).name,
                purpose=purpose,
            )

    def add_file_from_stream(
        self, chunks: Iterable[bytes], *, filename: str, purpose: str = "batch-api"
    ) -> StoredFile:
        """Store a file given as an iterable of byte chunks (e.g. an HTTP request body)."""
        with self.new_output_file(filename=filename, purpose=purpose) as writer:
            for chunk in chunks:
                writer.write(chunk)
            return writer.commit()

    def new_output_file(self, *, filename: str, purpose: str = "batch-generated") -> FileWriter:
        """Start writing a new file; use as a context manager and call ``commit``."""
        if purpose not in FILE_PURPOSES:
            raise ValueError(f"invalid purpose {purpose!r}; allowed: {sorted(FILE_PURPOSES)}")
        file_id = f"file-{uuid.uuid4()}"
        return FileWriter(
            file_id=file_id,
            part_path=self.tmp_dir / f"{file_id}.part",
            filename=filename,
            purpose=purpose,
            publish=self._publish_file,
            clock=self.clock,
        )

    def reserve_upload(
        self,
        *,
        filename: str,
        purpose: str = "batch-api",
        file_type: str = "jsonl",
        checksum: str | None = None,
    ) -> PendingUpload:
        """Hand out a file id and an upload token; the bytes follow via ``open_upload``."""
        if purpose not in FILE_PURPOSES:
            raise ValueError(f"invalid purpose {purpose!r}; allowed: {sorted(FILE_PURPOSES)}")
        if file_type not in FILE_TYPES:
            raise ValueError(f"invalid file type {file_type!r}; allowed: {sorted(FILE_TYPES)}")
        pending = PendingUpload(
            file_id=f"file-{uuid.uuid4()}",
            token=secrets.token_urlsafe(32),
            filename=filename,
            purpose=purpose,
            file_type=file_type,
            created_at=self.clock(),
            checksum=checksum,
        )
        atomic_write(self._upload_path(pending.file_id), orjson.dumps(pending.to_record()))
        return pending

    def get_upload(self, file_id: str) -> PendingUpload:
        """A reserved upload whose bytes have not arrived yet, or NotFound."""
        try:
            return PendingUpload.from_record(read_json_object(self._upload_path(file_id)))
        except FileNotFoundError:
            raise NotFound(f"no pending upload for file {file_id!r}") from None

    def open_upload(self, file_id: str) -> FileWriter:
        """Receive a reserved upload's bytes; ``commit`` publishes the file under that id."""
        pending = self.get_upload(file_id)
        return FileWriter(
            file_id=pending.file_id,
            # A unique part name, so a repeated PUT cannot interleave with one in flight.
            part_path=self.tmp_dir / f"{pending.file_id}.{uuid.uuid4().hex}.part",
            filename=pending.filename,
            purpose=pending.purpose,
            publish=self._publish_upload,
            clock=self.clock,
            file_type=pending.file_type,
        )

    def prune_uploads(self, max_age_seconds: float) -> int:
        """Forget reservations whose bytes never came; returns how many were dropped."""
        dropped = 0
        cutoff = self.clock() - max_age_seconds
        for path in self._uploads.glob("file-*.json"):
            try:
                if PendingUpload.from_record(read_json_object(path)).created_at < cutoff:
                    path.unlink()
                    dropped += 1
            except (FileNotFoundError, ValueError, TypeError):
                continue
        return dropped

    def get_file(self, file_id: str) -> StoredFile:
        """Return a file's metadata or raise NotFound."""
        meta = self._file_meta_path(file_id)
        try:
            return StoredFile.from_record(read_json_object(meta))
        except FileNotFoundError:
            raise NotFound(f"file {file_id!r} not found") from None

    def list_files(self) -> list[StoredFile]:
        """All files, oldest first."""
        found = [self._try_load_file(p) for p in self._files.glob("file-*.json")]
        return sorted((f for f in found if f), key=lambda f: (f.created_at, f.id))

    def delete_file(self, file_id: str) -> None:
        """Delete a file or raise NotFound."""
        meta = self._file_meta_path(file_id)
        try:
            # Metadata first: once it is gone the file no longer exists for readers.
            meta.unlink()
        except FileNotFoundError:
            raise NotFound(f"file {file_id!r} not found") from None
        self._content_path(file_id).unlink(missing_ok=True)
        fsync_dir(self._files)

    def file_path(self, file_id: str) -> Path:
        """Path of a file's content, to stream from; raises NotFound."""
        self.get_file(file_id)
        return self._content_path(file_id)

    # Jobs

    def create_job(
        self, input_file_id: str, endpoint: str = BATCH_ENDPOINT, model_id: str | None = None
    ) -> BatchJob:
        """Create a VALIDATING job over an existing input file (NotFound if it is missing)."""
        input_file = self.get_file(input_file_id)
        now = self.clock()
        job = BatchJob(
            id=str(uuid.uuid4()),
            input_file_id=input_file.id,
            endpoint=endpoint,
            created_at=now,
            job_deadline=now + JOB_WINDOW_SECONDS,
            file_size_bytes=input_file.bytes,
            model_id=model_id,
        )
        self._write_job(job)
        return job

    def get_job(self, job_id: str) -> BatchJob:
        """Return a job or raise NotFound."""
        try:
            return BatchJob.from_record(read_json_object(self._job_path(job_id)))
        except FileNotFoundError:
            raise NotFound(f"batch job {job_id!r} not found") from None

    def list_jobs(self) -> list[BatchJob]:
        """All jobs, oldest first."""
        jobs = [self._try_load_job(p) for p in self._jobs.glob("*.json")]
        return sorted((j for j in jobs if j), key=lambda j: (j.created_at, j.id))

    def update_job(self, job_id: str, fn: Callable[[BatchJob], BatchJob]) -> BatchJob:
        """Read-modify-write a job under an exclusive lock; ``fn`` returns the new job."""
        path = self._job_path(job_id)
        with exclusive_lock(path.with_suffix(".lock")):
            current = self.get_job(job_id)
            updated = fn(current)
            if updated.id != current.id:
                raise ValueError("update_job must not change the job id")
            if updated != current:
                self._write_job(updated)
            return updated

    def request_cancel(self, job_id: str) -> BatchJob:
        """Cancel a job: at once if no live runner holds it, else ask its runner to stop."""
        return self.update_job(job_id, self._cancel)

    def runner_is_live(self, job: BatchJob) -> bool:
        """True if a runner claimed the job and its heartbeat is within the lease."""
        if job.runner_token is None or job.heartbeat_at is None:
            return False
        return self.clock() - job.heartbeat_at < self.runner_lease_seconds

    # Internals

    def _cancel(self, job: BatchJob) -> BatchJob:
        if job.is_terminal:
            return job
        if self.runner_is_live(job):
            return replace(job, cancel_requested=True)
        return replace(
            job,
            status=JobStatus.CANCELLED,
            cancel_requested=True,
            completed_at=self.clock(),
            runner_token=None,
            heartbeat_at=None,
        )

    def _publish_file(self, stored: StoredFile, part_path: Path) -> None:
        os.replace(part_path, self._content_path(stored.id))
        atomic_write(self._file_meta_path(stored.id), orjson.dumps(stored.to_record()))

    def _publish_upload(self, stored: StoredFile, part_path: Path) -> None:
        self._publish_file(stored, part_path)
        self._upload_path(stored.id).unlink(missing_ok=True)

    def _write_job(self, job: BatchJob) -> None:
        atomic_write(self._job_path(job.id), orjson.dumps(job.to_record()))

    def _try_load_file(self, meta: Path) -> StoredFile | None:
        try:
            return StoredFile.from_record(read_json_object(meta))
        except FileNotFoundError:  # deleted while listing
            return None

    def _try_load_job(self, path: Path) -> BatchJob | None:
        try:
            return BatchJob.from_record(read_json_object(path))
        except FileNotFoundError:
            return None

    def _file_meta_path(self, file_id: str) -> Path:
        return self._files / f"{_checked_file_id(file_id)}.json"

    def _content_path(self, file_id: str) -> Path:
        return self._files / f"{_checked_file_id(file_id)}.jsonl"

    def _upload_path(self, file_id: str) -> Path:
        return self._uploads / f"{_checked_file_id(file_id)}.json"

    def _job_path(self, job_id: str) -> Path:
        if not _is_uuid(job_id):
            raise NotFound(f"batch job {job_id!r} not found")
        return self._jobs / f"{job_id}.json"


def _is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value
    except ValueError:
        return False


def _checked_file_id(file_id: str) -> str:
    # Ids come from HTTP paths too: only canonical ids may become file names.
    if not (file_id.startswith("file-") and _is_uuid(file_id[5:])):
        raise NotFound(f"file {file_id!r} not found")
    return file_id
