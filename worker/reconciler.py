"""Repairing, from the SQL record, what a Redis that lost writes leaves behind.

A Redis can come back without its last writes: the AOF tail an OS crash cut off under
``appendfsync everysec`` (about a second), a failover to a lagging replica, a restore from a
backup, or a wipe (noticed through the epoch, ``worker/redis_checks.py``). Every step
changes Redis with one atomic script and SQL with one conditional statement, so a lost
write always leaves Redis at an earlier consistent point than SQL. What can then disagree,
and what this module does about it:

a. a request the record finished (``result`` holds the JSON it was delivered with) whose
   Redis hash is gone, or still batched or pending: ``restore_done.lua`` finishes it again
   and XADDs its result once. The hash write and the XADD of a finish are one script, one
   AOF entry: they were lost together, so restoring both delivers exactly once.
b. a request the record requeued that Redis still has batched under its finished batch: it
   goes back to its buffer (``requeue.lua``); if its body is gone too it cannot run again
   and fails with ``redis_data_lost`` (record first, then Redis, so a crash in between is
   finished by (a) next time).
c. a committed batch whose claim Redis forgot: its requests are pending in their buffer
   again and would be packed, and billed, a second time. ``reclaim_batch.lua`` takes them
   back; a packed or uploaded batch some of whose requests another batch holds by now is
   given back unsent (``worker.batch_ownership``: never create a batch whose
   requests it no longer owns). The claim's intact mark (``{p}:intact:{batch}``) spares that
   check for a batch no request has left since its claim.
d. a request batched under a batch no claim and no committed row knows (a lost claim
   list): back to its buffer, like the reaper does for stale claims (``worker/orphans.py``).

Everything is idempotent and bounded: the periodic pass looks at batches changed within
``RECENT`` of now; the pass at worker start-up at those changed within ``RECENT`` of the
record's last activity (the moment of a crash); a replaced Redis gets a pass over every
batch whose results could still be in Redis.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, update
from sqlmodel import select

from shared.models import Batch, BatchState, Request, RequestState, WebhookDelivery
from shared.redis_layout import request_fields, text
from shared.schemas import ErrorInfo, Result
from worker.batch_ownership import give_back, request_rows, take_back
from worker.cancellation import requeue_or_cancel
from worker.context import WorkerContext

log = logging.getLogger(__name__)
RECENT = timedelta(minutes=15)
DATA_LOST = "redis_data_lost"
_FINAL = (RequestState.COMPLETED.value, RequestState.FAILED.value, RequestState.CANCELLED.value)
# Batches holding a claim on their requests until collected. (A collecting batch's requests
# legitimately move on as they are requeued; what Redis lost there, (a) finds once finished.)
_HOLDING = (BatchState.PACKED.value, BatchState.UPLOADED.value, BatchState.SUBMITTED.value)


@dataclass
class ReconcileReport:
    """What one pass repaired."""

    restored: int = 0  # outcomes re-applied from the record (a)
    requeued: int = 0  # requests sent back to their buffer (b)
    lost: int = 0  # requests failed with redis_data_lost (b)
    reclaimed: int = 0  # requests taken back from a buffer by their committed batch (c)
    given_back: list[str] = field(default_factory=list)  # batches that lost requests (c)
    orphans: int = 0  # requests of an unknown batch back to their buffer (d)

    @property
    def repairs(self) -> int:
        """How many things were put right."""
        return (
            self.restored
            + self.requeued
            + self.lost
            + self.reclaimed
            + len(self.given_back)
            + self.orphans
        )


def reconcile(
    ctx: WorkerContext, *, since: datetime, scan_orphans: bool = False
) -> ReconcileReport:
    """One repair pass over the batches changed since ``since`` (see the module docstring)."""
    report = ReconcileReport()
    with ctx.session() as session:
        finished = list(
            session.exec(
                select(Batch)
                .where(Batch.state == BatchState.FINISHED.value)
                .where(Batch.finished_at >= since)  # type: ignore[operator]
            )
        )
        unfinished = list(
            session.exec(
                select(Batch.id)
                .where(Batch.state.in_(_HOLDING))  # type: ignore[attr-defined]
                .where(Batch.created_at >= since)
            )
        )
    for batch in finished:
        with ctx.lease(f"batch:{batch.id}") as mine:
            if mine:
                _repair_finished(ctx, batch, report)
    for batch_id in unfinished:
        with ctx.lease(f"batch:{batch_id}") as mine:
            if mine:
                _repair_unfinished(ctx, batch_id, report)
    if scan_orphans:
        from worker.orphans import return_orphans

        report.orphans += return_orphans(ctx)
    if report.repairs:
        log.error("reconciler repaired what Redis lost: %s", report)
    return report


def repair_batch(ctx: WorkerContext, batch_id: str) -> ReconcileReport:
    """Repair one batch at once (the packer found its requests offered again), leased."""
    report = ReconcileReport()
    with ctx.session() as session:
        batch = session.get(Batch, batch_id)
    if batch is None:
        return report
    with ctx.lease(f"batch:{batch_id}") as mine:
        if not mine:
            return report  # whoever holds it is working on it; the periodic pass follows up
        if batch.state == BatchState.FINISHED:
            _repair_finished(ctx, batch, report)
        else:
            _repair_unfinished(ctx, batch_id, report)
    return report


def last_activity(ctx: WorkerContext) -> datetime | None:
    """When the record last changed a batch (before a crash: about when it happened)."""
    with ctx.session() as session:
        latest: datetime | None = session.exec(select(func.max(Batch.updated_at))).one()
    return None if latest is None else _aware(latest)


# (a) and (b): finished batches.


def _repair_finished(ctx: WorkerContext, batch: Batch, report: ReconcileReport) -> None:
    for rows in request_rows(ctx, batch.id):
        states = _redis_states(ctx, [r[0] for r in rows])
        restore, requeue, lost, hashless = [], [], [], []
        bufs: dict[str, str] = {}
        for (request_id, state, _cbq), (r_state, r_batch, buf) in zip(rows, states, strict=True):
            if r_state is None:
                hashless.append(request_id)
            mine = r_state == "batched" and r_batch == batch.id
            if state in _FINAL and (r_state is None or mine or r_state == "pending"):
                restore.append(request_id)
            elif state == RequestState.REQUEUED and mine:
                requeue.append(request_id)
                bufs[request_id] = buf or ""
            elif state == RequestState.REQUEUED and r_state is None:
                lost.append(request_id)
        if requeue:
            # Without its body a request cannot run again.
            bodies = _bodies_exist(ctx, bufs)
            lost += [request_id for request_id in requeue if not bodies[request_id]]
            requeue = [request_id for request_id in requeue if bodies[request_id]]
        if hashless:
            # A finished request's hash also vanishes when its result TTL runs out: only one
            # that should still be there was lost (else every pass would deliver it again).
            expired = _expired(ctx, hashless)
            restore = [request_id for request_id in restore if request_id not in expired]
        if restore:
            report.restored += _restore_done(ctx, batch.id, restore)
        if requeue:
            report.requeued += _requeue(ctx, batch, requeue)
        if lost:
            report.lost += _fail_lost(ctx, batch, lost)


def _expired(ctx: WorkerContext, ids: list[str]) -> set[str]:
    """Those of ``ids`` whose result's time to live in Redis has run out since they finished."""
    cutoff = ctx.now() - timedelta(seconds=ctx.settings.result_ttl_seconds)
    with ctx.session() as session:
        rows = session.exec(
            select(Request.id, Request.finished_at).where(Request.id.in_(ids))  # type: ignore[attr-defined]
        )
        return {
            request_id
            for request_id, finished_at in rows
            if finished_at is not None and _aware(finished_at) <= cutoff
        }


