"""Workers take due batches without reading the same rows: FOR UPDATE SKIP LOCKED on PostgreSQL."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlmodel import Session

from shared.db import make_engine, take_due_for_poll, take_due_for_submit
from shared.models import Batch, BatchState, utcnow
from tests.conftest import make_settings, run_at_once

HOLD = timedelta(seconds=30)


@pytest.fixture
def engine(redis_url: str, tmp_path: Path, database_url: str) -> Iterator[Engine]:
    """The test database (SQLite, and PostgreSQL when configured) with its schema."""
    engine = make_engine(make_settings(redis_url, tmp_path, database_url=database_url))
    try:
        yield engine
    finally:
        engine.dispose()


def due_batches(engine: Engine, n: int, state: BatchState = BatchState.SUBMITTED) -> list[str]:
    """Record ``n`` batches in ``state``, each due a second apart in the past; their ids."""
    now = utcnow()
    batches = [
        Batch(
            id=uuid.uuid4().hex,
            provider="local",
            model="m-a",
            state=state.value,
            request_count=1,
            bytes=1,
            next_poll_at=now - timedelta(seconds=n - i),
        )
        for i in range(n)
    ]
    ids = [batch.id for batch in batches]
    with Session(engine) as session:
        session.add_all(batches)
        session.commit()
    return ids


def test_taking_due_batches_moves_them_out_of_the_next_takers_way(engine: Engine) -> None:
    # Given ten submitted batches that are due
    ids = due_batches(engine, 10)
    # When one worker takes six and another then looks
    with Session(engine) as session:
        first = take_due_for_poll(session, utcnow(), HOLD, limit=6)
    with Session(engine) as session:
        second = take_due_for_poll(session, utcnow(), HOLD)
    # Then the first got the six oldest, the second the other four, and nobody any twice
    assert sorted(b.id for b in first) == sorted(ids[:6])
    assert sorted(b.id for b in second) == sorted(ids[6:])
    # And a taken batch is due again a hold later, should its taker die before writing its
    # real next deadline
    with Session(engine) as session:
        assert take_due_for_poll(session, utcnow(), HOLD) == []
        again = take_due_for_poll(session, utcnow() + HOLD + timedelta(seconds=1), HOLD)
    assert sorted(b.id for b in again) == sorted(ids)


def test_submit_and_poll_take_only_their_own_states(engine: Engine) -> None:
    # Given due batches to submit and due batches to poll
    packed = due_batches(engine, 3, BatchState.PACKED)
    uploaded = due_batches(engine, 2, BatchState.UPLOADED)
    submitted = due_batches(engine, 4, BatchState.SUBMITTED)
    due_batches(engine, 2, BatchState.COLLECTING)
    # When each step takes what is due
    with Session(engine) as session:
        to_submit = take_due_for_submit(session, utcnow(), HOLD)
        to_poll = take_due_for_poll(session, utcnow(), HOLD)
    # Then each got exactly its own
    assert sorted(b.id for b in to_submit) == sorted(packed + uploaded)
    assert sorted(b.id for b in to_poll) == sorted(submitted)


def test_concurrent_takers_never_get_the_same_batch(engine: Engine) -> None:
    # Given 200 due batches and four workers taking at once, a few at a time
    ids = due_batches(engine, 200)
    taken: list[str] = []
    lock = threading.Lock()

    def taker() -> None:
        while True:
            with Session(engine) as session:
                mine = take_due_for_poll(session, utcnow(), HOLD, limit=7)
            if not mine:
                return
            with lock:
                taken.extend(b.id for b in mine)

    errors = run_at_once(taker, 4)
    # Then every batch was taken, and each by one worker only
    assert not errors
    assert Counter(taken) == Counter(ids)


def test_a_taker_skips_rows_another_holds_instead_of_waiting_for_them(
    engine: Engine,
) -> None:
    # Given ten due batches, the five oldest locked by a taker whose transaction is still open
    if engine.dialect.name != "postgresql":
        pytest.skip("row locks are PostgreSQL's")
    ids = due_batches(engine, 10)
    with engine.connect() as holder:
        holder.execute(
            text("SELECT id FROM batches WHERE id = ANY(:ids) FOR UPDATE"), {"ids": ids[:5]}
        )
        # When another worker takes what is due, unwilling to wait two seconds for a lock
        with Session(engine) as session:
            session.execute(text("SET lock_timeout = '2s'"))
            taken = take_due_for_poll(session, utcnow(), HOLD)
        holder.rollback()
    # Then it got the five nobody held, at once and without a lock timeout
    assert sorted(b.id for b in taken) == sorted(ids[5:])
