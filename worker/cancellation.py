"""Cancellation on the worker side, and recording outcomes that no batch records.

A request cancelled while batched carries a mark (``cx``) in Redis; whatever ends its batch
ends it ``cancelled``: a result line (discarded), a failure, or a requeue. The scripts apply
the mark atomically; this module records what they report in SQL. A request cancelled in its
buffer is finished by ``cancel.lua`` alone and queued in ``{p}:torecord``, which
:func:`record_unbatched` drains into SQL so its result outlives Redis too.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from shared.db import finish_requests, insert_over_requeued, sql_text
from shared.models import RequestState
from shared.redis_layout import text
from shared.schemas import ErrorInfo, Result
from worker.context import WorkerContext

log = logging.getLogger(__name__)
# Said in every result of a request cancelled after it was sent: it may still cost money.
CANCELLED_IN_BATCH = (
    "cancelled by the producer after it was sent in a batch; its answer was discarded, and "
    "the provider may still bill it"
)
_RECORD_CHUNK = 500


def cancelled_result(
    request_id: str,
    *,
    batch_id: str,
    attempts: int,
    metadata: Any = None,
    usage: dict[str, Any] | None = None,
) -> Result:
    """The Result delivered for a request cancelled while batched."""
    return Result(
        request_id=request_id,
        status="cancelled",
        error=ErrorInfo(code="cancelled", message=CANCELLED_IN_BATCH),
        usage=usage,
        batch_id=batch_id,
        attempts=attempts,
        metadata=metadata,
    )


def cancelled_pairs(reply: list[Any]) -> dict[str, str]:
    """``{id: result JSON}`` from the (id, result) pairs after a script's first reply value."""
    return {text(reply[i]): text(reply[i + 1]) for i in range(1, len(reply) - 1, 2)}


def requeue_or_cancel(
    ctx: WorkerContext, batch_id: str, ids: list[str], *, counts: bool, recorded: bool = True
) -> tuple[int, dict[str, str]]:
    """Send requests of ``batch_id`` round again; those marked cancelled end cancelled.

    Returns (how many were requeued, {id: result JSON} of those cancelled instead). When
    ``recorded`` (the batch has SQL rows for them) the cancelled ones are recorded here;
    otherwise they are queued for :func:`record_unbatched`.
    """
    args = [ctx.keys.base, batch_id, "1" if counts else "0", ctx.settings.result_ttl_seconds]
    reply = ctx.scripts.run("requeue", [ctx.keys.buffers], [*args, *ids])
    cancelled = cancelled_pairs(reply)
    if cancelled:
        if recorded:
            record_cancelled(ctx, batch_id, cancelled)
        else:
            ctx.redis.rpush(ctx.keys.to_record, *cancelled)
    return int(reply[0]), cancelled


def cancelled_row(request_id: str, result: str, now: datetime) -> dict[str, Any]:
    """A ``finish_requests`` row for a request that ended cancelled with ``result``."""
    return {
        "id": request_id,
        "state": RequestState.CANCELLED.value,
        "error_code": "cancelled",
        "error_message": CANCELLED_IN_BATCH,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "finished_at": now,
        "result": result,
    }


def record_cancelled(ctx: WorkerContext, batch_id: str, cancelled: dict[str, str]) -> None:
    """Record requests of ``batch_id`` that a script ended cancelled."""
    now = ctx.now()
    rows = [cancelled_row(request_id, result, now) for request_id, result in cancelled.items()]
    with ctx.session() as session:
        finish_requests(session, batch_id, rows)
        session.commit()


def record_unbatched(ctx: WorkerContext, limit: int = 10_000) -> int:
    """Record in SQL the requests finished outside any batch; how many were recorded.

    Safe to repeat and to run in several processes: rows are upserted (a requeued row
    becomes cancelled, a finished one is left alone) before their ids leave the list.
    """
    recorded = 0
    while recorded < limit:
        ids = [text(i) for i in ctx.redis.lrange(ctx.keys.to_record, 0, _RECORD_CHUNK - 1)]
        if not ids:
            break
        pipe = ctx.redis.pipeline(transaction=False)
        for request_id in ids:
            pipe.hmget(ctx.keys.request(request_id), ["outcome", "result", "cbq", "wh"])
        rows = []
        now = ctx.now()
        for request_id, (outcome, result, cbq, wh) in zip(ids, pipe.execute(), strict=True):
            if outcome is None or result is None:
                continue  # expired before it was recorded: nothing left to keep
            parsed = Result.from_json(result)
            rows.append(
                {
                    "id": request_id,
                    "batch_id": "",
                    "state": text(outcome),
                    "attempts": parsed.attempts,
                    "callback_queue": text(cbq) if cbq else "",
                    "webhook_url": text(wh) if wh else "",
                    "error_code": parsed.error.code if parsed.error else None,
                    "error_message": sql_text(parsed.error.message) if parsed.error else None,
                    "prompt_tokens": 0,
                    "completion_tokens": 0,
                    "finished_at": now,
                    "result": sql_text(text(result)),
                }
            )
        with ctx.session() as session:
            _upsert_unbatched(session, rows)
            session.commit()
        ctx.redis.ltrim(ctx.keys.to_record, len(ids), -1)
        recorded += len(rows)
    return recorded


def _upsert_unbatched(session: Any, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    # Only a request waiting in its buffer again (requeued) can have been cancelled there.
    columns = ("state", "error_code", "error_message", "finished_at", "result")
    session.execute(insert_over_requeued(session, columns), rows)
