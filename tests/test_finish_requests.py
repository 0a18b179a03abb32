"""Recording outcomes in SQL (``finish_requests``): what is written, what is left alone, and
on SQLite, one statement per chunk, in a record of 16 KB pages.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event
from sqlmodel import select

from shared.db import finish_requests, make_engine
from shared.models import Request
from shared.settings import Settings
from worker.context import WorkerContext

WHEN = datetime(2026, 12, 7, 9, 30, 15, 123456, tzinfo=UTC)


def outcome(request_id: str, state: str, **fields: Any) -> dict[str, Any]:
    """One row as the collector hands it over."""
    return {
        "id": request_id,
        "state": state,
        "error_code": None,
        "error_message": None,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "finished_at": WHEN,
        "result": None,
        **fields,
    }


def recorded(ctx: WorkerContext) -> dict[str, Request]:
    with ctx.session() as session:
        return {r.id: r for r in session.query(Request).all()}


@pytest.fixture
def batched(worker_context: WorkerContext) -> WorkerContext:
    """Four requests batched in b1, one batched in b2, one of b1 already completed."""
    with worker_context.session() as session:
        for i in range(4):
            session.add(Request(id=f"r{i}", batch_id="b1", state="batched", callback_queue="q"))
        session.add(Request(id="other", batch_id="b2", state="batched"))
        session.add(Request(id="done", batch_id="b1", state="completed", result='{"kept":1}'))
        session.commit()
    return worker_context


def test_each_outcome_is_written_and_only_to_requests_still_batched_here(
    batched: WorkerContext,
) -> None:
    # Given outcomes for b1's four requests, and for two requests b1 no longer holds
    ctx = batched
    rows = [
        outcome("r0", "completed", prompt_tokens=12, completion_tokens=34, result='{"a":"é"}'),
        outcome("r1", "failed", error_code="rate_limit", error_message="busy\x00 now"),
        outcome("r2", "requeued", finished_at=None),
        outcome("r3", "cancelled", result='{"status":"cancelled"}'),
        outcome("other", "completed", result='{"wrong":1}'),
        outcome("done", "failed", error_code="late"),
    ]
    # When they are recorded for b1
    with ctx.session() as session:
        finish_requests(session, "b1", rows)
        session.commit()
    # Then each of b1's requests carries its outcome, field for field
    got = recorded(ctx)
    r0, r1, r2, r3 = (got[f"r{i}"] for i in range(4))
    assert (r0.state, r0.prompt_tokens, r0.completion_tokens) == ("completed", 12, 34)
    assert r0.result == '{"a":"é"}' and r0.error_code is None
    assert r0.finished_at is not None and r0.finished_at.replace(tzinfo=UTC) == WHEN
    # (PostgreSQL refuses NUL: it is replaced, on every database alike)
    assert (r1.state, r1.error_code, r1.error_message) == ("failed", "rate_limit", "busy\ufffd now")
    assert (r2.state, r2.finished_at, r2.result) == ("requeued", None, None)
    assert (r3.state, r3.result) == ("cancelled", '{"status":"cancelled"}')
    assert all(r.callback_queue == "q" for r in (r0, r1, r2, r3))
    # And the request another batch holds, and the one already finished, are as they were
    assert (got["other"].state, got["other"].result) == ("batched", None)
    assert (got["done"].state, got["done"].error_code) == ("completed", None)
    assert got["done"].result == '{"kept":1}'


@pytest.mark.parametrize("when", [WHEN, WHEN.replace(microsecond=0)], ids=["us", "whole-second"])
def test_a_recorded_finish_time_is_found_by_a_query_for_that_time(
    batched: WorkerContext, when: datetime
) -> None:
    # Given an outcome recorded at a known instant (with and without microseconds)
    ctx = batched
    with ctx.session() as session:
        finish_requests(session, "b1", [outcome("r0", "completed", finished_at=when)])
        session.commit()
    # When the record is asked, in SQL, for what finished at that instant, and at or before it
    with ctx.session() as session:
        at = session.exec(select(Request.id).where(Request.finished_at == when)).all()
        by = session.exec(select(Request.id).where(Request.finished_at <= when)).all()
    # Then the request is found both ways: the time is stored as every other time is, so SQL
    # compares it like one (SQLite compares the stored text)
    assert (at, by) == (["r0"], ["r0"])


@contextmanager
def updates_sent(ctx: WorkerContext, database_url: str) -> Iterator[list[bool]]:
    """Each UPDATE sent to SQLite while the block runs: True where it was an executemany."""
    if not database_url.startswith("sqlite"):
        pytest.skip("the single statement is SQLite's; PostgreSQL's driver pipelines the rows")
    sent: list[bool] = []

    def count(conn: Any, cursor: Any, sql: str, params: Any, context: Any, many: bool) -> None:
        if "UPDATE REQUESTS" in sql.upper():
            sent.append(many)

    event.listen(ctx.engine, "before_cursor_execute", count)
    try:
        yield sent
    finally:
        event.remove(ctx.engine, "before_cursor_execute", count)


def test_on_sqlite_a_chunk_is_one_statement(batched: WorkerContext, database_url: str) -> None:
    # Given a count of the statements the database is sent
    ctx = batched
    # When four outcomes are recorded
    with updates_sent(ctx, database_url) as sent, ctx.session() as session:
        finish_requests(session, "b1", [outcome(f"r{i}", "completed") for i in range(4)])
        session.commit()
    # Then they went as one UPDATE, not an executemany: sqlite3 lets go of the GIL around
    # every row of an executemany, and each row then waits for it behind the thread beside
    # it (the collector parses the next chunk while this one is recorded)
    assert sent == [False]
    assert {r.state for r in recorded(ctx).values() if r.batch_id == "b1"} == {"completed"}


def test_on_sqlite_a_chunk_past_the_variable_limit_is_cut_into_statements_that_fit(
    batched: WorkerContext, database_url: str
) -> None:
    # Given SQLite allowing 50 variables a statement (8 per row and 2 more: 6 rows fit), and
    # large results among the rows (400 KB of metadata)
    ctx = batched
    big = {f"r{i}": '{"metadata":"' + str(i) * 400_000 + '"}' for i in range(4)}
    with ctx.session() as session:
        for i in range(9):
            session.add(Request(id=f"s{i}", batch_id="b1", state="batched"))
        session.commit()
    with updates_sent(ctx, database_url) as sent, ctx.session() as session:
        dbapi = session.connection().connection.dbapi_connection
        assert isinstance(dbapi, sqlite3.Connection)
        default = dbapi.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 50)
        try:
            # When 4 large and 9 small outcomes are recorded
            rows = [outcome(rid, "completed", result=res) for rid, res in big.items()]
            rows += [outcome(f"s{i}", "failed", error_code="x") for i in range(9)]
            finish_requests(session, "b1", rows)
            session.commit()
        finally:
            dbapi.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, default)
    # Then they went as three statements (6, 6 and 1 rows), and every result is whole
    assert sent == [False, False, False]
    got = recorded(ctx)
    assert {rid: got[rid].result for rid in big} == big
    assert {got[f"s{i}"].state for i in range(9)} == {"failed"}


def test_a_new_sqlite_record_has_16_kb_pages_and_an_old_one_keeps_its_own(tmp_path: Path) -> None:
    # Given an existing record made with SQLite's default 4 KB pages, and none yet beside it
    old = tmp_path / "old" / "batchbridge.sqlite3"
    old.parent.mkdir()
    with closing(sqlite3.connect(old)) as db:
        db.execute("CREATE TABLE before_us (x)")
        db.commit()
    # When the worker opens each
    pages = {}
    for name in ("old", "new"):
        settings = Settings.load(
            data_dir=str(tmp_path / name),
            database_url=f"sqlite:///{tmp_path / name / 'batchbridge.sqlite3'}",
        )
        engine = make_engine(settings)
        with engine.connect() as connection:
            pages[name] = connection.exec_driver_sql("PRAGMA page_size").scalar()
        engine.dispose()
    # Then the new record has 16 KB pages (its rows grow by whole results as batches are
    # collected), and the old one keeps its 4 KB pages, with its schema brought up to date
    assert pages == {"old": 4096, "new": 16384}
    with closing(sqlite3.connect(old)) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    assert {"before_us", "requests", "batches"} <= tables
