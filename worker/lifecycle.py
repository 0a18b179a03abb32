"""Submitting batches to their provider: upload, then one paid create, whatever fails.

Creating a batch is the one call that is not idempotent (it costs money), so it is guarded
four ways:

- a per-batch lease, so one worker at a time handles the batch;
- the right to create is a conditional SQL update, so two workers can never both create;
- a create whose outcome is unknown (a timeout, a lost connection, a 5xx: the job may exist
  all the same) keeps its in-flight mark; before any further create the provider's batch list
  is searched for a job over our input file, and a second create is only sent once the first
  could no longer be in flight;
- after such a retry, polls keep looking for a late job over the same file for a while; if one
  turns up, it is cancelled at the provider and recorded (see ``worker.polling``).

Requests the provider never ran are never failed by the submitter on its own: when the
provider refuses us (401/402/403) or retries run out, the batch is held, retried at the backoff
ceiling, and resumes when the provider answers again; failing it is the operator's call
(``batchbridge batches fail``). Each batch is handled on its own: an error with one batch is
recorded on it and retried with backoff, and never stops the others.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

from sqlalchemy import update
from sqlmodel import select

from shared.db import take_due_for_submit, transition, update_batch
from shared.models import Batch, BatchState
from shared.providers.base import BatchProvider, ProviderBatch, ProviderError
from worker.backoff import CEILING_SECONDS, backoff
from worker.batch_cancel import cancel_unsent
from worker.batch_files import batch_file
from worker.batch_loop import each_batch, hand_back, take_hold
from worker.batch_ownership import batch_still_owns_requests
from worker.context import WorkerContext

log = logging.getLogger(__name__)
# Retryable failures in a row before a batch is put on hold (it is retried all the same).
_MAX_SUBMIT_ATTEMPTS = 10
# Tolerated difference between the provider's clock and ours when matching a job to a batch.
CLOCK_SLACK = timedelta(minutes=5)
# Answers that mean the provider refuses this account: nothing ran, and retrying later may
# work once the operator fixes the key, the billing or the permissions.
_REFUSED = frozenset({401, 402, 403})


def in_flight_window(ctx: WorkerContext) -> timedelta:
    """How long a create may still be in flight (or its job still appear) after it was sent."""
    return timedelta(seconds=2 * ctx.settings.provider_timeout_seconds)


def duplicate_watch(ctx: WorkerContext) -> timedelta:
    """How long after an ambiguous create polls keep looking for a second, late job."""
    return timedelta(seconds=10 * ctx.settings.provider_timeout_seconds)


def is_definite_refusal(exc: ProviderError) -> bool:
    """True when a failed create certainly created nothing: the provider answered 4xx."""
    return exc.status_code is not None and 400 <= exc.status_code < 500


def submit_ready_batches(ctx: WorkerContext) -> list[str]:
    """Upload and create every packed or uploaded batch whose time has come."""
    with ctx.session() as session:
        ready = take_due_for_submit(session, ctx.now(), take_hold(ctx))
    return each_batch(
        ctx,
        ready,
        lambda batch: batch.id,
        lambda batch: submit_batch(ctx, batch.id),
        lambda batch, exc: _retry_later(ctx, batch, f"unexpected error while submitting: {exc!r}"),
        doing="submitting",
        passed_by=lambda batch: hand_back(ctx, batch),
    )


def submit_batch(ctx: WorkerContext, batch_id: str) -> bool:
    """Take one batch as far as SUBMITTED; True once it is there."""
    with ctx.session() as session:
        batch = session.get(Batch, batch_id)
    if batch is None or batch.state not in (BatchState.PACKED, BatchState.UPLOADED):
        return False
    if batch.cancel_requested_at is not None and batch.create_started_at is None:
        cancel_unsent(ctx, batch)  # no create can have made a job: nothing to send
        return False
    try:
        provider = ctx.provider(batch.provider)
    except ProviderError as exc:  # e.g. no API key configured: nothing was sent
        _hold(
            ctx, batch, f"provider {batch.provider!r} is not usable: {exc}", batch.submit_attempts
        )
        return False
    try:
        if batch.state == BatchState.PACKED:
            path = batch_file(ctx, batch)
            if isinstance(path, str):
                _give_back_unsent(ctx, batch, f"its batch file cannot be had: {path}")
                return False
            file_id = provider.upload_file(path)
            ctx.crash_point("after_upload")
            if path != Path(batch.file_path):
                path.unlink(missing_ok=True)  # a copy rebuilt here, only needed for the upload
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
    except _CreateFailed as failed:
        _record_submit_failure(ctx, batch, failed.error, ambiguous=failed.ambiguous)
        return False
    except ProviderError as exc:  # upload or list: no create was sent
        _record_submit_failure(ctx, batch, exc, attempts=batch.submit_attempts + 1)
        return False
    if job is None:
        return False
    ctx.crash_point("after_create")
    now = ctx.now()
    with ctx.session() as session:
        moved = transition(
            session,
            batch_id,
            BatchState.SUBMITTED,
            expect=[BatchState.UPLOADED],
            provider_batch_id=job.id,
            provider_status=job.raw_status,
            submitted_at=now,
            create_started_at=None,
            held_since=None,
            duplicate_check_until=now + duplicate_watch(ctx) if batch.ambiguous_creates else None,
            next_poll_at=now + timedelta(seconds=ctx.settings.poll_interval_seconds),
            error=None,
        )
        session.commit()
    if batch.held_since is not None:
        log.warning("batch %s: the provider answers again; submission resumed", batch_id)
    log.info("submitted batch %s as %s job %s", batch_id, batch.provider, job.id)
    return moved


class _CreateFailed(Exception):
    """The create call itself failed; ``ambiguous`` when a job may exist all the same."""

    def __init__(self, error: ProviderError, *, ambiguous: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.ambiguous = ambiguous


def _create_once(ctx: WorkerContext, provider: BatchProvider, batch: Batch) -> ProviderBatch | None:
    """Create the provider job, or adopt one an earlier attempt made; None to leave it be."""
    assert batch.provider_file_id is not None
    now = ctx.now()
    if batch.create_started_at is not None or batch.submit_attempts > 0:
        adopted = find_unowned_job(ctx, provider, batch)
        if adopted is not None:
            log.info("batch %s was already created as %s; adopting it", batch.id, adopted.id)
            return adopted
    if batch.create_started_at is not None:
        wait_until = batch.create_started_at + in_flight_window(ctx)
        if now < wait_until:
            # A create may still be in flight (ours timed out, or a worker died waiting for
            # it): a second one now could become a second paid job. Look again later.
            with ctx.session() as session:
                update_batch(session, batch.id, next_poll_at=wait_until)
                session.commit()
            return None
    if batch.cancel_requested_at is not None:
        # No job turned up for the create that may have happened: cancelled unsent.
        cancel_unsent(ctx, batch)
        return None
    if not batch_still_owns_requests(ctx, batch.id):
        # Redis lost this batch's claim and another batch holds some of its requests now: a
        # create would bill them twice. The batch was given back unsent instead.
        return None
    # An in-flight mark still set here means an earlier create's outcome was never recorded
    # (its worker was killed, ran out of time, or hit an unexpected error): it may have made
    # a job, so this create counts as a possible twin and the batch will watch for one.
    if batch.create_started_at is not None and not batch.ambiguous_creates:
        batch.ambiguous_creates = 1
    # The right to create is taken in SQL, so two workers can never both create.
    with ctx.session() as session:
        claimed = session.execute(
            update(Batch)
            .where(Batch.id == batch.id)  # type: ignore[arg-type]
            .where(Batch.state == BatchState.UPLOADED.value)  # type: ignore[arg-type]
            .where(Batch.submit_attempts == batch.submit_attempts)  # type: ignore[arg-type]
            .values(
                submit_attempts=batch.submit_attempts + 1,
                create_started_at=now,
                ambiguous_creates=batch.ambiguous_creates,
            )
        )
        session.commit()
    if not claimed.rowcount:  # type: ignore[attr-defined]
        return None
    batch.submit_attempts += 1
    batch.create_started_at = now
    try:
        return provider.create_batch(batch.provider_file_id, model=batch.model)
    except ProviderError as exc:
        raise _CreateFailed(exc, ambiguous=not is_definite_refusal(exc)) from exc


def find_unowned_job(
    ctx: WorkerContext, provider: BatchProvider, batch: Batch
) -> ProviderBatch | None:
    """The oldest provider job over this batch's input file that no batch has recorded."""
    jobs = unowned_jobs(ctx, provider, batch)
    return jobs[0] if jobs else None


