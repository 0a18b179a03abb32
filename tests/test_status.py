"""`batchbridge status` tells the truth: when buffers flush, failed and held batches, backlogs."""

from __future__ import annotations

import itertools
import time
from datetime import timedelta
from io import StringIO
from pathlib import Path

import pytest
from rich.console import Console
from sqlmodel import Session, col, select, update

from producer import CallbackQueue, Producer
from shared.models import Batch, BatchState, Request, WebhookDelivery, utcnow
from shared.redis_layout import pending_ids
from tests.conftest import drive_pipeline, make_settings, submit_requests
from worker.collection import collect_ready_batches
from worker.context import WorkerContext
from worker.lifecycle import fail_unsent_batch, submit_ready_batches
from worker.packing import pack_buffer, pack_due_buffers
from worker.status import collect_status, safe_database_url
from worker.status_buffers import read_buffer
from worker.status_record import BATCH_STATUSES, batch_status, list_batches
from worker.status_render import render_status

MESSAGES = [{"role": "user", "content": "hi"}]


def _age_buffer(ctx: WorkerContext, buf: str, seconds: float) -> None:
    """Make the oldest request of ``buf`` look ``seconds`` old (what claim.lua reads)."""
    first = pending_ids(ctx.redis, ctx.keys, buf)[0]
    enq = int(time.time() * 1000 - seconds * 1000)
    ctx.redis.hset(ctx.keys.request(first), "enq", enq)


