"""Submitting batches to their provider and polling them until the provider is done.

Creating a batch is the one call that is not idempotent (it costs money), so it is guarded
three ways: a per-batch lease, a conditional SQL transition, and reconciliation: before a
second create attempt, the provider's batch list is searched for one over our input file,
whose id is unique to this batch.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

from shared.db import batches_in, due_for_poll, transition, update_batch
from shared.models import Batch, BatchState, utcnow
from shared.providers.base import BatchProvider, ProviderBatch, ProviderError
from worker.context import WorkerContext

log = logging.getLogger(__name__)
_RETRY_BASE_SECONDS = 2.0
_RETRY_MAX_SECONDS = 300.0
_MAX_SUBMIT_ATTEMPTS = 10


def submit_ready_batches(ctx: WorkerContext) -> list[str]:
    """Upload and create every packed or uploaded batch whose time has come."""
    with ctx.session() as session:
        ready = batches_in(session, [BatchState.PACKED, BatchState.UPLOADED])
    now = utcnow()
    submitted = []
    for batch in ready:
        if batch.next_poll_at is not None and batch.next_poll_at > now:
            continue
        with ctx.lease(f"batch:{batch.id}", ctx.settings.task_time_limit_seconds) as mine:
            if mine and submit_batch(ctx, batch.id):
                submitted.append(batch.id)
    return submitted


def submit_batch(ctx: WorkerContext, batch_id: str) -> bool:
    """Take one batch as far as SUBMITTED; True once it is there."""
    with ctx.session() as session:
        batch = session.get(Batch, batch_id)
    if batch is None or batch.state not in (BatchState.PACKED, BatchState.UPLOADED):
        return False
    provider = ctx.provider(batch.provider)
    try:
        if batch.state == BatchState.PACKED:
            file_id = provider.upload_file(Path(batch.file_path))
            with ctx.session() as session:
                transition(
                    session,
                    batch_id,
                    BatchState.UPLOADED,
                    expect=[BatchState.PACKED],
                    provider_file_id=file_id,
                )
                session.commit()
            batch.provider_file_id = file_id
        job = _create_once(ctx, provider, batch)
    except ProviderError as exc:
        _record_submit_failure(ctx, batch, exc)
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
            next_poll_at=utcnow() + timedelta(seconds=ctx.settings.poll_interval_seconds),
            error=None,
        )
        session.commit()
    log.info("submitted batch %s as %s job %s", batch_id, batch.provider, job.id)
    return moved


def _create_once(ctx: WorkerContext, provider: BatchProvider, batch: Batch) -> ProviderBatch:
    assert batch.provider_file_id is not None
    if batch.submit_attempts > 0:
        for job in provider.list_batches():
            if job.input_file_id == batch.provider_file_id:
                log.info("batch %s was already created as %s; adopting it", batch.id, job.id)
                return job
    with ctx.session() as session:
        update_batch(session, batch.id, submit_attempts=batch.submit_attempts + 1)
        session.commit()
    return provider.create_batch(batch.provider_file_id, model=batch.model)


def _record_submit_failure(ctx: WorkerContext, batch: Batch, exc: ProviderError) -> None:
    attempts = batch.submit_attempts + 1
    with ctx.session() as session:
        if exc.retryable and attempts < _MAX_SUBMIT_ATTEMPTS:
            delay = exc.retry_after or min(_RETRY_BASE_SECONDS * 2**attempts, _RETRY_MAX_SECONDS)
            update_batch(
                session,
                batch.id,
                error=f"retryable error, retrying: {exc}",
                next_poll_at=utcnow() + timedelta(seconds=delay),
            )
            log.warning("submitting batch %s failed, retry in %.0fs: %s", batch.id, delay, exc)
        else:
            transition(
                session,
                batch.id,
                BatchState.FAILED,
                expect=[BatchState.PACKED, BatchState.UPLOADED],
                outcome="failed",
                error=f"{'out of attempts' if exc.retryable else 'permanent error'}: {exc}",
            )
            log.error("batch %s could not be submitted: %s", batch.id, exc)
        session.commit()


def poll_due_batches(ctx: WorkerContext) -> list[str]:
    """Poll submitted batches that are due; return those the provider has finished."""
    with ctx.session() as session:
        due = due_for_poll(session, utcnow())
    finished = []
    for batch in due:
        with ctx.lease(f"batch:{batch.id}", 60) as mine:
            if mine and poll_batch(ctx, batch):
                finished.append(batch.id)
    return finished


def poll_batch(ctx: WorkerContext, batch: Batch) -> bool:
    """Ask the provider about one batch; True when it has reached a terminal status."""
    assert batch.provider_batch_id is not None
    next_poll = utcnow() + timedelta(seconds=ctx.settings.poll_interval_seconds)
    try:
        job = ctx.provider(batch.provider).get_batch(batch.provider_batch_id)
    except ProviderError as exc:
        with ctx.session() as session:
            if exc.status_code == 404:
                # The provider no longer knows the job: its results cannot be fetched, so the
                # collector sends its requests round again (outcome "lost" is retryable).
                transition(
                    session,
                    batch.id,
                    BatchState.COLLECTING,
                    expect=[BatchState.SUBMITTED],
                    outcome="lost",
                    error=f"permanent error: {exc}",
                    next_poll_at=None,
                )
            else:
                kind = "retryable" if exc.retryable else "permanent"
                update_batch(
                    session, batch.id, error=f"poll: {kind} error: {exc}", next_poll_at=next_poll
                )
            session.commit()
        return exc.status_code == 404
    with ctx.session() as session:
        if not job.status.is_terminal:
            update_batch(
                session,
                batch.id,
                provider_status=job.raw_status,
                poll_count=batch.poll_count + 1,
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
            outcome=job.status.value,
            output_file_id=job.output_file_id,
            error_file_id=job.error_file_id,
            error=job.error,
            next_poll_at=None,
        )
        session.commit()
    return moved