def _aware(moment: datetime) -> datetime:
    # SQLite hands datetimes back without their zone; they were written in UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _restore_done(ctx: WorkerContext, batch_id: str, ids: list[str]) -> int:
    with ctx.session() as session:
        rows = list(
            session.exec(
                select(Request).where(Request.id.in_(ids))  # type: ignore[attr-defined]
            )
        )
    webhooks = _undelivered_webhooks(ctx, rows)
    args: list[Any] = [ctx.keys.base, ctx.settings.result_ttl_seconds, batch_id]
    for row in rows:
        if row.batch_id != batch_id or row.state not in _FINAL:
            continue  # moved on since we looked
        result = row.result or _result_from_row(row)
        args += [row.id, row.state, result, row.callback_queue, webhooks.get(row.id, "")]
    if len(args) == 3:
        return 0
    done = ctx.scripts.run("restore_done", [ctx.keys.buffers], args)
    if done:
        log.error(
            "batch %s: %d outcomes Redis had lost restored from the record", batch_id, len(done)
        )
    return len(done)


def _undelivered_webhooks(ctx: WorkerContext, rows: list[Request]) -> dict[str, str]:
    """Webhook URLs of ``rows`` whose delivery the record does not have (lost with Redis)."""
    wanted = {row.id: row.webhook_url for row in rows if row.webhook_url}
    if not wanted:
        return {}
    with ctx.session() as session:
        known = set(
            session.exec(
                select(WebhookDelivery.request_id).where(
                    WebhookDelivery.request_id.in_(list(wanted))  # type: ignore[attr-defined]
                )
            )
        )
    return {request_id: url for request_id, url in wanted.items() if request_id not in known}


