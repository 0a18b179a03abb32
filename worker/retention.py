"""SQL retention: finished requests, batches and webhook deliveries older than the setting go.

Rows are deleted in chunks of ids, each chunk its own short transaction, so pruning a large
backlog never holds a long lock and a crash half-way keeps what was done. Every DELETE
repeats its SELECT's conditions, so a row that changed in between is left alone.

Requests go first, deliveries next, batches last. A crash between steps then leaves
deliveries without their request, or batches without their requests (both pruned by the
next pass), never a finished request without its delivery: the reconciler would take that
for a webhook a replaced Redis lost, and send it again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Connection, Table, and_, delete, exists, func, or_, select

from shared.models import (
    TERMINAL_REQUEST_STATES,
    Batch,
    BatchState,
    Request,
    WebhookAttempt,
    WebhookDelivery,
    utcnow,
)
from worker.context import WorkerContext

log = logging.getLogger(__name__)

CHUNK = 1000
# The states a delivery leaves no more (see WebhookDelivery.state).
FINAL_DELIVERY_STATES = ("delivered", "dead")
_TERMINAL_REQUESTS = sorted(state.value for state in TERMINAL_REQUEST_STATES)


@dataclass(frozen=True, slots=True)
class PruneReport:
    """How many rows one prune deleted, per table."""

    requests: int = 0
    webhook_deliveries: int = 0
    webhook_attempts: int = 0
    batches: int = 0

    @property
    def total(self) -> int:
        """Every row deleted."""
        return self.requests + self.webhook_deliveries + self.webhook_attempts + self.batches


def retention_cutoff(retention_days: float, now: datetime | None = None) -> datetime | None:
    """Rows finished before this are pruned; None when ``retention_days`` is 0 (keep all)."""
    if retention_days < 0:
        raise ValueError(f"sql_retention_days must be >= 0 (got {retention_days})")
    if retention_days == 0:
        return None
    moment = utcnow() if now is None else now
    # Naive means UTC, the record's clock; SQLite compares the stored text, so convert.
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return moment - timedelta(days=retention_days)


def prune_old_records(
    ctx: WorkerContext, *, now: datetime | None = None, chunk_size: int = CHUNK
) -> PruneReport:
    """Delete records finished longer than ``sql_retention_days`` ago; counts per table.

    Never touches an unfinished request or batch, whatever its age.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (got {chunk_size})")
    cutoff = retention_cutoff(ctx.settings.sql_retention_days, now)
    if cutoff is None:
        return PruneReport()
    requests, _ = _prune(ctx, _REQUESTS, _old_requests(cutoff), chunk_size)
    deliveries, attempts = _prune(
        ctx, _DELIVERIES, _old_deliveries(cutoff), chunk_size, then=_delete_attempts
    )
    batches, _ = _prune(ctx, _BATCHES, _old_batches(cutoff), chunk_size)
    report = PruneReport(requests, deliveries, attempts, batches)
    if report.total:
        log.info(
            "pruned records finished before %s: %d requests, %d batches, %d webhook deliveries "
            "(%d attempts)",
            cutoff.isoformat(timespec="seconds"),
            requests,
            batches,
            deliveries,
            attempts,
        )
    return report


def _table(model: Any) -> Table:
    table: Table = model.__table__
    return table


_REQUESTS = _table(Request)
_BATCHES = _table(Batch)
_DELIVERIES = _table(WebhookDelivery)
_ATTEMPTS = _table(WebhookAttempt)


def _old_requests(cutoff: datetime) -> ColumnElement[bool]:
    r, d = _REQUESTS.c, _DELIVERIES.c
    # A delivery still under way keeps its request: the outcome has not reached its receiver.
    delivery_pending = exists().where(d.request_id == r.id, d.state.not_in(FINAL_DELIVERY_STATES))
    return and_(r.state.in_(_TERMINAL_REQUESTS), r.finished_at < cutoff, ~delivery_pending)


def _old_deliveries(cutoff: datetime) -> ColumnElement[bool]:
    d = _DELIVERIES.c
    return and_(d.state.in_(FINAL_DELIVERY_STATES), d.finished_at < cutoff)


def _old_batches(cutoff: datetime) -> ColumnElement[bool]:
    b = _BATCHES.c
    finished = and_(b.state == BatchState.FINISHED.value, b.finished_at < cutoff)
    # An abandoned batch may never have been given a finished_at.
    abandoned = and_(
        b.state == BatchState.ABANDONED.value,
        func.coalesce(b.finished_at, b.updated_at) < cutoff,
    )
    has_requests = exists().where(_REQUESTS.c.batch_id == b.id)
    return and_(or_(finished, abandoned), ~has_requests)


def _prune(
    ctx: WorkerContext,
    table: Table,
    old: ColumnElement[bool],
    chunk_size: int,
    then: Callable[[Connection, list[str]], int] | None = None,
) -> tuple[int, int]:
    """Delete ``table``'s rows matching ``old``, ``chunk_size`` ids per transaction.

    ``then(conn, deleted_ids)`` runs in each chunk's transaction (to delete dependent rows).
    Returns (rows deleted, what ``then`` returned, summed).
    """
    key = table.c[_primary_key(table)]
    deleted = dependents = 0
    while True:
        with ctx.engine.connect() as conn:
            ids = [row[0] for row in conn.execute(select(key).where(old).limit(chunk_size))]
        if not ids:
            break
        with ctx.engine.begin() as conn:
            # RETURNING: exactly the rows this statement deleted, should one have changed
            # since the SELECT (SQLite >= 3.35 and PostgreSQL both have it).
            gone = list(
                conn.execute(delete(table).where(key.in_(ids), old).returning(key)).scalars()
            )
            if then is not None and gone:
                dependents += then(conn, gone)
        deleted += len(gone)
        if len(ids) < chunk_size or not gone:
            break  # the last chunk (or nothing deletable any more: never spin)
    return deleted, dependents


def _delete_attempts(conn: Connection, delivery_ids: list[str]) -> int:
    result = conn.execute(delete(_ATTEMPTS).where(_ATTEMPTS.c.delivery_id.in_(delivery_ids)))
    return int(result.rowcount)


def _primary_key(table: Table) -> str:
    (column,) = table.primary_key.columns
    return str(column.name)
