"""Returning abandoned claims to their buffers."""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import update
from sqlmodel import select

from shared.models import Request, RequestState
from shared.redis_layout import text
from worker.claims import abandon_claim
from worker.context import WorkerContext

log = logging.getLogger(__name__)


def reap_abandoned_claims(ctx: WorkerContext) -> int:
    """Unclaim every claim older than the claim timeout whose batch never got recorded.

    Returns how many requests went back to their buffers.
    """
    cutoff_ms = int((time.time() - ctx.settings.claim_timeout_seconds) * 1000)
    returned = 0
    stale: list[Any] = ctx.redis.zrangebyscore(ctx.keys.claims, "-inf", cutoff_ms)
    for raw in stale:
        returned += abandon_claim(ctx, text(raw))
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
        pipe.hmget(ctx.keys.request(request_id), ["state", "outcome"])
    cancelled = [
        request_id
        for request_id, (state, outcome) in zip(ids, pipe.execute(), strict=True)
        if state == b"done" and outcome == b"cancelled"
    ]
    if cancelled:
        with ctx.session() as session:
            session.execute(
                update(Request)
                .where(Request.id.in_(cancelled))  # type: ignore[attr-defined]
                .where(Request.state == RequestState.REQUEUED.value)  # type: ignore[arg-type]
                .values(state=RequestState.CANCELLED.value, error_code="cancelled")
            )
            session.commit()
    return len(cancelled)
