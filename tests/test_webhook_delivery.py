"""Webhook delivery against a real HTTP receiver: signatures, retries, 410, dead letters.

Results reach the outbox the way they do in production (a request finishes: here it is
completed by the pipeline or cancelled while buffered); the sender is the worker's own
``deliver_due``, run in this process against the receiver on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import ssl
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from pydantic import SecretStr
from sqlmodel import col, select
from standardwebhooks.webhooks import Webhook
from typer.testing import CliRunner

from producer import Producer, Result
from shared.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from tests.conftest import run_local_jobs
from tests.webhook_receiver import HANG, Receiver, serve_receiver
from worker import webhook_sender
from worker.cli import app as cli_app
from worker.collection import collect_ready_batches
from worker.context import WorkerContext
from worker.lifecycle import submit_ready_batches
from worker.packing import pack_due_buffers
from worker.polling import poll_due_batches
from worker.webhook_admin import failed_deliveries, replay, restore_lost_deliveries
from worker.webhook_sender import SendReport, deliver_due, parse_retry_after
from worker.webhook_transport import GuardedBackend, GuardedTransport

SECRET = "whsec_" + base64.b64encode(b"batchbridge-test-secret-0001").decode()
NEW_SECRET = "whsec_" + base64.b64encode(b"batchbridge-test-secret-0002").decode()
MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with serve_receiver(SECRET) as running:
        yield running


@pytest.fixture
def hooks(ctx: WorkerContext) -> WorkerContext:
    """The pipeline context set up to send webhooks to loopback, quickly."""
    ctx.settings = ctx.settings.model_copy(
        update={
            "webhook_allow_cidrs": (ipaddress.ip_network("127.0.0.0/8"),),
            "webhook_secret": SecretStr(SECRET),
            "webhook_retry_schedule": (0.0, 0.3, 0.3),
            "webhook_timeout_seconds": 2.0,
        }
    )
    return ctx


def cancelled_to(ctx: WorkerContext, url: str, n: int = 1) -> list[str]:
    """Submit ``n`` requests with webhook ``url`` and cancel them while buffered."""
    producer = Producer(settings=ctx.settings, client=ctx.redis)
    handles = producer.submit_many(
        {"model": "m-a", "messages": MESSAGES, "webhook_url": url} for _ in range(n)
    )
    for handle in handles:
        assert producer.cancel(handle.id)
    return [h.id for h in handles]


def send(ctx: WorkerContext, budget: float = 5.0) -> SendReport:
    return asyncio.run(deliver_due(ctx, budget_seconds=budget))


def send_until(ctx: WorkerContext, done: object, timeout: float = 15.0) -> None:
    """Run sender passes (as beat would) until ``done()`` holds."""
    deadline = time.monotonic() + timeout
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, "webhook deliveries did not settle in time"
        send(ctx)
        time.sleep(0.05)


def delivery_row(ctx: WorkerContext, request_id: str) -> WebhookDelivery:
    with ctx.session() as session:
        row = session.get(WebhookDelivery, f"msg_{request_id}")
    assert row is not None
    return row


def attempts_of(ctx: WorkerContext, request_id: str) -> list[WebhookAttempt]:
    with ctx.session() as session:
        return list(
            session.exec(
                select(WebhookAttempt)
                .where(WebhookAttempt.delivery_id == f"msg_{request_id}")
                .order_by(col(WebhookAttempt.attempt))
            )
        )


def outbox_size(ctx: WorkerContext) -> int:
    return int(ctx.redis.zcard(ctx.keys.webhook_queue))


def test_a_completed_result_is_posted_signed_with_the_result_as_data(
    hooks: WorkerContext, receiver: Receiver
) -> None:
    # Given a request with a webhook, completed by the pipeline
    url = receiver.script("/done", 200)
    producer = Producer(settings=hooks.settings, client=hooks.redis)
    handle = producer.submit(model="m-a", messages=MESSAGES, webhook_url=url)
    pack_due_buffers(hooks, force=True)
    submit_ready_batches(hooks)
    run_local_jobs(hooks)
    time.sleep(0.02)
    poll_due_batches(hooks)
    collect_ready_batches(hooks)
    # When the sender runs
    send_until(hooks, lambda: len(receiver.at("/done")) == 1)
    # Then one signed event arrived carrying exactly the result the producer reads
    [got] = receiver.at("/done")
    assert got.verified
    assert got.webhook_id == f"msg_{handle.id}"
    event = got.event()
    assert event["type"] == "request.completed"
    assert event["timestamp"].endswith("Z")
    result = producer.result(handle.id)
    assert result is not None
    assert Result.model_validate(event["data"]) == result
    assert event["data"]["status"] == "completed"
    assert got.headers["content-type"] == "application/json"
    # ... recorded as delivered, with nothing left in the outbox
    row = delivery_row(hooks, handle.id)
    assert (row.state, row.attempts, row.last_status) == ("delivered", 1, 200)
    assert row.body.encode() == got.body
    assert outbox_size(hooks) == 0


def test_500_500_200_is_one_delivery_id_retried_with_new_timestamps(
    hooks: WorkerContext, receiver: Receiver
) -> None:
    # Given an endpoint that fails twice, then succeeds
    url = receiver.script("/flaky", 500, 500, 200)
    [rid] = cancelled_to(hooks, url)
    # When the sender runs until it is delivered
    send_until(hooks, lambda: delivery_row_state(hooks, rid) == "delivered")
    # Then three attempts arrived: one webhook-id, one body, each signature valid
    got = receiver.at("/flaky")
    assert [d.webhook_id for d in got] == [f"msg_{rid}"] * 3
    assert len({d.body for d in got}) == 1
    assert all(d.verified for d in got)
    stamps = [int(d.headers["webhook-timestamp"]) for d in got]
    assert stamps == sorted(stamps)
    signatures = {d.headers["webhook-signature"] for d in got}
    # the schedule waits 0.3 s between attempts: the timestamps may share a second, but a
    # new signature is computed for each attempt against its own timestamp
    assert len(signatures) == len(set(stamps))
    assert got[1].at - got[0].at >= 0.25
    assert got[0].event()["type"] == "request.cancelled"
    # ... and every attempt is in the record
    assert [a.status_code for a in attempts_of(hooks, rid)] == [500, 500, 200]
    assert all(a.latency_ms >= 0 for a in attempts_of(hooks, rid))


def delivery_row_state(ctx: WorkerContext, request_id: str) -> str | None:
    with ctx.session() as session:
        row = session.get(WebhookDelivery, f"msg_{request_id}")
    return None if row is None else row.state


def test_429_with_retry_after_waits_at_least_that_long(
    hooks: WorkerContext, receiver: Receiver
) -> None:
    # Given an endpoint answering 429 with Retry-After: 2 (the schedule says 0.3 s)
    url = receiver.script("/busy", (429, {"Retry-After": "2"}), 200)
    [rid] = cancelled_to(hooks, url)
    # When the sender runs until it is delivered
    send_until(hooks, lambda: delivery_row_state(hooks, rid) == "delivered")
    # Then the second attempt came no sooner than the endpoint asked
    first, second = receiver.at("/busy")
    assert second.at - first.at >= 1.9
    assert [a.status_code for a in attempts_of(hooks, rid)] == [429, 200]


def test_410_disables_the_endpoint_and_later_deliveries_are_not_sent(
    hooks: WorkerContext, receiver: Receiver
) -> None:
    # Given an endpoint that answers 410 Gone
    url = receiver.script("/gone", 410)
    [first] = cancelled_to(hooks, url)
    send_until(hooks, lambda: delivery_row_state(hooks, first) == "dead")
    # When two more results are due to it
    later = cancelled_to(hooks, url, 2)
    send_until(hooks, lambda: all(delivery_row_state(hooks, r) == "dead" for r in later))
    # Then only the first was ever sent, the endpoint is disabled, all three dead-lettered
    assert len(receiver.at("/gone")) == 1
    with hooks.session() as session:
        assert session.get(WebhookEndpoint, url) is not None
    dead = {row.id for row in failed_deliveries(hooks)}
    assert dead == {f"msg_{r}" for r in [first, *later]}
    assert attempts_of(hooks, later[0]) == []
    assert "disabled" in (delivery_row(hooks, later[0]).last_error or "")
    # When they are replayed after the endpoint is fixed, then each arrives once
    receiver.script("/gone", 200)
    assert sorted(replay(hooks, None)) == sorted(dead)
    send_until(hooks, lambda: len(receiver.at("/gone")) == 4)
    assert {d.webhook_id for d in receiver.at("/gone")[1:]} == dead
    assert all(delivery_row_state(hooks, r) == "delivered" for r in [first, *later])


def test_a_silent_endpoint_does_not_hold_up_a_healthy_one(
    hooks: WorkerContext, receiver: Receiver
) -> None:
    # Given five results for an endpoint that never answers and five for another, healthy one
    # (endpoints are origins: the cap is per scheme, host and port)
    silent = receiver.script("/silent", HANG)
    with serve_receiver(SECRET) as other:
        healthy = other.script("/healthy", 200)
        stuck = cancelled_to(hooks, silent, 5)
        fine = cancelled_to(hooks, healthy, 5)
        # When one sender pass runs, with a budget shorter than the 2 s timeout
        started = time.time()
        send(hooks, budget=1.0)
        elapsed = time.time() - started
        arrived = other.at("/healthy")
    # Then every healthy delivery went out at once, the silent endpoint got only its cap
    assert {d.webhook_id for d in arrived} == {f"msg_{r}" for r in fine}
    assert all(d.at - started < 1.0 for d in arrived)
    cap = hooks.settings.webhook_endpoint_concurrency
    assert len(receiver.at("/silent")) == cap < len(stuck)
    # ... those attempts timed out and wait to be retried; the rest wait unsent
    timed_out = [a for r in stuck for a in attempts_of(hooks, r)]
    assert len(timed_out) == cap
    assert all("no answer within" in (a.error or "") for a in timed_out)
    assert all(hooks.redis.exists(hooks.keys.webhook(r)) for r in stuck)
    # ... and the pass ended once the attempts in flight timed out
    assert elapsed < hooks.settings.webhook_timeout_seconds + 1.5


def test_a_redirect_to_a_private_address_is_not_followed(
    hooks: WorkerContext, receiver: Receiver
) -> None:
    # Given an endpoint that redirects to the cloud metadata address
    url = receiver.script("/moved", (302, {"Location": "http://169.254.169.254/latest"}))
    target = receiver.script("/latest", 200)
    [rid] = cancelled_to(hooks, url)
    send_until(hooks, lambda: delivery_row_state(hooks, rid) == "dead")
    # Then the redirect was not followed, and the dead letter says why
    assert len(receiver.at("/moved")) == 1
    assert receiver.at("/latest") == [] and target
    row = delivery_row(hooks, rid)
    assert row.last_status == 302
    assert "not followed" in (row.last_error or "")


def test_exhausted_retries_dead_letter_and_the_cli_lists_and_replays_them(
    hooks: WorkerContext, receiver: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an endpoint that fails every time (schedule: 3 attempts)
    url = receiver.script("/down", 503)
    [rid] = cancelled_to(hooks, url)
    send_until(hooks, lambda: delivery_row_state(hooks, rid) == "dead")
    assert len(receiver.at("/down")) == len(hooks.settings.webhook_retry_schedule)
    assert "gave up after 3 attempts" in (delivery_row(hooks, rid).last_error or "")
    # When the operator lists failed deliveries and replays it by id
    for name, value in {
        "BATCHBRIDGE_REDIS_URL": hooks.settings.configured_redis_url or "",
        "BATCHBRIDGE_DATA_DIR": str(hooks.settings.data_dir),
        "BATCHBRIDGE_DATABASE_URL": hooks.settings.sqlalchemy_url,
        "BATCHBRIDGE_PROVIDER": "local",
    }.items():
        monkeypatch.setenv(name, value)
    runner = CliRunner()
    listed = runner.invoke(cli_app, ["webhooks", "failed"])
    assert listed.exit_code == 0, listed.output
    assert f"msg_{rid}" in listed.output and "503" in listed.output
    receiver.script("/down", 200)
    replayed = runner.invoke(cli_app, ["webhooks", "replay", f"msg_{rid}"])
    assert replayed.exit_code == 0, replayed.output
    send_until(hooks, lambda: delivery_row_state(hooks, rid) == "delivered")
    # Then the same event (same id and body) arrived once more, and nothing is left dead
    got = receiver.at("/down")
    assert got[-1].webhook_id == f"msg_{rid}" and got[-1].body == got[0].body
    assert got[-1].verified
    assert runner.invoke(cli_app, ["webhooks", "replay", f"msg_{rid}"]).exit_code == 1
    assert "no dead-lettered" in runner.invoke(cli_app, ["webhooks", "failed"]).output


def test_during_rotation_each_delivery_carries_both_signatures(
    hooks: WorkerContext,
) -> None:
    # Given two secrets configured (old and new) and receivers knowing only one of them
    both = SecretStr(f"{SECRET} {NEW_SECRET}")
    hooks.settings = hooks.settings.model_copy(update={"webhook_secret": both})
    with serve_receiver(NEW_SECRET) as new_only:
        url = new_only.script("/r", 200)
        [rid] = cancelled_to(hooks, url)
        send_until(hooks, lambda: len(new_only.at("/r")) == 1)
        [got] = new_only.at("/r")
    # Then each receiver verifies it with its own secret
    assert got.verified
    Webhook(SECRET).verify(got.body, got.headers)
    assert len(got.headers["webhook-signature"].split(" ")) == 2
    assert got.webhook_id == f"msg_{rid}"


def test_the_openai_sdk_unwraps_a_delivery(hooks: WorkerContext, receiver: Receiver) -> None:
    # Given a delivered event
    url = receiver.script("/oa", 200)
    [rid] = cancelled_to(hooks, url)
    send_until(hooks, lambda: len(receiver.at("/oa")) == 1)
    [got] = receiver.at("/oa")
    # When a receiver verifies it with the OpenAI SDK, then it is accepted
    client = OpenAI(api_key="unused", webhook_secret=SECRET)
    client.webhooks.verify_signature(got.body, got.headers)
    unwrapped = client.webhooks.unwrap(got.body, got.headers)
    assert unwrapped is not None
    # ... and a tampered body is rejected
    with pytest.raises(Exception, match=r"(?i)signature"):
        client.webhooks.verify_signature(got.body.replace(b"cancelled", b"completed"), got.headers)
    assert rid in got.body.decode()


def test_without_a_secret_deliveries_wait_and_the_log_names_the_variable(
    hooks: WorkerContext, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    hooks.settings = hooks.settings.model_copy(update={"webhook_secret": None})
    url = receiver.script("/x", 200)
    [rid] = cancelled_to(hooks, url)
    report = send(hooks)
    assert report.unsigned == 1 and report.settled == 0
    assert receiver.at("/x") == []
    assert hooks.redis.exists(hooks.keys.webhook(rid))
    assert "BATCHBRIDGE_WEBHOOK_SECRET" in caplog.text


@pytest.mark.parametrize(
    ("header", "lo", "hi"),
    [("7", 7, 7), ("0", 0, 0), (" 12 ", 12, 12), ("soon", None, None), (None, None, None)],
)
def test_retry_after_parsing(header: str | None, lo: float | None, hi: float | None) -> None:
    got = parse_retry_after(header)
    if lo is None:
        assert got is None
    else:
        assert got is not None and lo <= got <= hi  # type: ignore[operator]


def test_retry_after_as_an_http_date() -> None:
    from email.utils import formatdate

    got = parse_retry_after(formatdate(time.time() + 60, usegmt=True))
    assert got is not None and 55 <= got <= 61


def test_a_pass_with_nothing_due_builds_no_http_client(
    hooks: WorkerContext, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an empty outbox, then one delivery that is not due yet (its retry is in an hour)
    built: list[int] = []
    real_client = webhook_sender.guarded_client

    def counting_client(*args: object, **kwargs: object) -> object:
        built.append(1)
        return real_client(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(webhook_sender, "guarded_client", counting_client)
    assert send(hooks) == SendReport()
    (rid,) = cancelled_to(hooks, receiver.url + "/later")
    seconds, _ = hooks.redis.time()
    hooks.redis.zadd(hooks.keys.webhook_queue, {rid: (seconds + 3600) * 1000})
    # When the sender passes over them (as beat has it do every few seconds)
    assert send(hooks) == SendReport()
    # Then no client (two TLS contexts, milliseconds of CPU each) was built for either pass
    assert built == []
    assert receiver.at("/later") == []
    # And once the delivery is due, the next pass sends it with a client of its own
    hooks.redis.zadd(hooks.keys.webhook_queue, {rid: 0})
    assert send(hooks).delivered == 1
    assert built == [1]


def test_the_guarded_transport_builds_one_tls_context(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a count of the TLS contexts made
    made: list[ssl.SSLContext] = []
    real = ssl.create_default_context

    def counting(*args: object, **kwargs: object) -> ssl.SSLContext:
        made.append(real(*args, **kwargs))  # type: ignore[arg-type]
        return made[-1]

    monkeypatch.setattr(ssl, "create_default_context", counting)
    # When a webhook transport is built
    transport = GuardedTransport(GuardedBackend(()), httpx.Limits(), None)
    # Then it made one, and the pool uses it
    assert len(made) == 1
    assert transport._pool._ssl_context is made[0]


def overdue(ctx: WorkerContext, request_id: str, by: timedelta) -> None:
    """Move a pending delivery's next attempt ``by`` into the past in the record."""
    with ctx.session() as session:
        row = session.get(WebhookDelivery, f"msg_{request_id}")
        assert row is not None and row.next_attempt_at is not None
        row.next_attempt_at -= by
        session.add(row)
        session.commit()


