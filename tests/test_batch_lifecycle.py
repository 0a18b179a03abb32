"""Batch lifecycle scenarios in one process: submit, poll, collect, retry, cancel, reconcile."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from sqlmodel import select

from producer import CallbackQueue, Producer, Result
from shared.models import Batch, BatchState, Request, utcnow
from shared.providers.local import LocalProvider
from shared.redis_layout import buffer_name, pending_ids
from shared.schemas import DEFAULT_PROVIDER
from tests.conftest import run_local_jobs
from tests.conftest import submit_requests as submit
from worker import collection
from worker.collection import collect_batch, collect_ready_batches, parse_result_line
from worker.context import WorkerContext
from worker.lifecycle import submit_batch, submit_ready_batches
from worker.packing import pack_due_buffers
from worker.polling import poll_due_batches
from worker.reaper import reconcile_requeued_rows

MESSAGES = [{"role": "user", "content": "Is 'great value' positive?"}]


def local(ctx: WorkerContext) -> LocalProvider:
    provider = ctx.provider("local")
    assert isinstance(provider, LocalProvider)
    return provider


def drive(ctx: WorkerContext) -> None:
    """One pass of every periodic step, with the local jobs run in between."""
    pack_due_buffers(ctx)
    submit_ready_batches(ctx)
    run_local_jobs(ctx)
    time.sleep(0.02)
    poll_due_batches(ctx)
    collect_ready_batches(ctx)


def delivered(ctx: WorkerContext) -> list[Result]:
    queue = CallbackQueue("svc", settings=ctx.settings, client=ctx.redis)
    results = []
    while (delivery := queue.get(timeout=0.05)) is not None:
        results.append(delivery.result)
        delivery.ack()
    return results


def test_a_batch_goes_from_buffer_to_callback_queue(ctx: WorkerContext) -> None:
    ids = submit(ctx, 10)
    drive(ctx)
    results = delivered(ctx)
    assert sorted(r.request_id for r in results) == sorted(ids)
    assert {r.status for r in results} == {"completed"}
    assert all(r.usage and r.usage["total_tokens"] > 0 for r in results)
    assert {r.attempts for r in results} == {1}
    with ctx.session() as session:
        (batch,) = session.exec(select(Batch))
        rows = list(session.exec(select(Request)))
    assert batch.state == BatchState.FINISHED and batch.outcome == "completed"
    assert batch.completed_count == 10 and batch.prompt_tokens > 0
    assert {r.state for r in rows} == {"completed"}
    # the input file and downloads are cleaned up once the batch is finished
    assert not Path(batch.file_path).exists()
    assert list(ctx.results_dir.iterdir()) == []


def test_collecting_again_after_a_crash_delivers_nothing_twice(
    ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a collector that dies after fanning out but before finishing the batch
    submit(ctx, 10)
    pack_due_buffers(ctx)
    submit_ready_batches(ctx)
    run_local_jobs(ctx)
    time.sleep(0.02)
    poll_due_batches(ctx)

    def crash(*_a: object, **_k: object) -> None:
        raise RuntimeError("worker lost")

    with monkeypatch.context() as patch:
        patch.setattr(collection, "_finish_batch", crash)
        assert collect_ready_batches(ctx) == []  # the error is recorded, not raised
    first = delivered(ctx)
    with ctx.session() as session:
        (batch,) = session.exec(select(Batch))
    assert batch.state == BatchState.COLLECTING and "worker lost" in (batch.error or "")
    # ...and the batch backs off before the next try
    assert batch.collect_failures == 1 and batch.next_poll_at is not None
    assert collect_ready_batches(ctx) == []

    # When the collection runs again (once the backoff is over)
    assert collect_batch(ctx, batch.id) is True

    # Then nothing more is delivered and the batch is finished
    assert len(first) == 10
    assert delivered(ctx) == []
    with ctx.session() as session:
        (batch,) = session.exec(select(Batch))
    assert batch.state == BatchState.FINISHED and batch.completed_count == 10


def run_with_line_error(ctx: WorkerContext, request_id: str, error: dict[str, str]) -> None:
    """One pass of the pipeline in which the provider fails ``request_id`` with ``error``."""
    pack_due_buffers(ctx)
    submit_ready_batches(ctx)
    run_local_jobs(ctx)
    rewrite_result(ctx, request_id, error)
    time.sleep(0.02)
    poll_due_batches(ctx)
    collect_ready_batches(ctx)


def rewrite_result(ctx: WorkerContext, request_id: str, error: dict[str, str]) -> None:
    """Move one request's line from its job's output file to its error file, as a failure."""
    provider = local(ctx)
    job = max(provider.store.list_jobs(), key=lambda j: j.created_at)
    assert job.output_file_id and job.error_file_id
    out = provider.store.file_path(job.output_file_id)
    kept = [ln for ln in out.read_bytes().splitlines() if request_id.encode() not in ln]
    out.write_bytes(b"".join(ln + b"\n" for ln in kept))
    err = provider.store.file_path(job.error_file_id)
    line = orjson.dumps({"custom_id": request_id, "error": error})
    err.write_bytes(err.read_bytes() + line + b"\n")


def test_retryable_line_error_requeues_until_attempts_run_out(ctx: WorkerContext) -> None:
    ctx.settings = ctx.settings.model_copy(update={"max_attempts": 2, "max_wait_seconds": 0.01})
    ids = submit(ctx, 10)
    victim = ids[3]
    for attempt in (1, 2):
        run_with_line_error(ctx, victim, {"code": "rate_limit", "message": "slow down"})
        results = {r.request_id: r for r in delivered(ctx)}
        if attempt == 1:
            # the other nine are done; the victim is pending again for another batch
            assert len(results) == 9 and victim not in results
            assert pending_ids(ctx.redis, ctx.keys, buffer_name(DEFAULT_PROVIDER, "m-a")) == [
                victim
            ]
    # After the second failure it is out of attempts and fails with the provider's reason
    assert set(results) == {victim}
    failed = results[victim]
    assert failed.status == "failed" and failed.attempts == 2
    assert failed.error is not None and failed.error.code == "rate_limit"
    with ctx.session() as session:
        row = session.get(Request, victim)
    assert row is not None and (row.state, row.attempts, row.error_code) == (
        "failed",
        2,
        "rate_limit",
    )


def test_permanent_line_error_fails_the_request_at_once(ctx: WorkerContext) -> None:
    ids = submit(ctx, 10)
    run_with_line_error(ctx, ids[0], {"code": "invalid_request", "message": "bad body"})
    results = {r.request_id: r for r in delivered(ctx)}
    assert len(results) == 10
    assert results[ids[0]].status == "failed"
    assert results[ids[0]].error is not None and results[ids[0]].error.message == "bad body"


def test_cancelled_batch_gives_every_request_a_cancelled_result(ctx: WorkerContext) -> None:
    ids = submit(ctx, 10)
    pack_due_buffers(ctx)
    submit_ready_batches(ctx)
    with ctx.session() as session:
        (batch,) = session.exec(select(Batch))
    assert batch.provider_batch_id is not None
    local(ctx).cancel_batch(batch.provider_batch_id)
    time.sleep(0.02)
    poll_due_batches(ctx)
    collect_ready_batches(ctx)
    results = delivered(ctx)
    assert sorted(r.request_id for r in results) == sorted(ids)
    assert {(r.status, r.error.code if r.error else None) for r in results} == {
        ("cancelled", "batch_cancelled")
    }


def test_a_create_that_happened_before_a_crash_is_adopted_not_repeated(
    ctx: WorkerContext,
) -> None:
    # Given a batch whose create reached the provider but whose SQL update was lost
    submit(ctx, 10)
    (packed,) = pack_due_buffers(ctx)
    provider = local(ctx)
    file_id = provider.upload_file(packed.path)
    job = provider.create_batch(file_id, model="m-a")
    with ctx.session() as session:
        batch = session.get(Batch, packed.id)
        assert batch is not None
        batch.state, batch.provider_file_id, batch.submit_attempts = "uploaded", file_id, 1
        session.add(batch)
        session.commit()

    # When the submitter runs again
    assert submit_batch(ctx, packed.id) is True

    # Then it adopts the existing job instead of creating (and paying for) a second one
    with ctx.session() as session:
        batch = session.get(Batch, packed.id)
    assert batch is not None and batch.provider_batch_id == job.id
    assert len(provider.list_batches()) == 1


def test_a_worker_without_the_batch_file_rebuilds_it_byte_for_byte_from_redis(
    ctx: WorkerContext,
) -> None:
    # Given a packed batch whose file this worker does not have (another worker packed it)
    ctx.settings = ctx.settings.model_copy(update={"max_wait_seconds": 0.01})
    ids = submit(ctx, 10)
    (packed,) = pack_due_buffers(ctx)
    original = packed.path.read_bytes()
    packed.path.unlink()

    # When it is submitted
    submit_ready_batches(ctx)

    # Then the provider received exactly the bytes the packer wrote
    with ctx.session() as session:
        batch = session.get(Batch, packed.id)
    assert batch is not None and batch.state == BatchState.SUBMITTED, batch
    provider = ctx.provider("local")
    assert isinstance(provider, LocalProvider)
    job = provider.store.get_job(batch.provider_batch_id or "")
    assert provider.store.file_path(job.input_file_id).read_bytes() == original

    # And its requests complete as usual
    drive(ctx)
    assert sorted(r.request_id for r in delivered(ctx)) == sorted(ids)


def test_a_batch_file_that_cannot_be_rebuilt_sends_its_requests_round_again(
    ctx: WorkerContext,
) -> None:
    # Given a packed batch whose file this worker lacks, and one of whose bodies Redis lost
    ctx.settings = ctx.settings.model_copy(update={"max_wait_seconds": 0.01})
    ids = submit(ctx, 10)
    (packed,) = pack_due_buffers(ctx)
    packed.path.unlink()
    buf = buffer_name(DEFAULT_PROVIDER, "m-a")
    ctx.redis.hdel(ctx.keys.bodies(buf), ids[3])

    # When it is submitted and collected
    submit_ready_batches(ctx)
    collect_ready_batches(ctx)

    # Then nothing was sent, the batch says why, and its requests went back to their buffer
    assert delivered(ctx) == []
    with ctx.session() as session:
        batch = session.get(Batch, packed.id)
    assert batch is not None and batch.state == BatchState.FINISHED
    assert batch.outcome == "unsent" and "rebuilt from Redis" in (batch.error or "")
    assert batch.requeued_count == 10
    provider = ctx.provider("local")
    assert isinstance(provider, LocalProvider)
    assert provider.list_batches() == []

    # And the next round packs the others again and completes them
    drive(ctx)
    done = {r.request_id for r in delivered(ctx) if r.status == "completed"}
    assert done == set(ids) - {ids[3]}


def test_result_lines_are_read_in_both_providers_shapes() -> None:
    ok = parse_result_line("a", {"response": {"status_code": 200, "body": {"id": "x"}}})
    assert ok.status == "completed" and ok.response == {"id": "x"}
    together_error = parse_result_line("b", {"error": {"message": "m", "code": "timeout"}})
    assert together_error.error is not None and together_error.retryable
    openai_error = parse_result_line(
        "c",
        {
            "response": {"status_code": 400, "body": {"error": {"message": "too long"}}},
            "error": None,
        },
    )
    assert openai_error.status == "failed" and openai_error.error is not None
    assert (openai_error.error.code, openai_error.error.message) == ("http_400", "too long")
    assert not openai_error.retryable


def test_collect_batch_ignores_a_batch_not_ready_for_collection(ctx: WorkerContext) -> None:
    submit(ctx, 10)
    (packed,) = pack_due_buffers(ctx)
    assert collect_batch(ctx, packed.id) is False
    assert collect_batch(ctx, "no-such-batch") is False


def test_a_batch_the_provider_lost_sends_its_requests_round_again(ctx: WorkerContext) -> None:
    # Given a submitted batch whose job the provider no longer knows (404 on poll), past the
    # grace that keeps a brief outage from re-running (and re-billing) it
    ctx.settings = ctx.settings.model_copy(
        update={"max_wait_seconds": 0.01, "lost_job_grace_seconds": 0.0}
    )
    ids = submit(ctx, 10)
    pack_due_buffers(ctx)
    submit_ready_batches(ctx)
    provider = local(ctx)
    for job in provider.store.list_jobs():
        (provider.store.root / "jobs" / f"{job.id}.json").unlink()
    time.sleep(0.02)

    # When it is polled (the list confirms the job is gone, its input file is there) and collected
    with ctx.session() as session:
        assert session.exec(select(Batch)).one().state == BatchState.SUBMITTED
    poll_due_batches(ctx)
    collect_ready_batches(ctx)

    # Then nothing is delivered yet and every request is pending again for a new batch
    assert delivered(ctx) == []
    pending = pending_ids(ctx.redis, ctx.keys, buffer_name(DEFAULT_PROVIDER, "m-a"))
    assert sorted(pending) == sorted(ids)
    with ctx.session() as session:
        (batch,) = session.exec(select(Batch))
    assert (batch.state, batch.outcome, batch.requeued_count) == ("finished", "lost", 10)

    # And the next round completes them
    drive(ctx)
    assert sorted(r.request_id for r in delivered(ctx)) == sorted(ids)


def test_a_batch_that_keeps_failing_does_not_stall_the_others(ctx: WorkerContext) -> None:
    # Given an older batch for a provider this worker cannot build (no Together key)
    producer = Producer(settings=ctx.settings, client=ctx.redis)
    stuck = producer.submit_many(
        [{"model": "m-t", "messages": MESSAGES, "provider": "together", "callback_queue": "svc"}]
        * 10
    )
    pack_due_buffers(ctx)
    ids = submit(ctx, 10)

    # When the pipeline runs
    drive(ctx)

    # Then the local batch completes, and the stuck one is held (its requests never ran, so
    # they are not failed) saying why
    results = {r.request_id: r for r in delivered(ctx)}
    assert set(results) == set(ids)
    assert all(results[i].status == "completed" for i in ids)
    with ctx.session() as session:
        held = session.exec(select(Batch).where(Batch.provider == "together")).one()
    assert held.state == BatchState.PACKED and held.held_since is not None
    assert "TOGETHER_API_KEY" in (held.error or "")
    assert {h.status() for h in stuck} == {"batched"}


def test_line_level_http_429_is_retried(ctx: WorkerContext) -> None:
    ctx.settings = ctx.settings.model_copy(update={"max_wait_seconds": 0.01})
    ids = submit(ctx, 10)
    pack_due_buffers(ctx)
    submit_ready_batches(ctx)
    run_local_jobs(ctx)
    provider = local(ctx)
    job = max(provider.store.list_jobs(), key=lambda j: j.created_at)
    assert job.output_file_id
    out = provider.store.file_path(job.output_file_id)
    lines = out.read_bytes().splitlines()
    victim = orjson.loads(lines[0])
    victim["response"] = {"status_code": 429, "body": {"error": {"message": "slow down"}}}
    out.write_bytes(b"\n".join([orjson.dumps(victim), *lines[1:]]) + b"\n")
    time.sleep(0.02)
    poll_due_batches(ctx)
    collect_ready_batches(ctx)
    first = {r.request_id for r in delivered(ctx)}
    assert victim["custom_id"] not in first and len(first) == 9
    drive(ctx)
    (again,) = delivered(ctx)
    assert again.request_id == victim["custom_id"] and again.status == "completed"
    assert again.attempts == 2 and set(ids) == first | {again.request_id}


def test_cancelled_result_carries_the_request_metadata(ctx: WorkerContext) -> None:
    producer = Producer(settings=ctx.settings, client=ctx.redis)
    handle = producer.submit("m-a", MESSAGES, callback_queue="svc", metadata={"order": 7})
    assert handle.cancel()
    (result,) = delivered(ctx)
    assert result.status == "cancelled" and result.metadata == {"order": 7}


def test_cancelling_a_requeued_request_reaches_the_record(ctx: WorkerContext) -> None:
    # Given a request sent round again after a retryable line error
    ids = submit(ctx, 10)
    run_with_line_error(ctx, ids[0], {"code": "rate_limit", "message": "slow down"})
    assert len(delivered(ctx)) == 9

    # When its producer cancels it (in Redis) and the reaper's reconciliation runs
    assert Producer(settings=ctx.settings, client=ctx.redis).cancel(ids[0])
    assert reconcile_requeued_rows(ctx) == 1

    # Then the SQL record says cancelled too, finished (so retention can prune it) with the
    # cancel's error, not the line error it was sent round for; and the result was delivered
    # once
    with ctx.session() as session:
        row = session.get(Request, ids[0])
    assert row is not None and row.state == "cancelled"
    (result,) = delivered(ctx)
    assert result.request_id == ids[0] and result.status == "cancelled"
    assert result.error is not None
    assert (row.error_code, row.error_message) == ("cancelled", result.error.message)
    assert row.finished_at is not None
    assert reconcile_requeued_rows(ctx) == 0


def test_an_unexpected_error_on_one_batch_is_recorded_and_backed_off(
    ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given two packed batches, the older of which makes the provider crash on upload
    submit(ctx, 10)
    submit(ctx, 10)
    first, second = pack_due_buffers(ctx)
    provider = local(ctx)
    original = provider.upload_file

    def flaky(path: Path) -> str:
        if path == first.path:
            raise RuntimeError("disk read error")
        return original(path)

    monkeypatch.setattr(provider, "upload_file", flaky)

    # When the submitter runs
    submitted = submit_ready_batches(ctx)

    # Then the other batch goes ahead, and the failing one records why and waits to retry
    assert submitted == [second.id]
    with ctx.session() as session:
        stuck = session.get(Batch, first.id)
    assert stuck is not None and stuck.state == BatchState.PACKED
    assert "disk read error" in (stuck.error or "") and stuck.submit_attempts == 1
    assert stuck.next_poll_at is not None and stuck.next_poll_at > utcnow()
    assert submit_ready_batches(ctx) == []  # not retried before its backoff is over


def only_batch(ctx: WorkerContext) -> Batch:
    with ctx.session() as session:
        return session.exec(select(Batch)).one()


def passed_by_while_leased(ctx: WorkerContext, step: Callable[[WorkerContext], list[str]]) -> str:
    """Run ``step`` while someone else holds the only batch's lease; the batch's id."""
    batch_id = only_batch(ctx).id
    # Someone else (the reconciler checking the batch, say) holds its lease ...
    with ctx.lease(f"batch:{batch_id}") as held:
        assert held
        # ... when the step takes the batch, and has to pass it by
        assert step(ctx) == []
    return batch_id


def test_a_batch_taken_while_another_holds_its_lease_is_submitted_once_it_is_free(
    ctx: WorkerContext,
) -> None:
    # Given a packed batch that a submit pass took while its lease was held elsewhere
    submit(ctx, 3)
    pack_due_buffers(ctx, force=True)
    batch_id = passed_by_while_leased(ctx, submit_ready_batches)
    # When the next pass runs, the lease free
    submitted = submit_ready_batches(ctx)
    # Then it submits the batch: taking it did not push it a whole LEASE_SECONDS ahead
    assert submitted == [batch_id]
    assert only_batch(ctx).state == BatchState.SUBMITTED


def test_a_batch_taken_while_another_holds_its_lease_is_polled_once_it_is_free(
    ctx: WorkerContext,
) -> None:
    # Given a submitted batch whose job has finished, taken by a poll pass while its lease
    # was held elsewhere
    submit(ctx, 3)
    pack_due_buffers(ctx, force=True)
    submit_ready_batches(ctx)
    run_local_jobs(ctx)
    time.sleep(0.02)  # past its next poll time (POLL_INTERVAL_SECONDS is 0.01 here)
    batch_id = passed_by_while_leased(ctx, poll_due_batches)
    # When the next pass runs, the lease free
    finished = poll_due_batches(ctx)
    # Then it finds the batch finished, without waiting out a lease
    assert finished == [batch_id]
    assert only_batch(ctx).state == BatchState.COLLECTING
