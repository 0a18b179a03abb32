"""The reaper: abandoned claims back to their buffers, outcomes into the record, old rows out."""

from __future__ import annotations

import logging
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import bindparam, update
from sqlmodel import select

from shared.db import sql_text
from shared.models import Request, RequestState
from shared.redis_layout import server_time_ms, text
from shared.schemas import Result
from worker.cancellation import record_unbatched
from worker.claims import abandon_claim
from worker.context import WorkerContext
from worker.leftovers import remove_leftovers
from worker.retention import prune_old_records
from worker.webhook_admin import restore_lost_deliveries

log = logging.getLogger(__name__)


def reaper_pass(ctx: WorkerContext) -> int:
    """One pass of the reaper; returns how many requests went back to their buffers.

    Each step runs on its own, so one that fails (the database is down) skips no other.
    """
    returned = 0
    steps = (
        record_unbatched,
        reconcile_requeued_rows,
        reap_abandoned_claims,
        remove_leftovers,
        prune_old_records,
        restore_lost_deliveries,
    )
    for step in steps:
        try:
            n = step(ctx)
        except SoftTimeLimitExceeded:
            raise
        except Exception:
            log.exception("reaper step %s failed; retried on the next pass", step.__name__)
            continue
        if step is reap_abandoned_claims and isinstance(n, int):
            returned = n
    return returned


def reap_abandoned_claims(ctx: WorkerContext) -> int:
    """Unclaim every claim older than the claim timeout whose batch never got recorded.

    Returns how many requests went back to their buffers.
    """
    # Claims are scored on the Redis server's clock (claim.lua): compare on it too.
    cutoff_ms = server_time_ms(ctx.redis) - int(ctx.settings.claim_timeout_seconds * 1000)
    returned = 0
    stale: list[Any] = ctx.redis.zrangebyscore(ctx.keys.claims, "-inf", cutoff_ms)
    for raw in stale:
        batch_id = text(raw)
        try:
            returned += abandon_claim(ctx, batch_id)
        except SoftTimeLimitExceeded:
            raise  # out of time: the next pass carries on
        except Exception:  # one claim that cannot be reaped must not keep the others out
            log.exception("reaping claim %s failed; retried on the next pass", batch_id)
    return returned


def reconcile_requeued_rows(ctx: WorkerContext, limit: int = 500) -> int:
    """Bring SQL rows of requeued requests that were then cancelled in line with Redis.

    A producer cancels in Redis only; the record learns of it here. Returns rows updated.
    """
    with ctx.session() as session:
        ids = list(
            session.exec(
                select(Request.id).where(Request.state == RequestState.REQUEUED.value).limit(limit)
            )
        )
    if not ids:
        return 0
    pipe = ctx.redis.pipeline(transaction=False)
    for request_id in ids:
        pipe.hmget(ctx.keys.request(request_id), ["state", "outcome", "result"])
    # The cancelled result is kept with the row, as collected results are, and the row is
    # finished as record_unbatched finishes one: its error is the cancel's (not the failure
    # it was requeued for), and finished_at is set, without which retention never prunes it
    # (nor, then, its batch).
    now = ctx.now()
    cancelled = []
    for request_id, (state, outcome, result) in zip(ids, pipe.execute(), strict=True):
        if state != b"done" or outcome != b"cancelled":
            continue
        error = Result.from_json(result).error if result else None
        cancelled.append(
            {
                "rid": request_id,
                "result": sql_text(result.decode()) if result else None,
                "error_message": sql_text(error.message) if error else None,
                "finished_at": now,
            }
        )
    if cancelled:
        table = Request.__table__  # type: ignore[attr-defined]
        with ctx.session() as session:
            session.connection().execute(
                update(table)
                .where(table.c.id == bindparam("rid"))
                .where(table.c.state == RequestState.REQUEUED.value)
                .values(
                    state=RequestState.CANCELLED.value,
                    error_code="cancelled",
                    error_message=bindparam("error_message"),
                    finished_at=bindparam("finished_at"),
                    result=bindparam("result"),
                ),
                cancelled,
            )
            session.commit()
    return len(cancelled)
