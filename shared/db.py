"""Database access: the engine, and the few write operations the record allows."""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from operator import itemgetter
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    bindparam,
    event,
    inspect,
    literal_column,
    or_,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.sql.compiler import SQLCompiler
from sqlmodel import Session, SQLModel, create_engine, select

from shared.models import (
    Batch,
    BatchState,
    IllegalTransition,
    Request,
    RequestState,
    check_batch_transition,
    check_request_transition,
    utcnow,
)
from shared.settings import Settings

__all__ = ["IllegalTransition"]


def make_engine(settings: Settings) -> Engine:
    """Create the engine and bring the schema up to date (idempotent)."""
    from shared.migrations import upgrade

    url = settings.sqlalchemy_url
    if url.startswith("sqlite"):
        Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True)
    upgrade(engine)
    return engine


def add_missing_columns(connection: Connection) -> list[str]:
    """Add the columns a table made by ``create_all`` before migrations lacks; their names.

    Before migrations, each version added its new columns this way (all nullable or with a
    default); a database of that time is brought to the baseline revision with it, once.
    """
    added = []
    inspector = inspect(connection)
    for table in SQLModel.metadata.sorted_tables:
        if not inspector.has_table(table.name):
            continue
        present = {column["name"] for column in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            kind = column.type.compile(dialect=connection.dialect)
            default = _literal_default(column.default)
            connection.execute(
                text(f'ALTER TABLE "{table.name}" ADD COLUMN "{column.name}" {kind}{default}')
            )
            added.append(f"{table.name}.{column.name}")
    return added


def _literal_default(default: Any) -> str:
    value = getattr(default, "arg", None)
    if isinstance(value, bool):
        return f" DEFAULT {int(value)}"
    if isinstance(value, int | float):
        return f" DEFAULT {value}"
    return ""


def _sqlite_pragmas(dbapi_conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    # WAL lets the status CLI read while a worker writes; several worker processes share the file.
    cursor = dbapi_conn.cursor()
    # Only a new database file takes it (an existing one keeps its page size). Collecting
    # makes every request's row grow by its whole result; with 4 KB pages that splits pages
    # far more often than with 16 KB ones.
    cursor.execute("PRAGMA page_size=16384")
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
    Entering a state starts its clock afresh: unless ``next_poll_at`` is given, the batch is
    due at once for the new state's step (a deadline the old state had, such as a take's
    hold, means nothing there).
    """
    fields.setdefault("next_poll_at", None)
    expected = list(expect)
    for state in expected:
        check_batch_transition(state, to)
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
        key: _text(value)[: _CLIP.get(key, len(value))] if isinstance(value, str) else value
        for key, value in fields.items()
    }


def sql_text(value: str | None) -> str | None:
    """Text as every database stores it: PostgreSQL refuses NUL, which providers may echo."""
    return None if value is None else _text(value)


def _text(value: str) -> str:
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def insert_over_requeued(session: Any, columns: Sequence[str]) -> Any:
    """An upsert of request rows that updates ``columns`` only where a row is ``requeued``."""
    dialect = session.get_bind().dialect
    insert = postgresql.insert if dialect.name == "postgresql" else sqlite.insert
    table = Request.__table__  # type: ignore[attr-defined]
    stmt = insert(table)
    return stmt.on_conflict_do_update(
        index_elements=["id"],
        set_={name: stmt.excluded[name] for name in columns},
        # A literal, not a parameter: upsert_requests hands rows to the driver positionally.
        where=table.c.state == literal_column(f"'{RequestState.REQUEUED.value}'"),
    )


def upsert_requests(session: Session, rows: Sequence[dict[str, Any]]) -> int:
    """Insert request rows, or point requeued ones at their new batch; how many were written.

    A row that exists and is not ``requeued`` is left alone: its request is still held by
    another batch, or finished, and only a Redis that lost writes can offer it again. Moving
    it would let two batches bill one request; the caller compares the count with the rows.
    """
    if not rows:
        return 0
    dialect = session.get_bind().dialect
    stmt = insert_over_requeued(session, ("batch_id", "state", "attempts", "line"))
    # Packing records up to 50,000 rows at once: compile the statement once and hand plain
    # values to the driver's executemany, skipping SQLAlchemy's per-row processing (which
    # tripled the time). Every value here is a str or int, which drivers take as they are, and
    # rows name every column that has a default, so none is left for SQLAlchemy to fill in.
    compiled = stmt.compile(dialect=dialect, column_keys=list(rows[0]))
    return int(_execute_many(session, compiled, rows).rowcount)


def _execute_many(session: Session, compiled: SQLCompiler, rows: Sequence[dict[str, Any]]) -> Any:
    """Run a compiled statement once per row through the driver's executemany, as it is."""
    if compiled.positional:
        pick = itemgetter(*(compiled.positiontup or []))
        return session.connection().exec_driver_sql(str(compiled), list(map(pick, rows)))
    return session.connection().exec_driver_sql(str(compiled), list(rows))


def held_elsewhere(session: Session, batch_id: str, ids: Sequence[str]) -> dict[str, str]:
    """Of ``ids``, those the record files under a batch other than ``batch_id``: id -> batch."""
    table = Request.__table__  # type: ignore[attr-defined]
    found: dict[str, str] = {}
    for start in range(0, len(ids), 1000):
        chunk = list(ids[start : start + 1000])
        rows = session.execute(
            select(table.c.id, table.c.batch_id)
            .where(table.c.id.in_(chunk))
            .where(table.c.batch_id != batch_id)
        )
        found.update({request_id: other for request_id, other in rows})
    return found


def finish_requests(session: Session, batch_id: str, rows: Sequence[dict[str, Any]]) -> None:
    """Record outcomes of requests still batched in ``batch_id`` (others are left alone).

    Each row has id, state, error_code, error_message, prompt_tokens, completion_tokens,
    finished_at and result (the terminal Result's JSON as delivered, or None for a requeue):
    the outcome and the result it was delivered with are written in one conditional UPDATE.
    """
    if not rows:
        return
    for state in {r["state"] for r in rows}:
        check_request_transition(RequestState.BATCHED, state)
    table = Request.__table__  # type: ignore[attr-defined]
    dialect = session.get_bind().dialect
    # The dialect's own processor: the column type's generic one leaves a datetime, which
    # sqlite3's default adapter would store as text of another shape (``+00:00``, no
    # microseconds at a whole second) that SQL then compares wrongly with every other time.
    to_db = table.c.finished_at.type.dialect_impl(dialect).bind_processor(dialect)
    times: dict[datetime | None, Any] = {None: None}  # a chunk's rows share one time
    for r in rows:
        when = r["finished_at"]
        if when not in times:
            times[when] = to_db(when) if to_db else when
    values = [
        (
            r["id"],
            r["state"],
            sql_text(r["error_code"]),
            sql_text(r["error_message"]),
            r["prompt_tokens"],
            r["completion_tokens"],
            times[r["finished_at"]],
            r.get("result"),
        )
        for r in rows
    ]
    if dialect.name == "sqlite" and sqlite3.sqlite_version_info >= _SQLITE_UPDATE_FROM_SINCE:
        _finish_on_sqlite(session, batch_id, values)
        return
    stmt = (
        update(table)
        .where(table.c.id == bindparam("rid"))
        .where(table.c.batch_id == bindparam("batch"))
        .where(table.c.state == bindparam("held"))
        .values(
            state=bindparam("new_state"),
            error_code=bindparam("error_code"),
            error_message=bindparam("error_message"),
            prompt_tokens=bindparam("prompt_tokens"),
            completion_tokens=bindparam("completion_tokens"),
            finished_at=bindparam("finished_at"),
            result=bindparam("result"),
        )
    )
    # As in upsert_requests: compiled once, the driver's executemany is handed plain values.
    # SQLAlchemy's own per-row processing was half the time of a chunk on SQLite, and it
    # holds the GIL that the collector's parser, running beside it, needs.
    compiled = stmt.compile(dialect=dialect)
    where = {"batch": batch_id, "held": RequestState.BATCHED.value}
    params = [dict(zip(_OUTCOME_PARAMS, v, strict=True), **where) for v in values]
    _execute_many(session, compiled, params)


# UPDATE ... FROM (3.33).
_SQLITE_UPDATE_FROM_SINCE = (3, 33, 0)
# The columns of an outcome, in the order finish_requests builds its values (and the SQLite
# statement's VALUES list them) ...
_OUTCOME_COLUMNS = (
    "id",
    "state",
    "error_code",
    "error_message",
    "prompt_tokens",
    "completion_tokens",
    "finished_at",
    "result",
)
# ... and as the executemany statement binds them (id and state are also its WHERE's).
_OUTCOME_PARAMS = ("rid", "new_state", *_OUTCOME_COLUMNS[2:])


@functools.lru_cache(maxsize=8)
def _sqlite_finish_statement(rows: int) -> str:
    """One UPDATE of ``rows`` outcomes given as VALUES, then the batch and the state held."""
    row = "(" + ",".join("?" * len(_OUTCOME_COLUMNS)) + ")"
    assignments = ", ".join(f"{c} = v.{c}" for c in _OUTCOME_COLUMNS[1:])
    return (
        f"WITH v({', '.join(_OUTCOME_COLUMNS)}) AS (VALUES {','.join([row] * rows)}) "
        f"UPDATE requests SET {assignments} FROM v "
        "WHERE requests.id = v.id AND +requests.batch_id = ? AND +requests.state = ?"
    )


def _finish_on_sqlite(session: Session, batch_id: str, values: list[tuple[Any, ...]]) -> None:
    """``finish_requests`` as one statement per chunk (more when SQLite's variables run out).

    Python's sqlite3 lets go of the GIL around every row's step of an ``executemany``, and each
    row then waits to get it back from the thread beside it (the collector records a chunk
    while it parses the next): measured on 50,000 rows, 0.28 s alone and 104 s beside a busy
    thread. So the rows go as the VALUES of one statement, which lets go of it once. The
    same rows as one JSON array (``json_each``) took 19.7-19.9 us a row beside a busy
    thread, the VALUES 12.8-15.5 (2,000-row statements of ~0.5 KB results, this project's
    2-core VM), and the JSON was held three times over; bound values are copied once, by
    SQLite. VALUES statements of 500 rows let go of the GIL four times as often and took
    23-26 us a row. The unary ``+`` keeps SQLite on the primary key: by ``batch_id`` it
    would scan the whole batch once per row.
    """
    connection = session.connection()
    dbapi = connection.connection.dbapi_connection
    assert isinstance(dbapi, sqlite3.Connection)
    variables = dbapi.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    per_statement = max(1, (variables - 2) // len(_OUTCOME_COLUMNS))
    held = RequestState.BATCHED.value
    for start in range(0, len(values), per_statement):
        part = values[start : start + per_statement]
        params = [value for row in part for value in row]
        params += [batch_id, held]
        connection.exec_driver_sql(_sqlite_finish_statement(len(part)), tuple(params))


def take_due_for_submit(
    session: Session, now: datetime, hold: timedelta, limit: int = 100
) -> list[Batch]:
    """Take packed or uploaded batches whose (re)try time has come, oldest first."""
    return _take_due(
        session,
        Batch.state.in_([BatchState.PACKED.value, BatchState.UPLOADED.value]),  # type: ignore[attr-defined]
        now,
        hold,
        limit,
    )


def take_due_for_poll(
    session: Session, now: datetime, hold: timedelta, limit: int = 100
) -> list[Batch]:
    """Take submitted batches whose next poll time has come, oldest first."""
    return _take_due(session, Batch.state == BatchState.SUBMITTED.value, now, hold, limit)


def _take_due(
    session: Session, in_state: Any, now: datetime, hold: timedelta, limit: int
) -> list[Batch]:
    """Due batches, each moved ``hold`` into the future so other workers pass it by.

    On PostgreSQL the rows are locked ``FOR UPDATE SKIP LOCKED`` while being taken, so
    workers ticking at the same moment split the due batches between them instead of all
    reading the same ones and racing for each batch's lease (which still keeps the work
    single). The taker writes the batch's real next deadline when it is done with it; a
    taker that dies costs its batches ``hold`` of delay.
    """
    due = (
        select(Batch.id)
        .where(in_state)
        .where(or_(Batch.next_poll_at.is_(None), Batch.next_poll_at <= now))  # type: ignore[union-attr,operator,arg-type]
        .order_by(Batch.next_poll_at)  # type: ignore[arg-type]
        .limit(limit)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    # One statement, so the take is atomic on SQLite too (which has no row locks).
    stmt = (
        update(Batch)
        .where(Batch.id.in_(due))  # type: ignore[attr-defined]
        .values(next_poll_at=now + hold)
        .returning(Batch)
    )
    batches = list(session.scalars(stmt, execution_options={"synchronize_session": False}))
    for batch in batches:  # as read: the commit must not expire what the caller works from
        session.expunge(batch)
    session.commit()
    # RETURNING keeps no order; oldest first is near enough by age.
    return sorted(batches, key=lambda batch: batch.created_at)


def release_taken(session: Session, batch: Batch, now: datetime) -> None:
    """Make a batch taken by ``take_due_for_*`` due again now, its taker having passed it by.

    A taker that cannot get the batch's lease (the reconciler or a cancel holds it for a
    moment) would otherwise leave it a whole hold (``LEASE_SECONDS``) in the future. Only the
    taker's own deadline is undone: one written since (by whoever held the lease) stands.
    """
    session.execute(
        update(Batch)
        .where(Batch.id == batch.id)  # type: ignore[arg-type]
        .where(Batch.next_poll_at == batch.next_poll_at)  # type: ignore[arg-type]
        .values(next_poll_at=now)
    )


def poll_now(session: Session, provider_batch_id: str, now: datetime) -> None:
    """Make the submitted batch running as ``provider_batch_id`` due for a poll right away."""
    session.execute(
        update(Batch)
        .where(Batch.provider_batch_id == provider_batch_id)  # type: ignore[arg-type]
        .where(Batch.state == BatchState.SUBMITTED.value)  # type: ignore[arg-type]
        .values(next_poll_at=now)
    )
