"""Polling submitted batches until the provider is done, without re-running a job on a hunch.

Three things a poll can be wrong about are checked before anything costs money:

- a job the provider answers 404 for is only taken as lost after ``LOST_JOB_GRACE_SECONDS`` of
  404s (polled with a growing interval), once the batch list confirms it is gone and its input
  file is still there (if the file is gone too, the key or project probably changed: the grace
  is four times as long). The old job is cancelled before its requests go round again;
- a job that says COMPLETED but names no output or error file is polled again for
  ``MISSING_OUTPUT_GRACE_SECONDS`` (files can lag the status) before its requests go round;
- after an ambiguous create, a second job over the same input file may turn up late: while the
  batch's duplicate watch lasts, each poll looks for one, cancels it and records it.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlmodel import select

from shared.db import take_due_for_poll, transition, update_batch
from shared.models import Batch, BatchState, utcnow
from shared.providers.base import BatchProvider, ProviderBatch, ProviderBatchStatus, ProviderError
from worker.backoff import backoff
from worker.batch_cancel import cancelled_outcome
from worker.batch_loop import each_batch, hand_back, take_hold
from worker.context import WorkerContext
from worker.lifecycle import unowned_jobs

log = logging.getLogger(__name__)
# Polls of a job answering 404 back off up to this interval.
_NOT_FOUND_POLL_CEILING = timedelta(minutes=5)
# With the input file gone too, wait this many times the grace (likely a key/project change).
_ACCOUNT_CHANGE_FACTOR = 4


def poll_due_batches(ctx: WorkerContext) -> list[str]:
    """Poll submitted batches that are due; return those the provider has finished."""
    with ctx.session() as session:
        due = take_due_for_poll(session, ctx.now(), take_hold(ctx))
    finished = each_batch(
        ctx,
        due,
        lambda batch: batch.id,
        lambda batch: poll_batch(ctx, batch),
        lambda batch, exc: _record_unexpected(ctx, batch, exc),
        doing="polling",
        passed_by=lambda batch: hand_back(ctx, batch),
    )
    watch_for_duplicates(ctx)
    return finished


def _record_unexpected(ctx: WorkerContext, batch: Batch, exc: Exception) -> None:
    with ctx.session() as session:
        update_batch(
            session,
            batch.id,
            error=f"unexpected error while polling: {exc!r}",
            next_poll_at=ctx.now() + backoff(3),
        )
        session.commit()


def poll_batch(ctx: WorkerContext, batch: Batch) -> bool:
    """Ask the provider about one batch; True when it has reached a terminal status."""
    assert batch.provider_batch_id is not None
    now = ctx.now()
    next_poll = now + timedelta(seconds=ctx.settings.poll_interval_seconds)
    provider = ctx.provider(batch.provider)
    try:
        job = provider.get_batch(batch.provider_batch_id)
    except ProviderError as exc:
        if exc.status_code != 404:
            return _record_poll_failure(ctx, batch, exc, next_poll)
        listed = _not_found(ctx, provider, batch, exc)
        if not isinstance(listed, ProviderBatch):
            return listed
        job = listed  # retrieve keeps failing, but the list knows the job: go by that
    if batch.duplicate_check_until is not None and now < batch.duplicate_check_until:
        cancel_duplicates(ctx, provider, batch)
    if batch.cancel_requested_at is not None and not job.status.is_terminal:
        # The operator cancelled the batch: ask on every poll until the job is final, and
        # look again soon rather than after a full poll interval.
        next_poll = now + timedelta(seconds=min(ctx.settings.poll_interval_seconds, 5.0))
        if job.status is not ProviderBatchStatus.CANCELLING:
            try:
                job = provider.cancel_batch(batch.provider_batch_id)
            except ProviderError as exc:
                return _record_poll_failure(ctx, batch, exc, next_poll)
    fields: dict[str, Any] = {
        "provider_status": job.raw_status,
        "poll_count": batch.poll_count + 1,
        "not_found_polls": 0,
        "not_found_since": None,
    }
    if job.status is ProviderBatchStatus.COMPLETED and not (
        job.output_file_id or job.error_file_id
    ):
        since = batch.no_output_since or now
        grace = timedelta(seconds=ctx.settings.missing_output_grace_seconds)
        if now - since < grace:
            with ctx.session() as session:
                update_batch(
                    session,
                    batch.id,
                    no_output_since=since,
                    error=f"the provider says COMPLETED but names no output file; polling "
                    f"again until {(since + grace).isoformat(timespec='seconds')}",
                    next_poll_at=next_poll,
                    **fields,
                )
                session.commit()
            if batch.no_output_since is None:
                log.warning("batch %s: COMPLETED without output files; waiting", batch.id)
            return False
        return _to_collecting(
            ctx,
            batch,
            outcome="no_output",
            error=f"the provider said COMPLETED but gave no output file for {grace}",
            **fields,
        )
    if not job.status.is_terminal:
        with ctx.session() as session:
            update_batch(session, batch.id, next_poll_at=next_poll, **fields)
            session.commit()
        return False
    return _to_collecting(
        ctx,
        batch,
        outcome=cancelled_outcome(batch, job.status.value),
        output_file_id=job.output_file_id,
        error_file_id=job.error_file_id,
        error=job.error,
        **fields,
    )


def _to_collecting(ctx: WorkerContext, batch: Batch, **fields: Any) -> bool:
    with ctx.session() as session:
        moved = transition(
            session,
            batch.id,
            BatchState.COLLECTING,
            expect=[BatchState.SUBMITTED],
            **fields,
        )
        session.commit()
    return moved


def _not_found(
    ctx: WorkerContext, provider: BatchProvider, batch: Batch, exc: ProviderError
) -> bool | ProviderBatch:
    """A 404 on poll: back off and confirm for a long while before calling the job lost.

    Returns whether the batch moved on to collection, or the job as the batch list shows it.
    """
    assert batch.provider_batch_id is not None
    now = ctx.now()
    since = batch.not_found_since or now
    polls = batch.not_found_polls + 1
    interval = timedelta(seconds=ctx.settings.poll_interval_seconds)
    next_poll = now + min(max(interval, backoff(polls, floor=0)), _NOT_FOUND_POLL_CEILING)
    grace = timedelta(seconds=ctx.settings.lost_job_grace_seconds)
    waited = now - since

    def keep_polling(reason: str) -> bool:
        with ctx.session() as session:
            update_batch(
                session,
                batch.id,
                not_found_polls=polls,
                not_found_since=since,
                error=f"poll: {reason}",
                next_poll_at=next_poll,
            )
            session.commit()
        return False

    if waited < grace:
        return keep_polling(f"the provider answers 404 ({waited} so far); confirming: {exc}")
    try:
        listed = [job for job in provider.list_batches() if job.id == batch.provider_batch_id]
        file_there = bool(batch.provider_file_id) and provider.file_exists(
            batch.provider_file_id or ""
        )
    except ProviderError as confirm_error:
        return keep_polling(f"404 on retrieve; could not confirm: {confirm_error}")
    if listed:
        log.warning("batch %s: 404 on retrieve, but the batch list has the job", batch.id)
        return listed[0]
    if not file_there and waited < grace * _ACCOUNT_CHANGE_FACTOR:
        if batch.error is None or "its input file" not in batch.error:
            log.error(
                "batch %s: neither job %s nor its input file is known to %s: was the API key "
                "or project changed? Its requests wait.",
                batch.id,
                batch.provider_batch_id,
                batch.provider,
            )
        return keep_polling(
            "neither the job nor its input file is known to the provider (API key or project "
            "changed?); waiting before sending its requests round again"
        )
    # Gone for good, as far as anyone can tell: make sure it cannot run (and bill) later.
    try:
        answer = provider.cancel_batch(batch.provider_batch_id)
    except ProviderError as cancel_error:
        if cancel_error.status_code != 404:
            return keep_polling(f"job lost; cancelling it first failed: {cancel_error}")
    else:
        if answer.status.is_terminal and answer.status is not ProviderBatchStatus.CANCELLED:
            # The provider knows the job after all (and it has finished): go by what it says.
            log.warning("batch %s: job %s answers its cancel: %s", batch.id, answer.id, answer)
            return answer
    log.error(
        "batch %s: job %s is lost; its requests go round again", batch.id, batch.provider_batch_id
    )
    return _to_collecting(
        ctx,
        batch,
        outcome="lost",
        not_found_polls=polls,
        not_found_since=since,
        error=f"the provider lost job {batch.provider_batch_id} (404 for {waited}): {exc}",
    )


def _record_poll_failure(
    ctx: WorkerContext, batch: Batch, exc: ProviderError, next_poll: datetime
) -> bool:
    kind = "retryable" if exc.retryable else "permanent"
    error = f"poll: {kind} error: {exc}"
    if exc.retry_after:
        next_poll = max(next_poll, ctx.now() + backoff(0, exc.retry_after))
    with ctx.session() as session:
        update_batch(
            session,
            batch.id,
            not_found_polls=0,
            not_found_since=None,
            error=error,
            next_poll_at=next_poll,
        )
        session.commit()
    # The job exists and may be paid for, so it is polled on; say so once per kind of error.
    if not exc.retryable and (batch.error or "")[:60] != error[:60]:
        log.error("batch %s: %s", batch.id, error)
    return False


def watch_for_duplicates(ctx: WorkerContext) -> int:
    """Look for late duplicate jobs of batches no longer polled but still being watched."""
    now = ctx.now()
    with ctx.session() as session:
        watched = list(
            session.exec(
                select(Batch)
                .where(Batch.duplicate_check_until > now)  # type: ignore[operator]
                .where(Batch.state != BatchState.SUBMITTED.value)
                .limit(100)
            )
        )
    found = 0
    for batch in watched:
        # At most one look per poll interval per batch, whichever worker takes it.
        marker = ctx.keys.lock(f"dupwatch:{batch.id}")
        interval_ms = int(ctx.settings.poll_interval_seconds * 1000)
        if not ctx.redis.set(marker, b"1", nx=True, px=interval_ms):
            continue
        try:
            found += cancel_duplicates(ctx, ctx.provider(batch.provider), batch)
        except ProviderError as exc:
            log.warning("batch %s: could not look for duplicate jobs: %s", batch.id, exc)
    return found


def cancel_duplicates(ctx: WorkerContext, provider: BatchProvider, batch: Batch) -> int:
    """Cancel provider jobs over this batch's input file other than its own; record them."""
    try:
        extras = unowned_jobs(ctx, provider, batch, exclude=batch.provider_batch_id)
    except ProviderError as exc:
        log.warning("batch %s: could not look for duplicate jobs: %s", batch.id, exc)
        return 0
    recorded: list[dict[str, Any]] = orjson.loads(batch.extra_jobs) if batch.extra_jobs else []
    done = {entry["id"] for entry in recorded if entry.get("final")}
    changed = 0
    for job in extras:
        if job.id in done:
            continue
        recorded = [entry for entry in recorded if entry["id"] != job.id]
        recorded.append(_cancel_duplicate(provider, batch, job))
        changed += 1
    if changed:
        batch.extra_jobs = orjson.dumps(recorded).decode()
        with ctx.session() as session:
            update_batch(session, batch.id, extra_jobs=batch.extra_jobs)
            session.commit()
    return changed


def _cancel_duplicate(provider: BatchProvider, batch: Batch, job: ProviderBatch) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": job.id,
        "seen_status": job.raw_status,
        "at": utcnow().isoformat(),
    }
    if job.status.is_terminal:
        # Too late to stop it: it ran (and may be billed). Say so loudly, once.
        entry.update(action="none: already finished", final=True)
        log.error(
            "batch %s: a second provider job %s over the same input file already %s",
            batch.id,
            job.id,
            job.raw_status,
        )
        return entry
    try:
        after = provider.cancel_batch(job.id)
        entry.update(action="cancelled", status=after.raw_status, final=True)
        log.error(
            "batch %s: cancelled duplicate provider job %s (kept %s)",
            batch.id,
            job.id,
            batch.provider_batch_id,
        )
    except ProviderError as exc:
        entry.update(action=f"cancel failed, will retry: {exc}", final=False)
        log.error("batch %s: could not cancel duplicate job %s: %s", batch.id, job.id, exc)
    return entry
