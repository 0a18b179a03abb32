"""Database access: the engine, and the few write operations the record allows."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from operator import itemgetter
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, bindparam, event, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.pool import ConnectionPoolEntry
from sqlmodel import Session, SQLModel, create_engine, select

from shared.models import BATCH_TRANSITIONS, Batch, BatchState, Request, RequestState, utcnow
from shared.settings import Settings


class IllegalTransition(RuntimeError):
    """A batch was asked to move between states the state machine does not connect."""


def make_engine(settings: Settings) -> Engine:
    """Create the engine and the tables (idempotent)."""
    url = settings.sqlalchemy_url
    if url.startswith("sqlite"):
        Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True)
    create_tables(engine)
    return engine


def create_tables(engine: Engine) -> None:
    """Create missing tables; tolerates another process creating them at the same moment."""
    try:
        SQLModel.metadata.create_all(engine)
    except (OperationalError, ProgrammingError, IntegrityError):
        SQLModel.metadata.create_all(engine)  # the other process won; now they all exist


def _sqlite_pragmas(dbapi_conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    # WAL lets the status CLI read while a worker writes; several worker processes share the file.
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def transition(
    session: Session,
    batch_id: str,
    to: BatchState,
    *,
    expect: Iterable[BatchState],
    **fields: Any,
) -> bool:
    """Move a batch from one of ``expect`` to ``to`` in one conditional UPDATE.

    Returns False when the batch is not in an expected state (someone else moved it first).
    """
    expected = list(expect)
    for state in expected:
        if to not in BATCH_TRANSITIONS[state]:
            raise IllegalTransition(f"batch state {state} cannot become {to}")
    result = session.execute(
        update(Batch)
        .where(Batch.id == batch_id)  # type: ignore[arg-type]
        .where(Batch.state.in_([s.value for s in expected]))  # type: ignore[attr-defined]
        .values(state=to.value, updated_at=utcnow(), **_clipped(fields))
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def update_batch(session: Session, batch_id: str, **fields: Any) -> None:
    """Change a batch's descriptive fields without changing its state."""
    session.execute(
        update(Batch)
        .where(Batch.id == batch_id)  # type: ignore[arg-type]
        .values(updated_at=utcnow(), **_clipped(fields))
    )


# Provider text ends up in these columns; a 502 page must not overflow them on PostgreSQL.
_CLIP = {"error": 4000, "provider_status": 64, "output_file_id": 128, "error_file_id": 128}


def _clipped(fields: dict[str, Any]) -> dict[str, Any]:
    return {
        key: value[: _CLIP[key]] if key in _CLIP and isinstance(value, str) else value
        for key, value in fields.items()
    }


def upsert_requests(session: Session, rows: Sequence[dict[str, Any]]) -> None:
    """Insert request rows, or point existing ones (a retried request) at their new batch."""
    if not rows:
        return
    dialect = session.get_bind().dialect
    insert = postgresql.insert if dialect.name == "postgresql" else sqlite.insert
    table = Request.__table__  # type: ignore[attr-defined]
    stmt = insert(table)
    stmt = stmt.on_conflict_do_update(
        index_elements=["id"],
        set_={
            "batch_id": stmt.excluded.batch_id,
            "state": stmt.excluded.state,
            "attempts": stmt.excluded.attempts,
        },
    )
    # Packing records up to 50,000 rows at once: compile the statement once and hand plain
    # values to the driver's executemany, skipping SQLAlchemy's per-row processing (which
    # tripled the time). Every value here is a str or int, which drivers take as they are, and
    # rows name every column that has a default, so none is left for SQLAlchemy to fill in.
    compiled = stmt.compile(dialect=dialect, column_keys=list(rows[0]))
    if compiled.positional:
        params: list[Any] = list(map(itemgetter(*(compiled.positiontup or [])), rows))
    else:
        params = list(rows)
    session.connection().exec_driver_sql(str(compiled), params)


def finish_requests(session: Session, batch_id: str, rows: Sequence[dict[str, Any]]) -> None:
    """Record outcomes of requests still batched in ``batch_id`` (others are left alone).

    Each row has id, state, error_code, error_message, prompt_tokens, completion_tokens and
    finished_at.
    """
    if not rows:
        return
    table = Request.__table__  # type: ignore[attr-defined]
    stmt = (
        update(table)
        .where(table.c.id == bindparam("rid"))
        .where(table.c.batch_id == batch_id)
        .where(table.c.state == RequestState.BATCHED.value)
        .values(
            state=bindparam("new_state"),
            error_code=bindparam("error_code"),
            error_message=bindparam("error_message"),
            prompt_tokens=bindparam("prompt_tokens"),
            completion_tokens=bindparam("completion_tokens"),
            finished_at=bindparam("finished_at"),
        )
    )
    params = [
        {
            "rid": r["id"],
            "new_state": r["state"],
            "error_code": r["error_code"],
            "error_message": r["error_message"],
            "prompt_tokens": r["prompt_tokens"],
            "completion_tokens": r["completion_tokens"],
            "finished_at": r["finished_at"],
        }
        for r in rows
    ]
    session.connection().execute(stmt, params)


def due_for_submit(session: Session, now: datetime, limit: int = 100) -> list[Batch]:
    """Packed or uploaded batches whose (re)try time has come, oldest first."""
    stmt = (
        select(Batch)
        .where(Batch.state.in_([BatchState.PACKED.value, BatchState.UPLOADED.value]))  # type: ignore[attr-defined]
        .where(Batch.next_poll_at <= now)  # type: ignore[operator]
        .order_by(Batch.next_poll_at)  # type: ignore[arg-type]
        .limit(limit)
    )
    return list(session.exec(stmt))


def due_for_poll(session: Session, now: datetime, limit: int = 100) -> list[Batch]:
    """Submitted batches whose next poll time has come."""
    stmt = (
        select(Batch)
        .where(Batch.state == BatchState.SUBMITTED.value)
        .where(Batch.next_poll_at <= now)  # type: ignore[operator]
        .order_by(Batch.next_poll_at)  # type: ignore[arg-type]
        .limit(limit)
    )
    return list(session.exec(stmt))


def poll_now(session: Session, provider_batch_id: str) -> None:
    """Make the submitted batch running as ``provider_batch_id`` due for a poll right away."""
    session.execute(
        update(Batch)
        .where(Batch.provider_batch_id == provider_batch_id)  # type: ignore[arg-type]
        .where(Batch.state == BatchState.SUBMITTED.value)  # type: ignore[arg-type]
        .values(next_poll_at=utcnow())
    )
