"""What ``batchbridge status`` reports: pending buffers from Redis, batches from SQL."""

from __future__ import annotations

import time
from typing import Any

from redis import Redis
from rich.console import Console
from rich.table import Table
from sqlalchemy import func
from sqlmodel import Session, select

from shared.db import make_engine
from shared.embedded_redis import resolve_redis_url
from shared.models import Batch, BatchState
from shared.redis_layout import Keys, split_buffer_name, text
from shared.settings import Settings


def collect_status(settings: Settings) -> dict[str, Any]:
    """Pending requests per buffer and batch counts per state."""
    keys = Keys(settings.key_prefix)
    client = Redis.from_url(resolve_redis_url(settings))
    now_ms = time.time() * 1000
    pending = []
    try:
        buffers: dict[Any, Any] = client.hgetall(keys.buffers)
        for raw_buf, raw_bytes in sorted(buffers.items()):
            buf = text(raw_buf)
            count = int(client.zcard(keys.pending(buf)))
            if not count:
                continue
            first: Any = client.zrange(keys.pending(buf), 0, 0)
            enq: Any = client.hget(keys.request(text(first[0])), "enq") if first else None
            provider, model = split_buffer_name(buf)
            pending.append(
                {
                    "provider": provider,
                    "model": model,
                    "count": count,
                    "bytes": int(raw_bytes),
                    "oldest_age_seconds": round((now_ms - int(enq or now_ms)) / 1000, 1),
                }
            )
        claims = int(client.zcard(keys.claims))
    finally:
        client.close()
    engine = make_engine(settings)
    try:
        with Session(engine) as session:
            rows = session.exec(
                select(Batch.provider, Batch.state, func.count()).group_by(
                    Batch.provider, Batch.state
                )
            )
            batches = [{"provider": p, "state": s, "count": n} for p, s, n in rows]
            troubled = session.exec(
                select(Batch)
                .where(Batch.error.is_not(None))  # type: ignore[union-attr]
                .where(Batch.state != BatchState.FINISHED.value)
                .order_by(Batch.updated_at.desc())  # type: ignore[attr-defined]
                .limit(10)
            )
            errors = [
                {
                    "batch": b.id,
                    "state": b.state,
                    "provider": b.provider,
                    "held_since": b.held_since.isoformat() if b.held_since else None,
                    "error": b.error,
                }
                for b in troubled
            ]
            held = session.exec(
                select(func.count())
                .select_from(Batch)
                .where(Batch.held_since.is_not(None))  # type: ignore[union-attr]
                .where(Batch.state.in_([BatchState.PACKED.value, BatchState.UPLOADED.value]))  # type: ignore[attr-defined]
            ).one()
    finally:
        engine.dispose()
    return {
        "pending": pending,
        "uncommitted_claims": claims,
        "batches": batches,
        "batches_with_errors": errors,
        "held_batches": int(held),
    }


def render_status(console: Console, report: dict[str, Any]) -> None:
    """Print the status report as tables."""
    pending = Table(title="Pending requests")
    for column in ("provider", "model", "count", "bytes", "oldest (s)"):
        pending.add_column(column, justify="right" if column != "model" else "left")
    for row in report["pending"]:
        pending.add_row(
            row["provider"],
            row["model"],
            str(row["count"]),
            str(row["bytes"]),
            str(row["oldest_age_seconds"]),
        )
    console.print(pending if report["pending"] else "No pending requests.")
    batches = Table(title="Batches")
    for column in ("provider", "state", "count"):
        batches.add_column(column)
    for row in report["batches"]:
        batches.add_row(row["provider"], row["state"], str(row["count"]))
    console.print(batches if report["batches"] else "No batches yet.")
    if report.get("held_batches"):
        console.print(
            f"[red]{report['held_batches']} batch(es) on hold[/red]: the provider refuses them "
            "or retries ran out; their requests are kept (see the errors below; "
            "`batchbridge batches fail BATCH_ID` gives up on one)"
        )
    if report["batches_with_errors"]:
        troubled = Table(title="Unfinished batches with errors (newest first)")
        for column in ("batch", "state", "provider", "error"):
            troubled.add_column(column, overflow="fold")
        for row in report["batches_with_errors"]:
            state = f"{row['state']} (held)" if row.get("held_since") else row["state"]
            troubled.add_row(row["batch"], state, row["provider"], row["error"][:200])
        console.print(troubled)
    if report["uncommitted_claims"]:
        console.print(f"{report['uncommitted_claims']} claim(s) being packed")