def test_a_delivery_sent_while_the_reaper_looks_for_lost_ones_is_not_sent_again(
    hooks: WorkerContext, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a delivery whose first attempt got a 503 and whose retry is ten minutes overdue
    # (a backlog behind a slow endpoint), so the reaper's search for lost deliveries reads it
    ctx = hooks
    url = receiver.script("/h", 503, 200, 200)
    (request_id,) = cancelled_to(ctx, url)
    send(ctx)
    assert delivery_row(ctx, request_id).state == "pending"
    overdue(ctx, request_id, timedelta(minutes=10))
    time.sleep(0.4)  # the retry's own delay (the schedule's 0.3 s) has passed in Redis too

    # When the sender delivers it between the reaper's read of the record and its look at
    # Redis (where the delivered webhook's hash is then gone)
    real_exists = ctx.redis.exists

    def exists_after_a_send(*keys: str) -> int:
        monkeypatch.setattr(ctx.redis, "exists", real_exists)
        send(ctx)
        return int(real_exists(*keys))

    monkeypatch.setattr(ctx.redis, "exists", exists_after_a_send)
    restored = restore_lost_deliveries(ctx)
    send(ctx)

    # Then nothing was queued again: the endpoint got the 503'd attempt and one delivery
    assert restored == 0
    assert delivery_row(ctx, request_id).state == "delivered"
    assert len(receiver.at("/h")) == 2


def test_a_pending_delivery_redis_lost_is_queued_again_once(
    hooks: WorkerContext, receiver: Receiver
) -> None:
    # Given a delivery overdue in the record whose Redis hash and outbox entry are gone
    ctx = hooks
    url = receiver.script("/h", 503, 200)
    (request_id,) = cancelled_to(ctx, url)
    send(ctx)
    overdue(ctx, request_id, timedelta(minutes=10))
    ctx.redis.delete(ctx.keys.webhook(request_id))
    ctx.redis.zrem(ctx.keys.webhook_queue, request_id)

    # When the reaper looks for lost deliveries twice, and the sender runs
    restored = [restore_lost_deliveries(ctx), restore_lost_deliveries(ctx)]
    send_until(ctx, lambda: delivery_row(ctx, request_id).state == "delivered")

    # Then it was queued once and delivered: two POSTs in all, the 503 and the 200
    assert restored == [1, 0]
    assert len(receiver.at("/h")) == 2
