"""Cancelling a request in every state, and a whole batch, with each outcome delivered once.

Delivery is counted from effects: entries appended to the callback stream, and entries put
in the webhook outbox (``{p}:wh:{id}``) by the same script.
"""

from __future__ import annotations

import ipaddress
import time
from collections import Counter

import pytest
from sqlmodel import select
from typer.testing import CliRunner

from producer import Producer, Result
from shared.models import Batch, BatchState, Request
from shared.providers.local import LocalProvider
from tests.conftest import drive_pipeline, force_claim, run_local_jobs, settings_env
from tests.conftest import submit_requests as submit
from worker.batch_cancel import NotCancellable, request_batch_cancel
from worker.cancellation import CANCELLED_IN_BATCH, record_unbatched
from worker.claims import abandon_claim
from worker.cli import app as cli
from worker.collection import collect_ready_batches
from worker.context import WorkerContext
from worker.lifecycle import submit_ready_batches
from worker.packing import pack_buffer, pack_due_buffers
from worker.polling import poll_due_batches

MESSAGES = [{"role": "user", "content": "Is 'great value' positive?"}]
HOOK = "http://127.0.0.1:9/hook"


@pytest.fixture
def hooked(ctx: WorkerContext) -> WorkerContext:
    """The pipeline context, with webhooks to loopback allowed (nothing is sent here)."""
    loopback = (ipaddress.ip_network("127.0.0.0/8"),)
    ctx.settings = ctx.settings.model_copy(update={"webhook_allow_cidrs": loopback})
    return ctx


def producer_of(ctx: WorkerContext) -> Producer:
    return Producer(settings=ctx.settings, client=ctx.redis)


def stream_results(ctx: WorkerContext) -> list[Result]:
    """Every result ever appended to callback queue ``svc`` (acked or not)."""
    entries = ctx.redis.xrange(ctx.keys.callback("svc"))
    return [Result.from_json(fields[b"result"]) for _, fields in entries]


def outbox(ctx: WorkerContext) -> dict[str, bytes]:
    """Webhook outbox entries: request id -> outcome type."""
    found = {}
    for raw in ctx.redis.zrange(ctx.keys.webhook_queue, 0, -1):
        request_id = raw.decode()
        found[request_id] = ctx.redis.hget(ctx.keys.webhook(request_id), "type")
    return found


def submit_hooked(ctx: WorkerContext, n: int) -> list[str]:
    producer = producer_of(ctx)
    handles = producer.submit_many(
        {
            "model": "m-a",
            "messages": MESSAGES,
            "callback_queue": "svc",
            "webhook_url": HOOK,
            "metadata": {"i": i},
        }
        for i in range(n)
    )
    return [h.id for h in handles]


def test_a_buffered_request_is_cancelled_at_once_and_recorded(hooked: WorkerContext) -> None:
    # Given a request waiting in its buffer, with a callback queue and a webhook
    ctx = hooked
    (request_id,) = submit_hooked(ctx, 1)

    # When its producer cancels it, twice
    producer = producer_of(ctx)
    first, second = producer.try_cancel(request_id), producer.try_cancel(request_id)

    # Then it is cancelled once: one stream entry, one outbox entry, and the second cancel
    # says it had already finished
    assert first.kind == "cancelled" and second == ("finished", "cancelled")
    assert [(r.request_id, r.status, r.metadata) for r in stream_results(ctx)] == [
        (request_id, "cancelled", {"i": 0})
    ]
    assert outbox(ctx) == {request_id: b"cancelled"}
    assert producer.state(request_id) == "cancelled"
    # And the reaper records it in SQL (no batch ever will), once however often it runs
    assert record_unbatched(ctx) == 1 and record_unbatched(ctx) == 0
    with ctx.session() as session:
        row = session.get(Request, request_id)
    assert row is not None and row.state == "cancelled" and row.webhook_url == HOOK
    assert row.result is not None and Result.from_json(row.result).status == "cancelled"


