"""Submitting batches to their provider and polling them until the provider is done.

Creating a batch is the one call that is not idempotent (it costs money), so it is guarded
three ways: a per-batch lease, a conditional SQL transition, and reconciliation: before a
second create attempt, the provider's batch list is searched for a job over our input file
created since this batch was packed and not already owned by another batch.

Each batch is handled on its own: an error with one batch is recorded on it and retried with
backoff, and never stops the others.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import update
from sqlmodel import select

from shared.db import due_for_poll, due_for_submit, transition, update_batch
from shared.models import Batch, BatchState, utcnow
from shared.providers.base import BatchProvider, ProviderBatch, ProviderError
from worker.context import WorkerContext

log = logging.getLogger(__name__)
_RETRY_BASE_SECONDS = 2.0
_RETRY_MAX_SECONDS = 300.0
_MAX_SUBMIT_ATTEMPTS = 10
# A job can be briefly invisible right after it is created; only repeated 404s mean lost.
_NOT_FOUND_POLLS_BEFORE_LOST = 3
# Tolerated difference between the provider's clock and ours when matching a job to a batch.
_CLOCK_SLACK = timedelta(minutes=5)
# How long a create call may still be in flight (the SDK's read timeout is 60 s).
_CREATE_IN_FLIGHT = timedelta(seconds=120)


def backoff(attempts: int, retry_after: float | None = None) -> timedelta:
    """How long to wait before the next try after ``attempts`` failures."""
    seconds = retry_after or min(_RETRY_BASE_SECONDS * 2**attempts, _RETRY_MAX_SECONDS)
    return timedelta(seconds=seconds)


def submit_ready_batches(ctx: WorkerContext) -> list[str]:
    """Upload and create every packed or uploaded batch whose time has come."""
    with ctx.session() as session:
        ready = due_for_submit(session, utcnow())
    submitted = []
    for batch in ready:
        with ctx.lease(f"batch:{batch.id}") as mine:
            if not mine:
                continue
            try:
                if submit_batch(ctx, batch.id):
                    submitted.append(batch.id)
            except SoftTimeLimitExceeded:
                raise  # the task is out of time: stop, the next beat carries on
            except Exception as exc:  # one bad batch must not stall the rest
                log.exception("submitting batch %s failed unexpectedly", batch.id)
                _retry_later(ctx, batch, f"unexpected error while submitting: {exc!r}")
    return submitted


def submit_batch(ctx: WorkerContext, batch_id: str) -> bool:
    """Take one batch as far as SUBMITTED; True once it is there."""
    with ctx.session() as session:
        batch = session.get(Batch, batch_id)
    if batch is None or batch.state not in (BatchState.PACKED, BatchState.UPLOADED):
        return False
    try:
        provider = ctx.provider(batch.provider)
        if batch.state == BatchState.PACKED:
            path = Path(batch.file_path)
            if not path.exists():
                _give_back_unsent(ctx, batch, f"batch file {path} is missing on this worker")
                return False
            try:
                file_id = provider.upload_file(path)
            except ProviderError as exc:
                _record_submit_failure(ctx, batch, exc, attempts=batch.submit_attempts + 1)
                return False
            with ctx.session() as session:
                uploaded = transition(
                    session,
                    batch_id,
                    BatchState.UPLOADED,
                    expect=[BatchState.PACKED],
                    provider_file_id=file_id,
                )
                session.commit()
            if not uploaded:
                return False  # another worker got there first; it owns the rest
            batch.provider_file_id = file_id
        job = _create_once(ctx, provider, batch)
    except ProviderError as exc:
        # The create attempt (if one was made) is already counted.
        _record_submit_failure(ctx, batch, exc, attempts=batch.submit_attempts)
        return False
    if job is None:
        return False
    with ctx.session() as session:
        moved = transition(
            session,
            batch_id,
            BatchState.SUBMITTED,
            expect=[BatchState.UPLOADED],
            provider_batch_id=job.id,
            provider_status=job.raw_status,
            submitted_at=utcnow(),
            create_started_at=None,
            next_poll_at=utcnow() + timedelta(seconds=ctx.settings.poll_interval_seconds),
            error=None,
        )
        session.commit()
    log.info("submitted batch %s as %s job %s", batch_id, batch.provider, job.id)
    return moved


def _create_once(ctx: WorkerContext, provider: BatchProvider, batch: Batch) -> ProviderBatch | None:
    """Create the provider job, or adopt one an earlier attempt made; None to leave it be."""
    assert batch.provider_file_id is not None
    now = utcnow()
    if batch.create_started_at is not None and now - batch.create_started_at < _CREATE_IN_FLIGHT:
        # Another worker (whose lease lapsed) may be waiting for its create right now.
        return None
    if batch.submit_attempts > 0:
        adopted = _find_earlier_create(ctx, provider, batch)
        if adopted is not None:
            log.info("batch %s was already created as %s; adopting it", batch.id, adopted.id)
            return adopted
    # The right to create is taken in SQL, so two workers can never both create.
    with ctx.session() as session:
        claimed = session.execute(
            update(Batch)
            .where(Batch.id == batch.id)  # type: ignore[arg-type]
            .where(Batch.state == BatchState.UPLOADED.value)  # type: ignore[arg-type]
            .where(Batch.submit_attempts == batch.submit_attempts)  # type: ignore[arg-type]
            .values(submit_attempts=batch.submit_attempts + 1, create_started_at=now)
        )
        session.commit()
    if not claimed.rowcount:  # type: ignore[attr-defined]
        return None
    batch.submit_attempts += 1
    return provider.create_batch(batch.provider_file_id, model=batch.model)


def _find_earlier_create(
    ctx: WorkerContext, provider: BatchProvider, batch: Batch
) -> ProviderBatch | None:
    # A provider may hand back an existing file id for identical content, so the file id
    # alone could match an older batch's job: also require a job newer than this batch and
    # not already owned by another batch.
    candidates = [
        job
        for job in provider.list_batches()
        if job.input_file_id == batch.provider_file_id
        and (job.created_at is None or job.created_at >= batch.created_at - _CLOCK_SLACK)
    ]
    if not candidates:
        return None
    with ctx.session() as session:
        owned = set(
            session.exec(
                select(Batch.provider_batch_id).where(
                    Batch.provider_batch_id.in_([j.id for j in candidates])  # type: ignore[union-attr]
                )
            )
        )
    free = [job for job in candidates if job.id not in owned]
    return free[0] if free else None


def _record_submit_failure(
    ctx: WorkerContext, batch: Batch, exc: ProviderError, *, attempts: int
) -> None:
    with ctx.session() as session:
        if exc.retryable and attempts < _MAX_SUBMIT_ATTEMPTS:
            delay = backoff(attempts, exc.retry_after)
            update_batch(
                session,
                batch.id,
                submit_attempts=attempts,
                create_started_at=None,  # our call has returned: nothing is in flight
                error=f"retryable error, retrying: {exc}",
                next_poll_at=utcnow() + delay,
            )
            log.warning("submitting batch %s failed, retry in %s: %s", batch.id, delay, exc)
        else:
            transition(
                session,
                batch.id,
                BatchState.FAILED,
                expect=[BatchState.PACKED, BatchState.UPLOADED],
                outcome="failed",
                submit_attempts=attempts,
                error=f"{'out of attempts' if exc.retryable else 'permanent error'}: {exc}",
            )
            log.error("batch %s could not be submitted: %s", batch.id, exc)
        session.commit()


def _give_back_unsent(ctx: WorkerContext, batch: Batch, reason: str) -> None:
    # The provider never saw these requests and their bodies are still in Redis, so the
    # collector sends them round again (outcome "unsent" is retryable).
    with ctx.session() as session:
        transition(
            session,
            batch.id,
            BatchState.FAILED,
            expect=[BatchState.PACKED],
            outcome="unsent",
            error=f"{reason}; DATA_DIR must be shared by every worker",
        )
        session.commit()
    log.error("batch %s: %s", batch.id, reason)


def _retry_later(ctx: WorkerContext, batch: Batch, error: str) -> None:
    attempts = batch.submit_attempts + 1
    if attempts >= _MAX_SUBMIT_ATTEMPTS:
        _record_submit_failure(ctx, batch, ProviderError(error, retryable=True), attempts=attempts)
        return
    with ctx.session() as session:
        update_batch(
            session,
            batch.id,
            submit_attempts=attempts,
            error=error,
            next_poll_at=utcnow() + backoff(attempts),
        )
        session.commit()


def poll_due_batches(ctx: WorkerContext) -> list[str]:
    """Poll submitted batches that are due; return those the provider has finished."""
    with ctx.session() as session:
        due = due_for_poll(session, utcnow())
    finished = []
    for batch in due:
        with ctx.lease(f"batch:{batch.id}") as mine:
            if not mine:
                continue
            try:
                if poll_batch(ctx, batch):
                    finished.append(batch.id)
            except SoftTimeLimitExceeded:
                raise
            except Exception as exc:  # one bad batch must not stall the rest
                log.exception("polling batch %s failed unexpectedly", batch.id)
                with ctx.session() as session:
                    update_batch(
                        session,
                        batch.id,
                        error=f"unexpected error while polling: {exc!r}",
                        next_poll_at=utcnow() + backoff(3),
                    )
                    session.commit()
    return finished


def poll_batch(ctx: WorkerContext, batch: Batch) -> bool:
    """Ask the provider about one batch; True when it has reached a terminal status."""
    assert batch.provider_batch_id is not None
    next_poll = utcnow() + timedelta(seconds=ctx.settings.poll_interval_seconds)
    try:
        job = ctx.provider(batch.provider).get_batch(batch.provider_batch_id)
    except ProviderError as exc:
        return _record_poll_failure(ctx, batch, exc, next_poll)
    with ctx.session() as session:
        if not job.status.is_terminal:
            update_batch(
                session,
                batch.id,
                provider_status=job.raw_status,
                poll_count=batch.poll_count + 1,
                not_found_polls=0,
                next_poll_at=next_poll,
            )
            session.commit()
            return False
        moved = transition(
            session,
            batch.id,
            BatchState.COLLECTING,
            expect=[BatchState.SUBMITTED],
            provider_status=job.raw_status,
            poll_count=batch.poll_count + 1,
            not_found_polls=0,
            outcome=job.status.value,
            output_file_id=job.output_file_id,
            error_file_id=job.error_file_id,
            error=job.error,
            next_poll_at=None,
        )
        session.commit()
    return moved


def _record_poll_failure(
    ctx: WorkerContext, batch: Batch, exc: ProviderError, next_poll: datetime
) -> bool:
    not_found = batch.not_found_polls + 1 if exc.status_code == 404 else 0
    with ctx.session() as session:
        if not_found >= _NOT_FOUND_POLLS_BEFORE_LOST:
            # The provider no longer knows the job: its results cannot be fetched, so the
            # collector sends its requests round again (outcome "lost" is retryable).
            transition(
                session,
                batch.id,
                BatchState.COLLECTING,
                expect=[BatchState.SUBMITTED],
                outcome="lost",
                not_found_polls=not_found,
                error=f"permanent error: {exc}",
                next_poll_at=None,
            )
        else:
            kind = "retryable" if exc.retryable else "permanent"
            if exc.retry_after:
                next_poll = max(next_poll, utcnow() + timedelta(seconds=exc.retry_after))
            update_batch(
                session,
                batch.id,
                not_found_polls=not_found,
                error=f"poll: {kind} error: {exc}",
                next_poll_at=next_poll,
            )
        session.commit()
    return not_found >= _NOT_FOUND_POLLS_BEFORE_LOST
