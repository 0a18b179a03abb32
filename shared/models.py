"""The durable record (SQLModel): batches and the requests packed into them.

A request gets a row when it is packed into a batch; until then it lives only in Redis.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import BigInteger, Index, Text, text
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
    """A request's state in the record; see ``REQUEST_TRANSITIONS`` for the legal moves.

    A request gets a row when it is packed (``batched``), or when it is cancelled before it
    ever was (then straight ``cancelled``, recorded from Redis by the reaper).
    """

    BATCHED = "batched"
    REQUEUED = "requeued"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_REQUEST_STATES = frozenset(
    {RequestState.COMPLETED, RequestState.FAILED, RequestState.CANCELLED}
)
REQUEST_TRANSITIONS: dict[RequestState, frozenset[RequestState]] = {
    # Its batch's result arrived (or the batch failed), or a retryable failure sent it round.
    RequestState.BATCHED: frozenset({*TERMINAL_REQUEST_STATES, RequestState.REQUEUED}),
    # Packed into its next batch, cancelled or failed while it waited in the buffer again.
    RequestState.REQUEUED: frozenset(
        {RequestState.BATCHED, RequestState.CANCELLED, RequestState.FAILED}
    ),
    RequestState.COMPLETED: frozenset(),
    RequestState.FAILED: frozenset(),
    RequestState.CANCELLED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A batch or request was asked to move between states its state machine does not link."""


def check_request_transition(source: RequestState | str, target: RequestState | str) -> None:
    """Raise IllegalTransition unless a request may go from ``source`` to ``target``."""
    if RequestState(target) not in REQUEST_TRANSITIONS[RequestState(source)]:
        raise IllegalTransition(f"request state {source} cannot become {target}")


def request_sources(target: RequestState | str) -> list[str]:
    """The states a request may reach ``target`` from (the WHERE of a conditional UPDATE)."""
    return [s.value for s, targets in REQUEST_TRANSITIONS.items() if target in targets]


def check_batch_transition(source: BatchState | str, target: BatchState | str) -> None:
    """Raise IllegalTransition unless a batch may go from ``source`` to ``target``."""
    if BatchState(target) not in BATCH_TRANSITIONS[BatchState(source)]:
        raise IllegalTransition(f"batch state {source} cannot become {target}")


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
    file_path: str = Field(default="", max_length=1024)  # on the packer's disk: scratch
    # What any worker needs to rebuild the file byte for byte from Redis: the buffer holding
    # the bodies, and the length (``bytes``) and digest the packer wrote.
    buffer: str | None = Field(default=None, max_length=320)
    file_sha256: str | None = Field(default=None, max_length=64)
    provider_file_id: str | None = Field(default=None, max_length=128)
    provider_batch_id: str | None = Field(default=None, max_length=128)
    provider_status: str | None = Field(default=None, max_length=64)
    outcome: str | None = Field(default=None, max_length=16)
    error: str | None = Field(default=None, sa_type=Text)
    output_file_id: str | None = Field(default=None, max_length=128)
    error_file_id: str | None = Field(default=None, max_length=128)
    submit_attempts: int = 0
    # A create call may be in flight, or may have taken effect unseen, since then: set when the
    # right to create is taken and cleared only once the create's outcome is known for sure.
    create_started_at: datetime | None = None
    ambiguous_creates: int = 0  # creates that failed in a way that may still have created a job
    # Until then, polls also look for a second job over our input file (a late ambiguous create).
    duplicate_check_until: datetime | None = None
    # JSON list of the other provider jobs found for this batch and what was done about them.
    extra_jobs: str | None = Field(default=None, sa_type=Text)
    # Submission is on hold (the provider refuses us, or retries ran out) since then.
    held_since: datetime | None = None
    collect_failures: int = 0
    poll_count: int = 0
    not_found_polls: int = 0  # consecutive polls the provider answered 404
    not_found_since: datetime | None = None  # the first of those 404s
    # The provider said COMPLETED but named no output or error file (yet) since then.
    no_output_since: datetime | None = None
    completed_count: int = 0
    failed_count: int = 0
    requeued_count: int = 0
    prompt_tokens: int = Field(default=0, sa_type=BigInteger)
    completion_tokens: int = Field(default=0, sa_type=BigInteger)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    submitted_at: datetime | None = None
    # An operator asked to cancel the batch (``batchbridge batches cancel``) since then; mode
    # "cancel" cancels its unfinished requests, "requeue" sends them round again.
    cancel_requested_at: datetime | None = None
    cancel_mode: str | None = Field(default=None, max_length=16)
    # When a worker should next look at this batch: submit retry or poll, by state.
    next_poll_at: datetime | None = Field(default=None, index=True)
    finished_at: datetime | None = None


