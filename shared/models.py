"""The durable record (SQLModel): batches and the requests packed into them.

A request gets a row when it is packed into a batch; until then it lives only in Redis.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import BigInteger, Text
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    """Now, timezone-aware in UTC: the one clock the record uses."""
    return datetime.now(UTC)


class BatchState(enum.StrEnum):
    """Where a batch is in its life; see ``BATCH_TRANSITIONS`` for the legal moves."""

    PACKED = "packed"  # input file written locally, not yet at the provider
    UPLOADED = "uploaded"  # provider file id known
    SUBMITTED = "submitted"  # provider batch id known; polled until the provider is done
    COLLECTING = "collecting"  # provider finished; results being fanned out
    FINISHED = "finished"  # every request of the batch has an outcome or was requeued
    ABANDONED = "abandoned"  # the claim was reaped before its file was committed
    FAILED = "failed"  # could not be submitted (permanent provider error)


BATCH_TRANSITIONS: dict[BatchState, frozenset[BatchState]] = {
    BatchState.PACKED: frozenset({BatchState.UPLOADED, BatchState.FAILED}),
    BatchState.UPLOADED: frozenset({BatchState.SUBMITTED, BatchState.FAILED}),
    BatchState.SUBMITTED: frozenset({BatchState.COLLECTING}),
    BatchState.COLLECTING: frozenset({BatchState.FINISHED}),
    BatchState.FINISHED: frozenset(),
    BatchState.ABANDONED: frozenset(),
    BatchState.FAILED: frozenset({BatchState.FINISHED}),
}


class RequestState(enum.StrEnum):
    """A packed request's state in the record."""

    BATCHED = "batched"
    REQUEUED = "requeued"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Batch(SQLModel, table=True):
    """One batch file and its provider job."""

    __tablename__ = "batches"

    id: str = Field(primary_key=True, max_length=64)
    provider: str = Field(index=True, max_length=32)
    model: str = Field(max_length=256)
    state: str = Field(index=True, max_length=16)
    request_count: int
    bytes: int
    flush_reason: str = Field(default="", max_length=16)
    file_path: str = Field(default="", max_length=1024)
    provider_file_id: str | None = Field(default=None, max_length=128)
    provider_batch_id: str | None = Field(default=None, max_length=128)
    provider_status: str | None = Field(default=None, max_length=64)
    outcome: str | None = Field(default=None, max_length=16)
    error: str | None = Field(default=None, sa_type=Text)
    output_file_id: str | None = Field(default=None, max_length=128)
    error_file_id: str | None = Field(default=None, max_length=128)
    submit_attempts: int = 0
    create_started_at: datetime | None = None  # a create call may be in flight since then
    collect_failures: int = 0
    poll_count: int = 0
    not_found_polls: int = 0  # consecutive polls the provider answered 404
    completed_count: int = 0
    failed_count: int = 0
    requeued_count: int = 0
    prompt_tokens: int = Field(default=0, sa_type=BigInteger)
    completion_tokens: int = Field(default=0, sa_type=BigInteger)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    submitted_at: datetime | None = None
    # When a worker should next look at this batch: submit retry or poll, by state.
    next_poll_at: datetime | None = Field(default=None, index=True)
    finished_at: datetime | None = None


class Request(SQLModel, table=True):
    """One request once it has been packed (provider and model are its batch's).

    ``attempts`` counts the batches it has been in.
    """

    __tablename__ = "requests"

    id: str = Field(primary_key=True, max_length=64)
    batch_id: str = Field(index=True, max_length=64)
    state: str = Field(max_length=16)
    attempts: int = 1
    callback_queue: str = Field(default="", max_length=128)
    error_code: str | None = Field(default=None, max_length=64)
    error_message: str | None = Field(default=None, sa_type=Text)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finished_at: datetime | None = None
