"""SQL retention: exactly the rows finished before the cutoff go, in chunks, never a live one."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import event
from sqlmodel import SQLModel, select

from shared.models import (
    Batch,
    BatchState,
    Request,
    RequestState,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
)
from worker.context import WorkerContext
from worker.retention import PruneReport, prune_old_records, retention_cutoff

pytestmark = pytest.mark.timeout(60)

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
OLD = NOW - timedelta(days=31)  # past the 30-day retention
YOUNG = NOW - timedelta(days=29)


@pytest.fixture
def record(ctx: WorkerContext) -> WorkerContext:
    """The test context with a 30-day retention, whatever the environment says."""
    ctx.settings = ctx.settings.model_copy(update={"sql_retention_days": 30.0})
    return ctx


def batch(batch_id: str, state: BatchState, finished: datetime | None, **fields: Any) -> Batch:
    updated = fields.pop("updated_at", finished or NOW)
    return Batch(
        id=batch_id,
        provider="local",
        model="m-a",
        state=state.value,
        request_count=1,
        bytes=1,
        finished_at=finished,
        created_at=updated,
        updated_at=updated,
        **fields,
    )


def request(
    request_id: str, batch_id: str, state: RequestState, finished: datetime | None
) -> Request:
    return Request(id=request_id, batch_id=batch_id, state=state.value, finished_at=finished)


def delivery(delivery_id: str, state: str, finished: datetime | None) -> WebhookDelivery:
    return WebhookDelivery(
        id=delivery_id,
        request_id=delivery_id.removeprefix("msg_"),
        url="https://hooks.example/in",
        event_type="request.completed",
        body="{}",
        state=state,
        created_at=finished or OLD,
        finished_at=finished,
    )


def attempts(delivery_id: str, n: int) -> list[WebhookAttempt]:
    return [WebhookAttempt(delivery_id=delivery_id, attempt=i + 1, at=OLD) for i in range(n)]


def insert(ctx: WorkerContext, *rows: SQLModel) -> None:
    with ctx.session() as session:
        session.add_all(rows)
        session.commit()


def ids(ctx: WorkerContext, model: type[Batch] | type[Request] | type[WebhookDelivery]) -> set[str]:
    with ctx.session() as session:
        return set(session.exec(select(model.id)))


def attempt_owners(ctx: WorkerContext) -> list[str]:
    with ctx.session() as session:
        return sorted(session.exec(select(WebhookAttempt.delivery_id)))


def test_only_terminal_requests_finished_before_the_cutoff_are_deleted(
    record: WorkerContext,
) -> None:
    # Given requests of every state, finished (or not) before and after the cutoff
    insert(
        record,
        batch("b1", BatchState.SUBMITTED, None),
        request("old-completed", "b1", RequestState.COMPLETED, OLD),
        request("old-failed", "b1", RequestState.FAILED, OLD),
        request("old-cancelled", "b1", RequestState.CANCELLED, OLD),
        request("very-old-completed", "b1", RequestState.COMPLETED, NOW - timedelta(days=900)),
        # Not terminal, however old their finished_at claims to be
        request("old-batched", "b1", RequestState.BATCHED, OLD),
        request("old-requeued", "b1", RequestState.REQUEUED, OLD),
        request("never-finished", "b1", RequestState.COMPLETED, None),
        request("young-completed", "b1", RequestState.COMPLETED, YOUNG),
        request("just-at-the-cutoff", "b1", RequestState.FAILED, NOW - timedelta(days=30)),
    )

    # When old records are pruned
    report = prune_old_records(record, now=NOW)

    # Then exactly the four old terminal requests are gone
    assert ids(record, Request) == {
        "old-batched",
        "old-requeued",
        "never-finished",
        "young-completed",
        "just-at-the-cutoff",
    }
    assert report == PruneReport(requests=4)
    # And the unfinished batch they belong to stays, however long ago it started
    assert ids(record, Batch) == {"b1"}


def test_finished_and_abandoned_batches_go_once_old_and_empty(record: WorkerContext) -> None:
    # Given batches in every state, old and young, some still holding request rows
    insert(
        record,
        batch("old-finished-empty", BatchState.FINISHED, OLD),
        batch("old-finished-pruned-rows", BatchState.FINISHED, OLD),
        request("r-old", "old-finished-pruned-rows", RequestState.COMPLETED, OLD),
        batch("old-finished-young-row", BatchState.FINISHED, OLD),
        request("r-young", "old-finished-young-row", RequestState.COMPLETED, YOUNG),
        batch("old-finished-requeued-row", BatchState.FINISHED, OLD),
        request("r-requeued", "old-finished-requeued-row", RequestState.REQUEUED, None),
        batch("young-finished", BatchState.FINISHED, YOUNG),
        batch("old-abandoned", BatchState.ABANDONED, None, updated_at=OLD),
        batch("young-abandoned", BatchState.ABANDONED, None, updated_at=YOUNG),
        # Unfinished, all long ago: none may go
        batch("old-packed", BatchState.PACKED, None, updated_at=OLD),
        batch("old-uploaded", BatchState.UPLOADED, None, updated_at=OLD),
        batch("old-submitted", BatchState.SUBMITTED, None, updated_at=OLD),
        batch("old-collecting", BatchState.COLLECTING, None, updated_at=OLD),
        batch("old-failed", BatchState.FAILED, OLD, updated_at=OLD),
    )

    # When old records are pruned
    report = prune_old_records(record, now=NOW)

    # Then the old empty finished batches go (one emptied by this very pass), and the old
    # abandoned one; every other batch and request row stays
    assert ids(record, Batch) == {
        "old-finished-young-row",
        "old-finished-requeued-row",
        "young-finished",
        "young-abandoned",
        "old-packed",
        "old-uploaded",
        "old-submitted",
        "old-collecting",
        "old-failed",
    }
    assert ids(record, Request) == {"r-young", "r-requeued"}
    assert report == PruneReport(requests=1, batches=3)


def test_final_webhook_deliveries_go_with_their_attempts_and_live_ones_stay(
    record: WorkerContext,
) -> None:
    # Given deliveries in each state, old and young, with their attempts, and a disabled
    # endpoint; and two old finished requests, one whose delivery is still pending
    insert(
        record,
        batch("b1", BatchState.SUBMITTED, None),
        request("r-delivered", "b1", RequestState.COMPLETED, OLD),
        request("r-pending", "b1", RequestState.COMPLETED, OLD),
        delivery("msg_r-delivered", "delivered", OLD),
        delivery("msg_r-dead", "dead", OLD),
        delivery("msg_r-pending", "pending", None),
        delivery("msg_r-young", "delivered", YOUNG),
        *attempts("msg_r-delivered", 2),
        *attempts("msg_r-dead", 3),
        *attempts("msg_r-pending", 4),
        *attempts("msg_r-young", 1),
        WebhookEndpoint(url="https://gone.example/in", disabled_at=OLD, reason="410"),
    )

    # When old records are pruned
    report = prune_old_records(record, now=NOW)

    # Then the old delivered and dead deliveries are gone, and their attempts with them
    assert ids(record, WebhookDelivery) == {"msg_r-pending", "msg_r-young"}
    assert attempt_owners(record) == ["msg_r-pending"] * 4 + ["msg_r-young"]
    # And the request whose delivery is still under way stays, its delivered neighbour goes
    assert ids(record, Request) == {"r-pending"}
    # And disabled endpoints are an operator's to enable: they stay
    with record.session() as session:
        assert len(session.exec(select(WebhookEndpoint)).all()) == 1
    assert report == PruneReport(requests=1, webhook_deliveries=2, webhook_attempts=5)


def in_list_length(statement: str) -> int:
    """How many values the first ``IN (...)`` of ``statement`` holds, in any paramstyle."""
    depth, values = 0, 1
    # Placeholders may hold parentheses themselves (psycopg's "%(id_1_1)s::VARCHAR").
    for char in statement[statement.index(" IN (") + 4 :]:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return values
        values += char == "," and depth == 1
    raise AssertionError(f"unbalanced IN list in {statement!r}")


@pytest.fixture
def deletes(record: WorkerContext) -> Iterator[list[tuple[str, int]]]:
    """(table, rows it names) of every DELETE the engine runs, as the database receives it."""
    seen: list[tuple[str, int]] = []

    def note(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("DELETE FROM"):
            seen.append((statement.split()[2].strip('"'), in_list_length(statement)))

    event.listen(record.engine, "before_cursor_execute", note)
    try:
        yield seen
    finally:
        event.remove(record.engine, "before_cursor_execute", note)


def test_a_big_prune_deletes_in_chunks(
    record: WorkerContext, deletes: list[tuple[str, int]]
) -> None:
    # Given 10 old requests, 7 old delivered deliveries, and 5 old empty finished batches
    insert(
        record,
        *(request(f"r{i}", "b-live", RequestState.COMPLETED, OLD) for i in range(10)),
        *(delivery(f"msg_d{i}", "delivered", OLD) for i in range(7)),
        *(batch(f"b{i}", BatchState.FINISHED, OLD) for i in range(5)),
    )

    # When they are pruned 3 ids at a time
    report = prune_old_records(record, now=NOW, chunk_size=3)

    # Then every one is gone
    assert report == PruneReport(requests=10, webhook_deliveries=7, batches=5)
    assert (ids(record, Request), ids(record, WebhookDelivery), ids(record, Batch)) == (
        set(),
        set(),
        set(),
    )
    # And no statement named more than 3 rows: 4 + 3 + 2 chunks, each delivery chunk also
    # deleting its attempts
    by_table = {
        table: [n for t, n in deletes if t == table]
        for table in ("requests", "webhook_deliveries", "webhook_attempts", "batches")
    }
    assert by_table == {
        "requests": [3, 3, 3, 1],
        "webhook_deliveries": [3, 3, 1],
        "webhook_attempts": [3, 3, 1],
        "batches": [3, 2],
    }


def test_retention_0_keeps_everything_for_ever(record: WorkerContext) -> None:
    # Given rows finished ten years ago, and a retention of 0 (keep for ever)
    ancient = NOW - timedelta(days=3650)
    insert(
        record,
        batch("b-ancient", BatchState.FINISHED, ancient),
        batch("b-abandoned", BatchState.ABANDONED, None, updated_at=ancient),
        request("r-ancient", "b-other", RequestState.COMPLETED, ancient),
        delivery("msg_r-ancient", "delivered", ancient),
        *attempts("msg_r-ancient", 1),
    )
    record.settings = record.settings.model_copy(update={"sql_retention_days": 0.0})

    # When old records are pruned, then nothing is
    assert prune_old_records(record, now=NOW) == PruneReport()
    assert ids(record, Batch) == {"b-ancient", "b-abandoned"}
    assert ids(record, Request) == {"r-ancient"}
    assert attempt_owners(record) == ["msg_r-ancient"]


def test_without_now_the_cutoff_is_counted_back_from_the_current_time(
    record: WorkerContext,
) -> None:
    # Given a request finished 31 days ago and one 29 days ago, and a fractional retention
    real_now = datetime.now(UTC)
    insert(
        record,
        request("r-31-days", "b", RequestState.COMPLETED, real_now - timedelta(days=31)),
        request("r-29-days", "b", RequestState.COMPLETED, real_now - timedelta(days=29)),
        request("r-2-hours", "b", RequestState.COMPLETED, real_now - timedelta(hours=2)),
    )
    record.settings = record.settings.model_copy(update={"sql_retention_days": 30.0})

    # When old records are pruned as the reaper does (no ``now``), then only the 31-day one goes
    assert prune_old_records(record).requests == 1
    assert ids(record, Request) == {"r-29-days", "r-2-hours"}
    # And with a retention of an hour, the 2-hour-old one goes too
    record.settings = record.settings.model_copy(update={"sql_retention_days": 1 / 24})
    assert prune_old_records(record).requests == 2
    assert ids(record, Request) == set()


def test_the_cutoff_is_in_utc_whatever_timezone_now_is_given_in() -> None:
    # Given one moment in three spellings, when the cutoff is computed, then it is the same
    tokyo = NOW.astimezone(timezone(timedelta(hours=9)))
    naive_utc = NOW.replace(tzinfo=None)
    expected = datetime(2025, 5, 2, 12, 0, tzinfo=UTC)
    assert retention_cutoff(30, NOW) == expected
    cutoff = retention_cutoff(30, tokyo)
    assert cutoff == expected and cutoff is not None and cutoff.tzinfo is UTC
    assert retention_cutoff(30, naive_utc) == expected
    # And 0 means no cutoff, a negative retention is refused naming the setting
    assert retention_cutoff(0, NOW) is None
    with pytest.raises(ValueError, match="sql_retention_days must be >= 0"):
        retention_cutoff(-1, NOW)


def test_the_prune_finds_old_requests_through_an_index_not_a_table_scan(
    record: WorkerContext,
) -> None:
    # Given a record of finished requests, none old enough to go
    insert(record, *(request(f"r{i}", "b-live", RequestState.COMPLETED, NOW) for i in range(20)))
    statements: list[tuple[str, Any]] = []

    def note(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().startswith("SELECT requests.id"):
            statements.append((statement, parameters))

    # When a reaper pass prunes (every pass runs this, however large the table has grown)
    event.listen(record.engine, "before_cursor_execute", note)
    try:
        report = prune_old_records(record, now=NOW)
    finally:
        event.remove(record.engine, "before_cursor_execute", note)

    # Then nothing went, and the statement that looked for old requests would read them
    # through the finished-time index, wherever the planner is free to choose it
    assert report == PruneReport()
    assert statements, "the prune never looked for old requests"
    for statement, parameters in statements:
        plan = explain(record, statement, parameters)
        assert "ix_requests_finished_at" in plan, plan


def explain(ctx: WorkerContext, statement: str, parameters: Any) -> str:
    """How the database would run ``statement`` (a table scan only when it has no other way)."""
    with ctx.engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            rows = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)
            return "\n".join(str(row[-1]) for row in rows)
        # A small table is cheapest to scan: forbid that, to see whether an index can serve.
        conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
        rows = conn.exec_driver_sql(f"EXPLAIN {statement}", parameters)
        return "\n".join(str(row[0]) for row in rows)
