"""Deadlines are written and read on one clock: the database server's, whatever each host's says."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from shared.clock import RecordClock
from shared.models import Batch, BatchState, utcnow
from tests.conftest import (
    PG_URL,
    make_settings,
    private_postgres_database,
    run_local_jobs,
    submit_requests,
)
from worker.context import WorkerContext
from worker.lifecycle import submit_ready_batches
from worker.packing import pack_due_buffers
from worker.polling import poll_due_batches

needs_postgres = pytest.mark.skipif(
    PG_URL is None, reason="needs BATCHBRIDGE_TEST_DATABASE_URL (PostgreSQL)"
)
HOUR = timedelta(hours=1)


def skewed(by: timedelta) -> Callable[[], datetime]:
    """A host clock that runs ``by`` ahead of the true one."""
    return lambda: utcnow() + by


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL database of this test's own, dropped afterwards."""
    assert PG_URL is not None
    with private_postgres_database(PG_URL) as url:
        yield url


@pytest.fixture
def contexts(redis_url: str, tmp_path: Path, postgres_url: str) -> Iterator[ContextFactory]:
    """Worker contexts on one Redis and one PostgreSQL database, each with its own host clock."""
    made: list[WorkerContext] = []

    def make(host_clock: Callable[[], datetime], **overrides: object) -> WorkerContext:
        settings = make_settings(
            redis_url, tmp_path, database_url=postgres_url, max_batch_requests=10, **overrides
        )
        ctx = WorkerContext.create(settings)
        ctx.clock = RecordClock(ctx.engine, local=host_clock)
        made.append(ctx)
        return ctx

    yield make
    for ctx in made:
        ctx.close()


ContextFactory = Callable[..., WorkerContext]


def submitted_batch(ctx: WorkerContext) -> Batch:
    """Pack and submit ten requests through ``ctx``; the one batch, as recorded."""
    submit_requests(ctx, 10)
    pack_due_buffers(ctx, force=True)
    assert len(submit_ready_batches(ctx)) == 1
    with ctx.session() as session:
        (batch,) = session.query(Batch).all()
    assert batch.state == BatchState.SUBMITTED
    return batch


@needs_postgres
@pytest.mark.parametrize("skew", [HOUR, -HOUR, timedelta(minutes=-5)])
def test_the_record_clock_follows_the_database_server_not_the_host(
    postgres_url: str, skew: timedelta
) -> None:
    # Given a host whose clock is off by an hour (or five minutes)
    engine = create_engine(postgres_url)
    try:
        clock = RecordClock(engine, local=skewed(skew))
        # When it asks the record's clock for the time
        now = clock.now()
        # Then the answer is the true time (this host and the server share one real clock),
        # and the measured offset undoes the skew
        assert abs(now - utcnow()) < timedelta(seconds=2)
        assert abs(clock.offset + skew) < timedelta(seconds=2)
    finally:
        engine.dispose()


def test_on_sqlite_the_record_clock_is_the_local_one(tmp_path: Path) -> None:
    # Given SQLite, which lives on one host, and that host's clock an hour fast
    engine = create_engine(f"sqlite:///{tmp_path / 'clock.sqlite3'}")
    try:
        clock = RecordClock(engine, local=skewed(HOUR))
        # When it asks the time, then it gets its own clock's reading, with no offset
        assert abs(clock.now() - (utcnow() + HOUR)) < timedelta(seconds=2)
        assert clock.offset == timedelta(0)
    finally:
        engine.dispose()


@needs_postgres
def test_the_offset_is_measured_again_once_it_is_stale(postgres_url: str) -> None:
    # Given a host whose clock jumps by an hour after the first reading
    engine = create_engine(postgres_url)
    try:
        jump = [timedelta(0)]
        clock = RecordClock(engine, local=lambda: utcnow() + jump[0], resample_seconds=0.2)
        clock.now()
        jump[0] = HOUR
        # When the clock is read again within, and then after, the resample interval
        inside = clock.now()
        time.sleep(0.3)
        after = clock.now()
        # Then the jump shows until the offset is measured again, and then it is undone
        assert inside - utcnow() > HOUR - timedelta(seconds=2)
        assert abs(after - utcnow()) < timedelta(seconds=2)
    finally:
        engine.dispose()


@needs_postgres
def test_a_host_running_an_hour_fast_writes_poll_deadlines_others_find_due(
    contexts: ContextFactory,
) -> None:
    # Given a worker whose host clock is an hour fast submits a batch, polled every 0.05 s
    fast = contexts(skewed(HOUR), poll_interval_seconds=0.05)
    batch = submitted_batch(fast)
    run_local_jobs(fast)
    # When a worker with a correct clock polls a moment later
    correct = contexts(utcnow, poll_interval_seconds=0.05)
    time.sleep(0.2)
    finished = poll_due_batches(correct)
    # Then the batch was due on the shared clock: polled now, not in an hour
    assert finished == [batch.id]
    assert batch.next_poll_at is not None
    assert batch.next_poll_at - utcnow() < timedelta(seconds=5)


@needs_postgres
def test_a_host_running_an_hour_slow_does_not_make_others_poll_early(
    contexts: ContextFactory,
) -> None:
    # Given a worker whose host clock is an hour slow submits a batch, to be polled in a minute
    slow = contexts(skewed(-HOUR), poll_interval_seconds=60)
    batch = submitted_batch(slow)
    run_local_jobs(slow)
    # When a worker with a correct clock looks for due batches at once
    correct = contexts(utcnow, poll_interval_seconds=60)
    # Then nothing is due yet: the deadline is a minute ahead on the shared clock
    assert poll_due_batches(correct) == []
    assert batch.next_poll_at is not None
    assert timedelta(seconds=50) < batch.next_poll_at - utcnow() <= timedelta(seconds=61)