def test_status_shows_pending_buffers_and_a_batch_the_provider_keeps_refusing(
    worker_context: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a provider that answers every call with 429/500 (fault injection)
    monkeypatch.setenv("BATCHBRIDGE_LOCAL_FAIL_RATE", "1")
    ctx = worker_context
    ctx.settings = ctx.settings.model_copy(update={"max_batch_requests": 3})
    producer = Producer(settings=ctx.settings, client=ctx.redis)
    producer.submit_many([{"model": "m-a", "messages": MESSAGES}] * 3)
    producer.submit_many([{"model": "m-b", "messages": MESSAGES}] * 2)

    # When one batch is packed and its submission fails
    (packed,) = pack_due_buffers(ctx)
    assert submit_ready_batches(ctx) == []
    report = collect_status(ctx.settings)

    # Then the waiting buffer, the packed batch and its error are all reported
    assert [(p["model"], p["count"]) for p in report["pending"]] == [("m-b", 2)]
    assert [(b["provider"], b["state"], b["status"], b["count"]) for b in report["batches"]] == [
        ("local", "packed", "packed", 1)
    ]
    (stuck,) = report["batches_with_errors"]
    assert stuck["batch"] == packed.id and "retryable error" in stuck["error"]
    (active,) = report["active_batches"]
    assert active["batch"] == packed.id and active["requests"] == 3


def test_status_counts_held_batches_and_marks_them(worker_context: WorkerContext) -> None:
    # Given a batch for a provider this deployment has no key for (nothing can be sent)
    ctx = worker_context
    ctx.settings = ctx.settings.model_copy(update={"max_batch_requests": 2})
    producer = Producer(settings=ctx.settings, client=ctx.redis)
    producer.submit_many([{"model": "m-t", "messages": MESSAGES, "provider": "together"}] * 2)
    (packed,) = pack_due_buffers(ctx)

    # When the submitter tries it and the status is read
    assert submit_ready_batches(ctx) == []
    report = collect_status(ctx.settings)

    # Then the batch is listed as held, with the reason, and its requests are kept
    (held,) = report["held_batches"]
    assert held["batch"] == packed.id and held["status"] == "held"
    assert held["held_since"] is not None and held["requests"] == 2
    assert "on hold" in held["error"] and "TOGETHER_API_KEY" in held["error"]
    assert [(b["status"], b["state"]) for b in report["batches"]] == [("held", "packed")]
    (errored,) = report["batches_with_errors"]
    assert errored["batch"] == packed.id


def test_flush_forecast_agrees_with_what_claim_lua_does(ctx: WorkerContext) -> None:
    # Given buffers at each threshold, and one below all of them (10 requests, 300 s)
    ctx.settings = ctx.settings.model_copy(update={"max_batch_bytes": 2048})
    producer = Producer(settings=ctx.settings, client=ctx.redis)
    big = [{"role": "user", "content": "x" * 400}]
    producer.submit_many([{"model": "by-count", "messages": MESSAGES}] * 10)
    producer.submit_many([{"model": "by-bytes", "messages": big}] * 5)
    producer.submit_many([{"model": "by-age", "messages": MESSAGES}] * 2)
    producer.submit_many([{"model": "not-due", "messages": MESSAGES}] * 2)
    _age_buffer(ctx, "default:by-age", 301)
    _age_buffer(ctx, "default:not-due", 60)

    for model, expected in [
        ("by-count", "count"),
        ("by-bytes", "bytes"),
        ("by-age", "age"),
        ("not-due", None),
    ]:
        buf = f"default:{model}"
        # When the forecast is read, then the aggregator's claim script runs on the buffer
        now_ms = int(time.time() * 1000)
        forecast = read_buffer(ctx.redis, ctx.keys, buf, now_ms).decision(ctx.settings)
        packed = pack_buffer(ctx, buf)

        # Then both say the same: the same reason, or nothing due
        assert forecast.reason == expected, model
        assert (packed.reason if packed else None) == expected, model
    assert forecast.wait_seconds == pytest.approx(240, abs=2)


def test_status_json_says_when_and_why_each_buffer_flushes(ctx: WorkerContext) -> None:
    # Given thresholds of 10 requests and 300 s, a young buffer, a full one and an old one
    producer = Producer(settings=ctx.settings, client=ctx.redis)
    producer.submit_many([{"model": "young", "messages": MESSAGES}] * 3)
    producer.submit_many([{"model": "full", "messages": MESSAGES}] * 10)
    producer.submit_many([{"model": "old", "messages": MESSAGES}] * 1)
    _age_buffer(ctx, "default:young", 48)
    _age_buffer(ctx, "default:old", 400)

    # When the status is read
    report = collect_status(ctx.settings)

    # Then each buffer says when it flushes and which threshold makes it
    by_model = {p["model"]: p for p in report["pending"]}
    young, full, old = by_model["young"], by_model["full"], by_model["old"]
    assert young["count"] == 3 and young["bytes"] > 0
    assert young["oldest_age_seconds"] == pytest.approx(48, abs=2)
    assert young["flush"]["due"] is False and young["flush"]["reason"] is None
    assert young["flush"]["in_seconds"] == pytest.approx(252, abs=2)
    assert young["flush"]["text"].startswith("in 4m 1")
    assert young["flush"]["text"].endswith("(age limit 300 s)")
    assert (full["flush"]["due"], full["flush"]["reason"], full["flush"]["in_seconds"]) == (
        True,
        "count",
        0,
    )
    assert "next aggregate tick (count 10 ≥ 10)" in full["flush"]["text"]
    assert old["flush"]["reason"] == "age"
    assert "is a worker with its beat running?" in old["flush"]["text"]
    assert report["thresholds"]["max_batch_requests"] == 10
    assert report["thresholds"]["max_wait_seconds"] == 300


def test_a_failed_batch_shows_failed_never_finished(ctx: WorkerContext) -> None:
    # Given one batch that completed and one the operator failed, both collected
    submit_requests(ctx, 10)
    drive_pipeline(ctx)
    submit_requests(ctx, 4)
    (doomed,) = pack_due_buffers(ctx, force=True)
    fail_unsent_batch(ctx, doomed.id)
    collect_ready_batches(ctx)
    with ctx.session() as session:
        assert session.get(Batch, doomed.id).state == BatchState.FINISHED  # type: ignore[union-attr]

    # When the status is read
    report = collect_status(ctx.settings)

    # Then the record's "finished" batch with a failed outcome is shown as failed, with why
    groups = {(b["state"], b["status"]): b for b in report["batches"]}
    assert set(groups) == {("finished", "finished"), ("finished", "failed")}
    assert groups["finished", "failed"]["count"] == 1
    assert groups["finished", "failed"]["failed"] == 4
    assert groups["finished", "finished"]["completed"] == 10
    (failed,) = report["failed_batches"]
    assert failed["batch"] == doomed.id and failed["status"] == "failed"
    assert "failed by the operator" in failed["error"]
    assert report["failed_batches_total"] == 1
    # And requests by outcome count both batches' requests as ended within the hour
    assert report["requests"]["last_hour"] == {"completed": 10, "failed": 4, "cancelled": 0}
    # And the text says failed, not finished, for that batch
    text = _rendered(report)
    assert f"{doomed.id}" in text and "failed (finished)" in text


def test_outcomes_count_by_when_requests_ended(ctx: WorkerContext) -> None:
    # Given 10 completed requests, 3 of which ended two hours ago and 2 two days ago
    ids = submit_requests(ctx, 10)
    drive_pipeline(ctx)
    with ctx.session() as session:
        for some, hours in ((ids[:3], 2), (ids[3:5], 48)):
            session.exec(
                update(Request)
                .where(col(Request.id).in_(some))
                .values(finished_at=utcnow() - timedelta(hours=hours))
            )
        session.commit()

    # When the status is read
    report = collect_status(ctx.settings)

    # Then the last hour has 5, the last day 8
    assert report["requests"]["last_hour"]["completed"] == 5
    assert report["requests"]["last_day"]["completed"] == 8


def test_callback_backlog_counts_what_was_added_and_acked(ctx: WorkerContext) -> None:
    # Given 10 results delivered to queue svc, nobody consuming yet
    submit_requests(ctx, 10)
    drive_pipeline(ctx)
    (queue,) = collect_status(ctx.settings)["callback_queues"]
    assert (queue["queue"], queue["length"], queue["unacked"]) == ("svc", 10, 10)
    assert (queue["delivered"], queue["undelivered"], queue["consumers"]) == (0, 10, 0)

    # When a consumer takes 3 and acks 1 of them
    consumer = CallbackQueue("svc", settings=ctx.settings, client=ctx.redis)
    taken = [consumer.get(timeout=1) for _ in range(3)]
    assert all(taken)
    taken[0].ack()  # type: ignore[union-attr]
    (queue,) = collect_status(ctx.settings)["callback_queues"]

    # Then 9 are unacked: 2 delivered and awaiting their ack, 7 not delivered yet
    assert (queue["length"], queue["unacked"]) == (9, 9)
    assert (queue["delivered"], queue["undelivered"], queue["consumers"]) == (2, 7, 1)
    assert queue["dead"] == 0 and queue["oldest_age_seconds"] is not None


def test_webhook_pending_and_dead_letters_are_counted(worker_context: WorkerContext) -> None:
    # Given deliveries in the record: 2 pending, 1 delivered, 3 dead
    ctx = worker_context
    with ctx.session() as session:
        for i, state in enumerate(["pending"] * 2 + ["delivered"] + ["dead"] * 3):
            session.add(
                WebhookDelivery(
                    id=f"msg_r{i}",
                    request_id=f"r{i}",
                    url="https://example.com/hook",
                    event_type="request.completed",
                    body="{}",
                    state=state,
                )
            )
        session.commit()

    # When the status is read
    report = collect_status(ctx.settings)

    # Then the counts are those, and the text points at the dead letters
    assert report["webhooks"] == {"pending": 2, "delivered": 1, "dead": 3, "outbox": 0}
    assert "3 dead (`batchbridge webhooks failed`" in _rendered(report)


def test_status_never_shows_the_redis_password(redis_url: str, tmp_path: Path) -> None:
    # Given a Redis URL with a password (the test Redis takes any for user "default")
    secret_url = redis_url.replace("redis://", "redis://default:s3cret-pw-7@", 1)
    settings = make_settings(secret_url, tmp_path)
    Producer(settings=settings).submit("m", MESSAGES)

    # When the status is read, as JSON and as text
    report = collect_status(settings)

    # Then the URL is shown with the password masked, in both
    assert report["sources"]["redis"].startswith("redis://default:***@")
    assert "s3cret-pw-7" not in str(report) and "s3cret-pw-7" not in _rendered(report)


def test_the_database_password_is_masked_too(redis_url: str, tmp_path: Path) -> None:
    url = "postgresql+psycopg://bb:db-s3cret-9@db.internal:5432/batchbridge"
    settings = make_settings(redis_url, tmp_path, database_url=url)
    shown = safe_database_url(settings)
    assert shown == "postgresql+psycopg://bb:***@db.internal:5432/batchbridge"


def test_a_database_password_in_the_query_is_masked(redis_url: str, tmp_path: Path) -> None:
    # Given a database URL with its password as a query parameter (libpq takes it there)
    url = "postgresql+psycopg://bb@db.internal/batchbridge?password=db-s3cret-9&sslmode=require"
    settings = make_settings(redis_url, tmp_path, database_url=url)
    # When the status report shows the sources / Then the password is masked, the rest kept
    shown = safe_database_url(settings)
    assert "db-s3cret-9" not in shown
    assert shown.endswith("/batchbridge?password=***&sslmode=require")


def test_every_batch_status_has_a_sql_filter_that_agrees(worker_context: WorkerContext) -> None:
    # Given a batch for every combination of state, outcome and hold
    ctx = worker_context
    outcomes = [None, "completed", "failed", "cancelled", "unsent", "requeued", "expired"]
    outcomes += ["lost", "no_output", "unknown"]
    expected: dict[str, set[str]] = {}
    with ctx.session() as session:
        combos = itertools.product(list(BatchState), outcomes, [False, True])
        for n, (state, outcome, held) in enumerate(combos):
            batch_id = f"b{n:04d}"
            session.add(
                Batch(
                    id=batch_id,
                    provider="local",
                    model="m",
                    state=state.value,
                    outcome=outcome,
                    request_count=1,
                    bytes=1,
                    held_since=utcnow() if held else None,
                )
            )
            expected.setdefault(batch_status(state.value, outcome, held), set()).add(batch_id)
        session.commit()
    assert set(expected) <= set(BATCH_STATUSES)

    # When batches are listed by each status, then each list is exactly those with it
    with Session(ctx.engine) as session:
        for status in BATCH_STATUSES:
            found = list_batches(session, utcnow(), status, limit=10_000)
            assert {b["batch"] for b in found} == expected.get(status, set()), status
            assert all(b["status"] == status for b in found)
        assert len(session.exec(select(Batch)).all()) == sum(len(v) for v in expected.values())


def _rendered(report: dict[str, object]) -> str:
    out = StringIO()
    Console(file=out, width=200, color_system=None).print(render_status(report))
    return out.getvalue()
