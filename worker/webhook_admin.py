"""Dead-lettered webhooks: list them, send them again, re-enable an endpoint that said 410.

A replay rebuilds the outbox entry from the SQL record, so it sends the very bytes (and the
same ``webhook-id``) the failed attempts sent; only the timestamp and signatures are new.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlmodel import col, delete, select

from shared.models import WebhookDelivery, WebhookEndpoint
from worker.context import WorkerContext
from worker.webhook_signing import event_body

_DATA = b'"data":'


@dataclass(frozen=True)
class OutboxEntry:
    """What the outbox hash of one delivery holds, rebuilt from its recorded body."""

    request_id: str
    url: str
    outcome: str
    result: bytes
    at_ms: int


def outbox_entry(row: WebhookDelivery) -> OutboxEntry:
    """Rebuild a delivery's outbox entry from its record; ValueError if the body disagrees."""
    body = row.body.encode()
    head, _, rest = body.partition(_DATA)
    stamp = head.split(b'"timestamp":"', 1)[1].split(b'"', 1)[0].decode()
    moment = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    at_ms = int(moment.timestamp() * 1000 + 0.5)
    outcome = row.event_type.removeprefix("request.")
    entry = OutboxEntry(row.request_id, row.url, outcome, rest[:-1], at_ms)
    if event_body(entry.outcome, entry.at_ms, entry.result) != body:
        raise ValueError(f"webhook {row.id}: the recorded body cannot be rebuilt exactly")
    return entry


def failed_deliveries(ctx: WorkerContext, limit: int = 100) -> list[WebhookDelivery]:
    """The dead-lettered deliveries, newest first."""
    with ctx.session() as session:
        return list(
            session.exec(
                select(WebhookDelivery)
                .where(WebhookDelivery.state == "dead")
                .order_by(col(WebhookDelivery.finished_at).desc())
                .limit(limit)
            )
        )


def replay(ctx: WorkerContext, ids: Sequence[str] | None) -> list[str]:
    """Queue dead deliveries (``ids``, or every one when None) to be sent again, now.

    Their endpoints are re-enabled too (someone asking for a replay wants them reached).
    Returns the ids queued; ids that are unknown or not dead are skipped.
    """
    with ctx.session() as session:
        query = select(WebhookDelivery).where(WebhookDelivery.state == "dead")
        if ids is not None:
            wanted = [i if i.startswith("msg_") else f"msg_{i}" for i in ids]
            query = query.where(col(WebhookDelivery.id).in_(wanted))
        rows = list(session.exec(query))
        urls = {row.url for row in rows}
        if urls:
            session.exec(delete(WebhookEndpoint).where(col(WebhookEndpoint.url).in_(urls)))
        for row in rows:
            row.state = "pending"
            row.attempts = 0
            row.finished_at = None
            row.next_attempt_at = ctx.now()
            session.add(row)
        # SQL first: if Redis is not reached, the reaper's restore_lost_deliveries queues them.
        session.commit()
    for row in rows:
        queue(ctx, outbox_entry(row), attempts=0)
    return [row.id for row in rows]


def enable_endpoint(ctx: WorkerContext, url: str) -> bool:
    """Let deliveries reach ``url`` again after it answered 410; False if it was not disabled."""
    with ctx.session() as session:
        row = session.get(WebhookEndpoint, url)
        if row is None:
            return False
        session.delete(row)
        session.commit()
    return True


def queue(ctx: WorkerContext, entry: OutboxEntry, attempts: int, due_ms: int | None = None) -> None:
    """Put one delivery in the outbox, due at ``due_ms`` (default: now)."""
    keys = ctx.keys
    pipe = ctx.redis.pipeline(transaction=True)
    pipe.hset(
        keys.webhook(entry.request_id),
        mapping={
            "url": entry.url,
            "type": entry.outcome,
            "result": entry.result,
            "at": entry.at_ms,
            "attempts": attempts,
        },
    )
    pipe.zadd(keys.webhook_queue, {entry.request_id: due_ms or 0})
    pipe.execute()


def restore_lost_deliveries(ctx: WorkerContext, grace_seconds: float = 300.0) -> int:
    """Re-queue pending deliveries the record has but Redis lost (its data went missing).

    Only deliveries overdue by ``grace_seconds`` are looked at, so one merely in flight (its
    outbox entry briefly gone while a sender settles it) is never queued twice.
    """
    cutoff = ctx.now() - timedelta(seconds=grace_seconds)
    with ctx.session() as session:
        rows = list(
            session.exec(
                select(WebhookDelivery)
                .where(WebhookDelivery.state == "pending")
                .where(col(WebhookDelivery.next_attempt_at) < cutoff)
                .limit(1000)
            )
        )
    missing = [row for row in rows if not ctx.redis.exists(ctx.keys.webhook(row.request_id))]
    if not missing:
        return 0
    # Read again after Redis was: a sender records a delivery's end in SQL before it drops
    # the Redis hash, so one settled meanwhile (its hash gone for that reason) now reads as
    # delivered or dead, not pending, and is not sent a second time.
    with ctx.session() as session:
        still_pending = set(
            session.exec(
                select(WebhookDelivery.id)
                .where(col(WebhookDelivery.id).in_([row.id for row in missing]))
                .where(WebhookDelivery.state == "pending")
                .where(col(WebhookDelivery.next_attempt_at) < cutoff)
            )
        )
    restored = 0
    for row in missing:
        if row.id in still_pending:
            queue(ctx, outbox_entry(row), attempts=row.attempts)
            restored += 1
    return restored