def unowned_jobs(
    ctx: WorkerContext, provider: BatchProvider, batch: Batch, *, exclude: str | None = None
) -> list[ProviderBatch]:
    """Provider jobs over this batch's input file, newer than the batch, owned by no batch."""
    # A provider may hand back an existing file id for identical content, so the file id
    # alone could match an older batch's job: also require a job newer than this batch and
    # not already owned by another batch.
    candidates = [
        job
        for job in provider.list_batches()
        if job.input_file_id == batch.provider_file_id
        and job.id != exclude
        and (job.created_at is None or job.created_at >= batch.created_at - CLOCK_SLACK)
    ]
    if not candidates:
        return []
    with ctx.session() as session:
        owned = set(
            session.exec(
                select(Batch.provider_batch_id).where(
                    Batch.provider_batch_id.in_([j.id for j in candidates])  # type: ignore[union-attr]
                )
            )
        )
    free = [job for job in candidates if job.id not in owned]
    return sorted(free, key=lambda job: (job.created_at is None, job.created_at, job.id))


def _record_submit_failure(
    ctx: WorkerContext,
    batch: Batch,
    exc: ProviderError,
    *,
    attempts: int | None = None,
    ambiguous: bool = False,
) -> None:
    """Back off, hold, or (for a request the provider says is malformed) fail the batch."""
    attempts = batch.submit_attempts if attempts is None else attempts
    fields: dict[str, object] = {"submit_attempts": attempts}
    if ambiguous:
        # The job may exist: keep the in-flight mark so no second create goes out before the
        # provider's list has had its chance to show it.
        fields["ambiguous_creates"] = batch.ambiguous_creates + 1
        batch.ambiguous_creates += 1
    elif (
        batch.create_started_at is not None
        and attempts == batch.submit_attempts
        and not batch.ambiguous_creates
    ):
        # This very create was refused outright (4xx): nothing was created. Not so after an
        # ambiguous one, which may have made a job the list has not shown yet: the mark keeps
        # a cancel (or anything else) from taking the batch for one no job can exist for.
        fields["create_started_at"] = None
    if exc.status_code in _REFUSED or (exc.retryable and attempts >= _MAX_SUBMIT_ATTEMPTS):
        _hold(ctx, batch, str(exc), attempts, exc.retry_after, **fields)
        return
    if not exc.retryable and batch.ambiguous_creates:
        # An earlier create may have made a job that is running (and billed) right now:
        # failing the requests would throw its results away. Hold, and look for it again.
        _hold(ctx, batch, f"{exc} (after an ambiguous create)", attempts, None, **fields)
        return
    with ctx.session() as session:
        if exc.retryable:
            delay = backoff(attempts, exc.retry_after)
            update_batch(
                session,
                batch.id,
                error=f"retryable error, retrying: {exc}",
                next_poll_at=ctx.now() + delay,
                **fields,
            )
            log.warning("submitting batch %s failed, retry in %s: %s", batch.id, delay, exc)
        else:
            transition(
                session,
                batch.id,
                BatchState.FAILED,
                expect=[BatchState.PACKED, BatchState.UPLOADED],
                outcome="failed",
                error=f"permanent error: {exc}",
                **fields,
            )
            log.error("batch %s could not be submitted: %s", batch.id, exc)
        session.commit()


