"""What the SQL record says for ``status`` and ``batches list|show``: batches, outcomes, webhooks.

A batch's *status* is what it amounts to, which its SQL state alone does not say: a batch the
provider failed ends in state ``finished`` with outcome ``failed``, and shows as ``failed``.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import ColumnElement, and_, false, func, or_
from sqlalchemy import select as sql_select
from sqlmodel import Session, col, select

from shared.models import TERMINAL_REQUEST_STATES, Batch, BatchState, Request, WebhookDelivery

_PACKED, _UPLOADED = BatchState.PACKED.value, BatchState.UPLOADED.value
_FAILED, _FINISHED = BatchState.FAILED.value, BatchState.FINISHED.value
ACTIVE_STATES = (_PACKED, _UPLOADED, BatchState.SUBMITTED.value, BatchState.COLLECTING.value)
# Outcomes of an ended batch (state failed or finished) that are not plain failures.
_ENDED_OUTCOMES = {
    "cancelled": "cancelled",
    "unsent": "requeued",  # never sent; its requests went round again
    "requeued": "requeued",  # cancelled with --requeue
    "expired": "expired",
    "lost": "lost",
    "no_output": "no_output",
}
BATCH_STATUSES = (
    "packed",
    "uploaded",
    "held",
    "submitted",
    "collecting",
    "finished",
    "failed",
    *sorted(set(_ENDED_OUTCOMES.values())),
    "abandoned",
)
OUTCOME_WINDOWS = {"last_hour": 3600, "last_day": 86_400}
WEBHOOK_STATES = ("pending", "delivered", "dead")


def batch_status(state: str, outcome: str | None, held: bool) -> str:
    """What a batch amounts to: its state, ``held``, or how it ended (never a failed finish)."""
    if state in (_PACKED, _UPLOADED):
        return "held" if held else state
    if state not in (_FAILED, _FINISHED):
        return state
    if state == _FINISHED and outcome in (None, "completed"):
        return "finished"
    return _ENDED_OUTCOMES.get(outcome or "", "failed")


def status_condition(status: str) -> ColumnElement[bool]:
    """The SQL condition that selects the batches :func:`batch_status` calls ``status``."""
    state, outcome, held = col(Batch.state), col(Batch.outcome), col(Batch.held_since)
    ended = state.in_([_FAILED, _FINISHED])
    finished = and_(state == _FINISHED, or_(outcome.is_(None), outcome == "completed"))
    if status == "held":
        return and_(state.in_([_PACKED, _UPLOADED]), held.is_not(None))
    if status in (_PACKED, _UPLOADED):
        return and_(state == status, held.is_(None))
    if status == "finished":
        return finished
    if status == "failed":
        special = list(_ENDED_OUTCOMES)
        return and_(ended, ~finished, or_(outcome.is_(None), outcome.not_in(special)))
    if status in _ENDED_OUTCOMES.values():
        outcomes = [o for o, s in _ENDED_OUTCOMES.items() if s == status]
        return and_(ended, outcome.in_(outcomes))
    if status in BATCH_STATUSES:
        return state == status
    return false()


def aware(moment: datetime | None) -> datetime | None:
    """``moment`` in UTC (SQLite hands back naive datetimes)."""
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _iso(moment: datetime | None) -> str | None:
    shown = aware(moment)
    return shown.isoformat() if shown else None


def _since(moment: datetime | None, now: datetime) -> float | None:
    shown = aware(moment)
    return round((now - shown).total_seconds(), 1) if shown else None


def progress(session: Session, batch_ids: list[str]) -> dict[str, dict[str, int]]:
    """Requests per SQL state for each of ``batch_ids`` (live progress of unfinished ones)."""
    found: dict[str, dict[str, int]] = defaultdict(dict)
    for start in range(0, len(batch_ids), 500):
        rows = session.exec(
            select(Request.batch_id, Request.state, func.count())
            .where(col(Request.batch_id).in_(batch_ids[start : start + 500]))
            .group_by(col(Request.batch_id), col(Request.state))
        )
        for batch_id, state, n in rows:
            found[batch_id][state] = int(n)
    return found


def batch_summary(
    batch: Batch, now: datetime, live: dict[str, int] | None = None
) -> dict[str, Any]:
    """One batch as ``batches list`` and ``status`` show it (``live``: its request states)."""
    if live is not None and batch.state in ACTIVE_STATES:
        done = {k: live.get(k, 0) for k in ("completed", "failed", "requeued")}
    else:
        done = {
            "completed": batch.completed_count,
            "failed": batch.failed_count,
            "requeued": batch.requeued_count,
        }
    return {
        "batch": batch.id,
        "provider": batch.provider,
        "model": batch.model,
        "state": batch.state,
        "status": batch_status(batch.state, batch.outcome, batch.held_since is not None),
        "outcome": batch.outcome,
        "requests": batch.request_count,
        **done,
        "age_seconds": _since(batch.created_at, now),
        "created_at": _iso(batch.created_at),
        "finished_at": _iso(batch.finished_at),
        "ended_seconds_ago": _since(batch.finished_at, now),
        "provider_batch_id": batch.provider_batch_id,
        "provider_status": batch.provider_status,
        "held_since": _iso(batch.held_since),
        "held_seconds": _since(batch.held_since, now),
        "cancel_requested_at": _iso(batch.cancel_requested_at),
        "error": batch.error,
    }


def batch_groups(session: Session, now: datetime) -> list[dict[str, Any]]:
    """Batches per (provider, state, status) with request progress and ages."""
    held = col(Batch.held_since).is_not(None)
    # More columns than sqlmodel's select() is typed for: SQLAlchemy's, through execute().
    rows = session.execute(
        sql_select(
            col(Batch.provider),
            col(Batch.state),
            col(Batch.outcome),
            held,
            func.count(),
            func.sum(Batch.request_count),
            func.sum(Batch.completed_count),
            func.sum(Batch.failed_count),
            func.sum(Batch.requeued_count),
            func.min(Batch.created_at),
            func.max(func.coalesce(Batch.finished_at, col(Batch.updated_at))),
        ).group_by(col(Batch.provider), col(Batch.state), col(Batch.outcome), held)
    )
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for provider, state, outcome, is_held, n, reqs, ok, bad, again, oldest, last in rows:
        status = batch_status(state, outcome, bool(is_held))
        group = groups.setdefault(
            (provider, state, status),
            {
                "provider": provider,
                "state": state,
                "status": status,
                "count": 0,
                "requests": 0,
                "completed": 0,
                "failed": 0,
                "requeued": 0,
                "oldest_age_seconds": None,
                "last_ended_seconds_ago": None,
            },
        )
        group["count"] += int(n)
        group["requests"] += int(reqs or 0)
        for key, value in (("completed", ok), ("failed", bad), ("requeued", again)):
            group[key] += int(value or 0)
        age = _since(oldest, now)
        if age is not None and (group["oldest_age_seconds"] or 0) < age:
            group["oldest_age_seconds"] = age
        if state not in ACTIVE_STATES:
            ago = _since(last, now)
            earlier = group["last_ended_seconds_ago"]
            if ago is not None and (earlier is None or ago < earlier):
                group["last_ended_seconds_ago"] = ago
    _add_live_progress(session, groups)
    return sorted(groups.values(), key=lambda g: (g["provider"], _order(g["status"]), g["state"]))


def _add_live_progress(
    session: Session, groups: dict[tuple[str, str, str], dict[str, Any]]
) -> None:
    # Unfinished batches record their counts only when they end: count their request rows.
    active = list(
        session.exec(
            select(Batch.id, Batch.provider, Batch.state, Batch.held_since).where(
                col(Batch.state).in_(ACTIVE_STATES)
            )
        )
    )
    live = progress(session, [row[0] for row in active])
    for batch_id, provider, state, held_since in active:
        group = groups.get((provider, state, batch_status(state, None, held_since is not None)))
        if group is None:  # it moved on between the two queries
            continue
        for key in ("completed", "failed", "requeued"):
            group[key] += live.get(batch_id, {}).get(key, 0)


def _order(status: str) -> int:
    return BATCH_STATUSES.index(status) if status in BATCH_STATUSES else len(BATCH_STATUSES)


def list_batches(
    session: Session,
    now: datetime,
    status: str | None = None,
    limit: int = 20,
    oldest: bool = False,
) -> list[dict[str, Any]]:
    """Batch summaries, newest first (``oldest``: oldest first), of one status if given."""
    query = select(Batch)
    if status is not None:
        query = query.where(status_condition(status))
    order = col(Batch.created_at).asc() if oldest else col(Batch.created_at).desc()
    batches = list(session.exec(query.order_by(order, col(Batch.id)).limit(limit)))
    live = progress(session, [b.id for b in batches if b.state in ACTIVE_STATES])
    return [batch_summary(b, now, live.get(b.id, {})) for b in batches]


def active_batches(session: Session, now: datetime, limit: int = 20) -> list[dict[str, Any]]:
    """The oldest unfinished batches, with live progress."""
    query = select(Batch).where(col(Batch.state).in_(ACTIVE_STATES))
    batches = list(session.exec(query.order_by(col(Batch.created_at), col(Batch.id)).limit(limit)))
    live = progress(session, [b.id for b in batches])
    return [batch_summary(b, now, live.get(b.id, {})) for b in batches]


def count_batches(session: Session, status: str) -> int:
    """How many batches have ``status``."""
    return int(
        session.exec(select(func.count()).select_from(Batch).where(status_condition(status))).one()
    )


def failed_batches(session: Session, now: datetime, limit: int = 10) -> list[dict[str, Any]]:
    """The most recently ended failed batches, with their reasons."""
    ended = func.coalesce(Batch.finished_at, Batch.updated_at)
    batches = session.exec(
        select(Batch).where(status_condition("failed")).order_by(ended.desc()).limit(limit)
    )
    return [batch_summary(b, now) for b in batches]


def errored_batches(session: Session, now: datetime, limit: int = 10) -> list[dict[str, Any]]:
    """Unfinished batches carrying an error (retrying, held, failed awaiting collection)."""
    batches = session.exec(
        select(Batch)
        .where(col(Batch.error).is_not(None))
        .where(Batch.state != _FINISHED)
        .order_by(col(Batch.updated_at).desc())
        .limit(limit)
    )
    return [batch_summary(b, now) for b in batches]


def request_outcomes(session: Session, now: datetime) -> dict[str, dict[str, int]]:
    """Requests that ended completed, failed or cancelled in the last hour and the last day."""
    terminal = sorted(s.value for s in TERMINAL_REQUEST_STATES)
    windows = {}
    for name, seconds in OUTCOME_WINDOWS.items():
        counts = dict.fromkeys(terminal, 0)
        rows = session.exec(
            select(Request.state, func.count())
            .where(col(Request.state).in_(terminal))
            .where(col(Request.finished_at) >= now - timedelta(seconds=seconds))
            .group_by(col(Request.state))
        )
        counts.update({state: int(n) for state, n in rows})
        windows[name] = counts
    return windows


def webhook_counts(session: Session) -> dict[str, int]:
    """Webhook deliveries per state: pending, delivered, dead (dead letters)."""
    counts = dict.fromkeys(WEBHOOK_STATES, 0)
    rows = session.exec(
        select(WebhookDelivery.state, func.count()).group_by(col(WebhookDelivery.state))
    )
    counts.update({state: int(n) for state, n in rows})
    return counts


def batch_details(session: Session, batch_id: str, now: datetime) -> dict[str, Any] | None:
    """Everything the record has on one batch, for ``batches show``; None if unknown."""
    batch = session.get(Batch, batch_id)
    if batch is None:
        return None
    requests = progress(session, [batch_id]).get(batch_id, {})
    details = batch_summary(batch, now, requests)
    fields = batch.model_dump(mode="json")
    for name in fields:
        moment = getattr(batch, name)
        if isinstance(moment, datetime):  # SQLite's are naive: say they are UTC
            fields[name] = _iso(moment)
    details["record"] = fields
    details["requests_by_state"] = dict(sorted(requests.items()))
    try:
        details["extra_jobs"] = orjson.loads(batch.extra_jobs) if batch.extra_jobs else []
    except orjson.JSONDecodeError:
        details["extra_jobs"] = batch.extra_jobs
    return details