def test_a_request_in_a_submitted_batch_is_reported_cancelled_when_its_result_arrives(
    hooked: WorkerContext,
) -> None:
    # Given ten requests in a batch already submitted to the provider
    ctx = hooked
    ids = submit_hooked(ctx, 10)
    pack_due_buffers(ctx, force=True)
    submit_ready_batches(ctx)

    # When one of them is cancelled
    producer = producer_of(ctx)
    assert producer.try_cancel(ids[3]).kind == "marked"
    assert producer.state(ids[3]) == "cancelling"
    assert producer.result(ids[3]) is None  # nothing delivered yet: the batch is running

    # And the batch completes
    run_local_jobs(ctx)
    time.sleep(0.02)
    poll_due_batches(ctx)
    collect_ready_batches(ctx)

    # Then that request's answer is discarded and it is reported cancelled, once, with the
    # usage the provider reported (it may bill it); the others completed
    results = {r.request_id: r for r in stream_results(ctx)}
    assert len(stream_results(ctx)) == 10 and set(results) == set(ids)
    cancelled = results[ids[3]]
    assert cancelled.status == "cancelled" and cancelled.response is None
    assert cancelled.error is not None and cancelled.error.message == CANCELLED_IN_BATCH
    assert cancelled.usage and cancelled.batch_id and cancelled.metadata == {"i": 3}
    assert {r.status for i, r in results.items() if i != ids[3]} == {"completed"}
    assert outbox(ctx)[ids[3]] == b"cancelled" and len(outbox(ctx)) == 10
    with ctx.session() as session:
        row = session.get(Request, ids[3])
    assert row is not None and row.state == "cancelled"


def test_a_cancelled_request_whose_line_failed_retryably_is_not_sent_round_again(
    ctx: WorkerContext,
) -> None:
    # Given a submitted batch whose provider fails every line with a retryable error
    ids = submit(ctx, 10)
    pack_due_buffers(ctx, force=True)
    submit_ready_batches(ctx)
    producer = producer_of(ctx)
    assert producer.cancel(ids[0])
    provider = ctx.provider("local")
    assert isinstance(provider, LocalProvider)
    run_local_jobs(ctx)
    (job,) = provider.store.list_jobs()
    assert job.output_file_id and job.error_file_id
    out = provider.store.file_path(job.output_file_id)
    err = provider.store.file_path(job.error_file_id)
    lines = [
        f'{{"custom_id":"{i}","error":{{"code":"rate_limit","message":"slow"}}}}\n' for i in ids
    ]
    out.write_bytes(b"")
    err.write_text("".join(lines))

    # When the batch is collected
    time.sleep(0.02)
    poll_due_batches(ctx)
    collect_ready_batches(ctx)

    # Then the cancelled request ends cancelled (delivered once) and only the others go round
    (result,) = stream_results(ctx)
    assert result.request_id == ids[0] and result.status == "cancelled"
    assert producer.state(ids[0]) == "cancelled"
    assert {producer.state(i) for i in ids[1:]} == {"pending"}
    with ctx.session() as session:
        states = Counter(r.state for r in session.exec(select(Request)))
    assert states == {"cancelled": 1, "requeued": 9}


def test_a_cancel_landing_between_the_collectors_read_and_its_write_still_wins(
    ctx: WorkerContext,
) -> None:
    # Given a batched request that the collector has already read as not cancelled
    (request_id,) = submit(ctx, 1)
    pack_due_buffers(ctx, force=True)
    with ctx.session() as session:
        (batch,) = session.exec(select(Batch))
    # When the cancel lands, and then the collector's finish arrives with a completed result
    assert producer_of(ctx).try_cancel(request_id).kind == "marked"
    args = [ctx.keys.base, 60, batch.id, request_id, "completed", b'{"request_id":"x"}']
    reply = ctx.scripts.run("finish", [ctx.keys.buffers], args)

    # Then the script delivers the cancelled result instead, and says so
    (result,) = stream_results(ctx)
    assert result.status == "cancelled" and result.request_id == request_id
    assert reply[0] == 1 and [r.decode() for r in reply[1::2]] == [request_id]


def test_a_request_cancelled_in_an_abandoned_claim_ends_cancelled(ctx: WorkerContext) -> None:
    # Given a claim that died before its batch was recorded, one of its requests cancelled
    ids = submit(ctx, 3)
    force_claim(ctx, "default:m-a", "b1", max_requests=10)
    assert producer_of(ctx).try_cancel(ids[1]).kind == "marked"

    # When the reaper gives the claim back
    assert abandon_claim(ctx, "b1") == 2

    # Then the cancelled request is finished (once) and queued for the record; the others wait
    (result,) = stream_results(ctx)
    assert result.request_id == ids[1] and result.status == "cancelled"
    assert ctx.redis.lrange(ctx.keys.to_record, 0, -1) == [ids[1].encode()]
    assert [producer_of(ctx).state(i) for i in ids] == ["pending", "cancelled", "pending"]