class Request(SQLModel, table=True):
    """One request once it has been packed (provider and model are its batch's).

    ``attempts`` counts the batches it has been in.
    """

    __tablename__ = "requests"
    # Finished rows only (the rest have no time to find): retention reads the oldest of them
    # every reaper pass, which without it scanned the whole table, the largest of the record.
    __table_args__ = (
        Index(
            "ix_requests_finished_at",
            "finished_at",
            sqlite_where=text("finished_at IS NOT NULL"),
            postgresql_where=text("finished_at IS NOT NULL"),
        ),
    )

    id: str = Field(primary_key=True, max_length=64)
    batch_id: str = Field(index=True, max_length=64)
    state: str = Field(max_length=16)
    attempts: int = 1
    callback_queue: str = Field(default="", max_length=128)
    webhook_url: str = Field(default="", max_length=2048)
    error_code: str | None = Field(default=None, max_length=64)
    error_message: str | None = Field(default=None, sa_type=Text)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Its line in the batch file (0-based): the order a worker rebuilding the file writes.
    line: int | None = None
    finished_at: datetime | None = None
    # The terminal Result's JSON, byte for byte what went on the callback stream, so a result
    # Redis lost can be delivered again from the record.
    result: str | None = Field(default=None, sa_type=Text)


class RedisEpoch(SQLModel, table=True):
    """The Redis dataset the record last saw, per key prefix (the id under ``{p}:epoch``).

    A Redis that answers with another id, or none, was wiped or replaced since.
    """

    __tablename__ = "redis_epochs"

    key_prefix: str = Field(primary_key=True, max_length=32)
    epoch: str = Field(max_length=64)
    seen_at: datetime = Field(default_factory=utcnow)


class WebhookDelivery(SQLModel, table=True):
    """The one webhook event of a request's terminal outcome, and how its delivery went.

    The id is the Standard Webhooks ``webhook-id`` (``msg_{request id}``): the same on every
    attempt and every replay, so a receiver that deduplicates on it processes it once.
    """

    __tablename__ = "webhook_deliveries"

    id: str = Field(primary_key=True, max_length=80)
    request_id: str = Field(index=True, max_length=64)
    url: str = Field(max_length=2048)
    event_type: str = Field(max_length=32)
    body: str = Field(sa_type=Text)  # exactly the bytes signed and sent
    state: str = Field(index=True, max_length=16)  # pending, delivered, dead
    attempts: int = 0
    last_status: int | None = None
    last_error: str | None = Field(default=None, sa_type=Text)
    next_attempt_at: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = Field(default=None, index=True)


class WebhookAttempt(SQLModel, table=True):
    """One HTTP attempt at a webhook delivery."""

    __tablename__ = "webhook_attempts"

    id: int | None = Field(default=None, primary_key=True)
    delivery_id: str = Field(index=True, max_length=80)
    attempt: int
    at: datetime = Field(default_factory=utcnow)
    status_code: int | None = None
    latency_ms: int = 0
    error: str | None = Field(default=None, sa_type=Text)


class WebhookEndpoint(SQLModel, table=True):
    """An endpoint that answered 410 Gone: nothing more is sent to it until it is enabled."""

    __tablename__ = "webhook_endpoints"

    url: str = Field(primary_key=True, max_length=2048)
    disabled_at: datetime = Field(default_factory=utcnow)
    reason: str = Field(default="", sa_type=Text)