def _result_from_row(row: Request) -> str:
    # A row finished before results were recorded: rebuild what the record knows.
    error = (
        ErrorInfo(code=row.error_code, message=row.error_message or "") if row.error_code else None
    )
    usage = None
    if row.prompt_tokens or row.completion_tokens:
        usage = {
            "prompt_tokens": row.prompt_tokens,
            "completion_tokens": row.completion_tokens,
            "total_tokens": row.prompt_tokens + row.completion_tokens,
        }
    result = Result(
        request_id=row.id,
        status=row.state,  # type: ignore[arg-type]
        error=error,
        usage=usage,
        batch_id=row.batch_id,
        attempts=row.attempts,
    )
    return result.to_json().decode()


def _requeue(ctx: WorkerContext, batch: Batch, ids: list[str]) -> int:
    counts = batch.outcome != "unsent"
    moved, _ = requeue_or_cancel(ctx, batch.id, ids, counts=counts)
    if moved:
        log.error("batch %s: %d requeues Redis had lost done again", batch.id, moved)
    return moved


def _fail_lost(ctx: WorkerContext, batch: Batch, ids: list[str]) -> int:
    """Requests the record requeued but whose Redis data is gone: fail them, record first."""
    message = (
        f"Redis lost this request's data after batch {batch.id} sent it round again; it "
        "cannot be retried"
    )
    failed = []
    with ctx.session() as session:
        attempts = dict(
            session.exec(
                select(Request.id, Request.attempts).where(Request.id.in_(ids))  # type: ignore[attr-defined]
            ).all()
        )
        now = ctx.now()
        for request_id in ids:
            result = Result(
                request_id=request_id,
                status="failed",
                error=ErrorInfo(code=DATA_LOST, message=message),
                batch_id=batch.id,
                attempts=attempts.get(request_id, 0),
            )
            moved = session.execute(
                update(Request)
                .where(Request.id == request_id)  # type: ignore[arg-type]
                .where(Request.batch_id == batch.id)  # type: ignore[arg-type]
                .where(Request.state == RequestState.REQUEUED.value)  # type: ignore[arg-type]
                .values(
                    state=RequestState.FAILED.value,
                    error_code=DATA_LOST,
                    error_message=message,
                    finished_at=now,
                    result=result.to_json().decode(),
                )
            )
            if moved.rowcount:  # type: ignore[attr-defined]
                failed.append(request_id)
        session.commit()
    if failed:
        log.error(
            "batch %s: %d requests lost from Redis failed with %s", batch.id, len(failed), DATA_LOST
        )
        _restore_done(ctx, batch.id, failed)
    return len(failed)


# (c): committed batches that are not finished.


def _repair_unfinished(ctx: WorkerContext, batch_id: str, report: ReconcileReport) -> None:
    with ctx.session() as session:
        batch = session.get(Batch, batch_id)
    if batch is None or batch.state not in _HOLDING:
        return
    ownership, reclaimed = take_back(ctx, batch)
    report.reclaimed += reclaimed
    if not ownership.intact and give_back(ctx, batch, ownership):
        report.given_back.append(batch.id)


# Helpers.


def _bodies_exist(ctx: WorkerContext, bufs: dict[str, str]) -> dict[str, bool]:
    """Whether each request (id -> its buffer) still has its body."""
    pipe = ctx.redis.pipeline(transaction=False)
    for request_id, buf in bufs.items():
        pipe.hexists(ctx.keys.bodies(buf), request_id)
    return dict(zip(bufs, (bool(v) for v in pipe.execute()), strict=True))


def _redis_states(ctx: WorkerContext, ids: Sequence[str]) -> list[tuple[str | None, ...]]:
    """(state, batch, buf) of each request's hash; all None for a hash that is gone."""
    replies = request_fields(ctx.scripts, ctx.keys.base, ids, ("state", "batch", "buf"))
    return [tuple(text(v) if v is not None else None for v in reply) for reply in replies]