def test_a_finished_request_cannot_be_cancelled(ctx: WorkerContext) -> None:
    ids = submit(ctx, 2)
    drive_pipeline(ctx)
    outcome = producer_of(ctx).try_cancel(ids[0])
    assert outcome == ("finished", "completed") and not producer_of(ctx).cancel(ids[1])
    assert producer_of(ctx).try_cancel("no-such-request").kind == "unknown"
    assert len(stream_results(ctx)) == 2


@pytest.mark.parametrize("requeue", [False, True])
def test_cancelling_a_batch_before_submission(ctx: WorkerContext, requeue: bool) -> None:
    # Given a packed batch the provider has not seen
    ids = submit(ctx, 10)
    packed = pack_buffer(ctx, "default:m-a", force=True)
    assert packed is not None

    # When the operator cancels it
    said = request_batch_cancel(ctx, packed.id, requeue=requeue)
    assert "before it reached the provider" in said
    collect_ready_batches(ctx)

    # Then no job was created, and its requests are cancelled (or waiting again, no attempt
    # spent)
    provider = ctx.provider("local")
    assert isinstance(provider, LocalProvider) and provider.store.list_jobs() == []
    results = stream_results(ctx)
    if requeue:
        assert results == []
        assert {producer_of(ctx).state(i) for i in ids} == {"pending"}
        drive_pipeline(ctx)
        assert {r.status for r in stream_results(ctx)} == {"completed"}
        assert {r.attempts for r in stream_results(ctx)} == {1}
    else:
        assert sorted(r.request_id for r in results) == sorted(ids)
        assert {r.status for r in results} == {"cancelled"}
    with pytest.raises(NotCancellable, match="finished"):
        request_batch_cancel(ctx, packed.id)


def test_the_cli_refuses_to_cancel_a_finished_batch_with_exit_1(
    ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a batch that has run and been collected
    submit(ctx, 3)
    (packed,) = pack_due_buffers(ctx, force=True)
    drive_pipeline(ctx)
    for name, value in settings_env(ctx.settings).items():
        monkeypatch.setenv(name, value)

    # When the operator asks the CLI to cancel it, or a batch that does not exist
    finished = CliRunner().invoke(cli, ["batches", "cancel", packed.id])
    unknown = CliRunner().invoke(cli, ["batches", "cancel", "no-such-batch"])

    # Then both are refused as answers (exit 1), not as set-up problems (exit 2)
    assert finished.exit_code == 1 and "finished" in finished.output
    assert unknown.exit_code == 1 and "no-such-batch" in unknown.output


@pytest.mark.parametrize("requeue", [False, True])
def test_cancelling_a_submitted_batch_at_the_provider(ctx: WorkerContext, requeue: bool) -> None:
    # Given a batch submitted to the provider and not yet run
    ids = submit(ctx, 10)
    pack_due_buffers(ctx, force=True)
    submit_ready_batches(ctx)
    with ctx.session() as session:
        (batch,) = session.exec(select(Batch))
    assert batch.state == BatchState.SUBMITTED

    # When the operator cancels it and the workers poll and collect
    assert "cancel requested" in request_batch_cancel(ctx, batch.id, requeue=requeue)
    poll_due_batches(ctx)
    collect_ready_batches(ctx)

    # Then the provider job is cancelled, and no request ran: each is cancelled, or (with
    # --requeue) waiting for its next batch with no attempt spent
    provider = ctx.provider("local")
    assert isinstance(provider, LocalProvider)
    assert [j.status.value for j in provider.store.list_jobs()] == ["CANCELLED"]
    results = stream_results(ctx)
    if requeue:
        assert results == [] and {producer_of(ctx).state(i) for i in ids} == {"pending"}
        drive_pipeline(ctx)
        assert {(r.status, r.attempts) for r in stream_results(ctx)} == {("completed", 1)}
    else:
        assert len(results) == 10 and {r.status for r in results} == {"cancelled"}
