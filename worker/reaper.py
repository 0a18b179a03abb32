"""Returning abandoned claims to their buffers."""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from shared.models import Batch, BatchState, Request, RequestState
from shared.redis_layout import split_buffer_name, text
from worker.context import WorkerContext
from worker.packing import release_claim

log = logging.getLogger(__name__)


def reap_abandoned_claims(ctx: WorkerContext) -> int:
    """Unclaim every claim older than the claim timeout whose batch never got recorded.

    Returns how many requests went back to their buffers.
    """
    cutoff_ms = int((time.time() - ctx.settings.claim_timeout_seconds) * 1000)
    returned = 0
    stale: list[Any] = ctx.redis.zrangebyscore(ctx.keys.claims, "-inf", cutoff_ms)
    for raw in stale:
        batch_id = text(raw)
        claim: dict[bytes, bytes] = ctx.redis.hgetall(ctx.keys.claim(batch_id))  # type: ignore[assignment]
        buf = claim.get(b"buf", b"").decode()
        provider, model = split_buffer_name(buf) if buf else ("", "")
        tombstone = Batch(
            id=batch_id,
            provider=provider,
            model=model,
            state=BatchState.ABANDONED.value,
            request_count=int(claim.get(b"count", 0)),
            bytes=int(claim.get(b"bytes", 0)),
        )
        try:
            # The tombstone makes the SQL primary key decide who wins against a slow packer.
            with ctx.session() as session:
                session.add(tombstone)
                session.commit()
        except IntegrityError:
            with ctx.session() as session:
                existing = session.get(Batch, batch_id)
            if existing is None or existing.state != BatchState.ABANDONED:
                release_claim(ctx, batch_id)  # the packer committed; only its cleanup was lost
                continue
            # Our own tombstone from a reap that died before unclaiming: finish that reap.
        n = ctx.scripts.run(
            "unclaim",
            [
                ctx.keys.claim_ids(batch_id),
                ctx.keys.claim(batch_id),
                ctx.keys.claims,
                ctx.keys.buffers,
            ],
            [ctx.keys.base, batch_id],
        )
        log.warning("reaped abandoned claim %s: %d requests back to %s", batch_id, n, buf)
        returned += int(n)
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