def _hold(
    ctx: WorkerContext,
    batch: Batch,
    reason: str,
    attempts: int,
    retry_after: float | None = None,
    **fields: object,
) -> None:
    # Nothing ran, so nothing is failed: try again at the backoff ceiling until the provider
    # answers, and say so once (not on every retry).
    now = ctx.now()
    with ctx.session() as session:
        update_batch(
            session,
            batch.id,
            held_since=batch.held_since or now,
            error=f"on hold (requests kept; `batchbridge batches fail {batch.id}` gives up): "
            f"{reason}",
            next_poll_at=now + backoff(attempts, retry_after, floor=CEILING_SECONDS / 10),
            **fields,
        )
        session.commit()
    if batch.held_since is None:
        log.error("batch %s is on hold, its requests kept: %s", batch.id, reason)


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
            error=reason,
        )
        session.commit()
    log.error("batch %s: %s", batch.id, reason)


def _retry_later(ctx: WorkerContext, batch: Batch, error: str) -> None:
    # Whether a create went out is unknown here, so the in-flight mark is left as it is.
    attempts = batch.submit_attempts + 1
    if attempts >= _MAX_SUBMIT_ATTEMPTS:
        _hold(ctx, batch, error, attempts, submit_attempts=attempts)
        return
    with ctx.session() as session:
        update_batch(
            session,
            batch.id,
            submit_attempts=attempts,
            error=error,
            next_poll_at=ctx.now() + backoff(attempts),
        )
        session.commit()


class NotFailable(ValueError):
    """An operator asked to fail a batch that is not (or no longer) safely unsent."""


def fail_unsent_batch(ctx: WorkerContext, batch_id: str, *, force: bool = False) -> Batch:
    """Fail a batch that was never submitted (an operator's choice); the collector reports it.

    A batch whose create may have reached the provider is refused unless ``force``: its job
    could be running (and billed), and failing it would throw the results away.
    """
    with ctx.lease(f"batch:{batch_id}") as mine:
        if not mine:
            raise NotFailable(f"batch {batch_id} is being worked on right now; try again")
        # Read under the lease, so no create can start (or end ambiguously) meanwhile.
        with ctx.session() as session:
            batch = session.get(Batch, batch_id)
        if batch is None:
            raise NotFailable(f"no batch {batch_id!r}")
        if batch.state not in (BatchState.PACKED, BatchState.UPLOADED):
            raise NotFailable(
                f"batch {batch_id} is {batch.state}: only a batch not yet submitted (packed "
                "or uploaded) can be failed"
            )
        if batch.submit_attempts and batch.state == BatchState.UPLOADED and not force:
            raise NotFailable(
                f"batch {batch_id} has had {batch.submit_attempts} create attempt(s), which may "
                "have created a provider job; check the provider and use --force to fail it "
                "anyway"
            )
        with ctx.session() as session:
            moved = transition(
                session,
                batch_id,
                BatchState.FAILED,
                expect=[BatchState(batch.state)],
                outcome="failed",
                error=f"failed by the operator; last error: {batch.error or 'none'}",
            )
            session.commit()
    if not moved:
        raise NotFailable(f"batch {batch_id} changed state meanwhile; look again")
    log.warning("batch %s failed by the operator", batch_id)
    with ctx.session() as session:
        failed = session.get(Batch, batch_id)
    assert failed is not None
    return failed
