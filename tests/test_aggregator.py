"""Aggregator scenarios: flush thresholds, the batch file, crash-safe claims and the reaper."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlmodel import select

from producer import Producer
from shared.limits import MAX_CUSTOM_ID_CHARS
from shared.models import Batch, BatchState, Request
from shared.redis_layout import buffer_name, pending_ids
from shared.schemas import DEFAULT_PROVIDER
from worker import packing
from worker.context import WorkerContext
from worker.packing import pack_buffer, pack_due_buffers
from worker.reaper import reap_abandoned_claims

MESSAGES = [{"role": "user", "content": "Label this: 'fine product'"}]


def with_settings(ctx: WorkerContext, **changes: object) -> WorkerContext:
    """The same context with some settings changed."""
    ctx.settings = ctx.settings.model_copy(update=changes)
    return ctx


def submit(ctx: WorkerContext, n: int, model: str = "m-a", **fields: object) -> list[str]:
    producer = Producer(settings=ctx.settings, client=ctx.redis)
    handles = producer.submit_many([{"model": model, "messages": MESSAGES, **fields}] * n)
    return [h.id for h in handles]


def read_lines(path: Path) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_nothing_is_packed_before_a_threshold_is_reached(worker_context: WorkerContext) -> None:
    ctx = with_settings(worker_context, max_batch_requests=10, max_wait_seconds=60)
    submit(ctx, 9)
    assert pack_due_buffers(ctx) == []
    assert len(pending_ids(ctx.redis, ctx.keys, buffer_name(DEFAULT_PROVIDER, "m-a"))) == 9


def test_count_threshold_packs_full_batches_and_leaves_the_rest(
    worker_context: WorkerContext,
) -> None:
    # Given 25 requests and batches of at most 10
    ctx = with_settings(worker_context, max_batch_requests=10, max_wait_seconds=60)
    ids = submit(ctx, 25)

    # When the aggregator runs
    packed = pack_due_buffers(ctx)

    # Then two full batches are packed, oldest requests first, and 5 stay pending
    assert [(b.request_count, b.reason) for b in packed] == [(10, "count"), (10, "count")]
    assert len(pending_ids(ctx.redis, ctx.keys, buffer_name(DEFAULT_PROVIDER, "m-a"))) == 5
    lines = read_lines(packed[0].path) + read_lines(packed[1].path)
    assert sorted(line["custom_id"] for line in lines) == sorted(ids[:20])  # type: ignore[type-var]
    # and the buffer's byte count is exactly what the 5 remaining lines will take
    line_size = (packed[0].bytes + packed[1].bytes) // 20
    assert (
        int(ctx.redis.hget(ctx.keys.buffers, buffer_name(DEFAULT_PROVIDER, "m-a"))) == 5 * line_size
    )  # type: ignore[arg-type]


def test_batch_file_is_together_jsonl_with_short_unique_custom_ids(
    worker_context: WorkerContext,
) -> None:
    ctx = with_settings(worker_context, max_batch_requests=50)
    ids = submit(ctx, 50, max_tokens=7, temperature=0.2)
    (batch,) = pack_due_buffers(ctx)
    lines = read_lines(batch.path)
    assert [line["custom_id"] for line in lines] == ids
    for line in lines:
        assert set(line) == {"custom_id", "body"}
        assert len(str(line["custom_id"])) <= MAX_CUSTOM_ID_CHARS
        assert line["body"] == {
            "model": "m-a",
            "messages": MESSAGES,
            "max_tokens": 7,
            "temperature": 0.2,
        }
    assert batch.bytes == batch.path.stat().st_size


def test_bytes_threshold_cuts_batches_under_the_byte_limit(
    worker_context: WorkerContext,
) -> None:
    ctx = with_settings(worker_context, max_batch_requests=1000, max_batch_bytes=2048)
    submit(ctx, 40)
    packed = pack_due_buffers(ctx)
    assert len(packed) >= 2
    assert all(b.bytes <= 2048 for b in packed)
    assert {b.reason for b in packed} == {"bytes"}


def test_metadata_counts_toward_the_batch_byte_limit(worker_context: WorkerContext) -> None:
    # Given batches of at most 2,048 bytes and requests whose metadata outweighs their line
    ctx = with_settings(worker_context, max_batch_requests=1000, max_batch_bytes=2048)
    submit(ctx, 12, metadata={"pad": "x" * 400})
    # (identical requests, so each weighs a twelfth of the buffer)
    size = int(ctx.redis.hget(ctx.keys.buffers, buffer_name(DEFAULT_PROVIDER, "m-a"))) // 12  # type: ignore[arg-type]

    # When the aggregator runs
    packed = pack_due_buffers(ctx)

    # Then batches are cut by line plus metadata bytes, and record their file's exact length
    assert packed and {b.reason for b in packed} == {"bytes"}
    assert all(b.request_count * size <= 2048 for b in packed)
    assert all(b.bytes == b.path.stat().st_size < b.request_count * size for b in packed)


def test_age_threshold_flushes_a_small_buffer(worker_context: WorkerContext) -> None:
    ctx = with_settings(worker_context, max_batch_requests=1000, max_wait_seconds=1.0)
    submit(ctx, 3)
    assert pack_due_buffers(ctx) == []
    time.sleep(1.05)
    (batch,) = pack_due_buffers(ctx)
    assert (batch.request_count, batch.reason) == (3, "age")


def test_buffers_are_per_provider_and_model(worker_context: WorkerContext) -> None:
    ctx = with_settings(worker_context, max_batch_requests=5)
    submit(ctx, 5, model="m-a")
    submit(ctx, 5, model="m-b")
    packed = pack_due_buffers(ctx)
    assert sorted((b.model, b.request_count) for b in packed) == [("m-a", 5), ("m-b", 5)]
    for batch in packed:
        assert {line["body"]["model"] for line in read_lines(batch.path)} == {batch.model}  # type: ignore[index]


def test_packing_records_batch_and_requests_in_sql(worker_context: WorkerContext) -> None:
    ctx = with_settings(worker_context, max_batch_requests=4)
    ids = submit(ctx, 4, callback_queue="svc")
    (packed,) = pack_due_buffers(ctx)
    with ctx.session() as session:
        batch = session.get(Batch, packed.id)
        rows = list(session.exec(select(Request).where(Request.batch_id == packed.id)))
    assert batch is not None and batch.state == BatchState.PACKED
    assert batch.request_count == 4 and batch.file_path == str(packed.path)
    assert sorted(r.id for r in rows) == sorted(ids)
    assert {(r.state, r.attempts, r.callback_queue) for r in rows} == {("batched", 1, "svc")}
    # and the claim is gone from Redis once the record is committed
    assert ctx.redis.zcard(ctx.keys.claims) == 0


def test_a_claim_abandoned_mid_pack_goes_back_to_the_buffer(
    worker_context: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a packer that dies after claiming but before committing its file
    ctx = with_settings(worker_context, max_batch_requests=6, claim_timeout_seconds=0.1)
    ids = submit(ctx, 6)

    def crash(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt("packer killed")

    with monkeypatch.context() as patch:
        patch.setattr(packing, "write_batch_file", crash)
        with pytest.raises(KeyboardInterrupt):
            pack_buffer(ctx, buffer_name(DEFAULT_PROVIDER, "m-a"))
    buf = buffer_name(DEFAULT_PROVIDER, "m-a")
    assert pending_ids(ctx.redis, ctx.keys, buf) == [] and ctx.redis.zcard(ctx.keys.claims) == 1

    # When the reaper runs after the claim timeout
    time.sleep(0.15)
    returned = reap_abandoned_claims(ctx)

    # Then every request is pending again, with its original age, and can be packed
    assert returned == 6
    assert pending_ids(ctx.redis, ctx.keys, buf) == ids
    assert ctx.redis.zcard(ctx.keys.claims) == 0
    (batch,) = pack_due_buffers(ctx)
    assert batch.request_count == 6
    with ctx.session() as session:
        states = {b.state for b in session.exec(select(Batch))}
    assert states == {BatchState.ABANDONED, BatchState.PACKED}


def test_a_slow_packer_loses_to_the_reaper_without_duplicating_requests(
    worker_context: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a claim the reaper gives up on before its packer got to record it
    ctx = with_settings(worker_context, max_batch_requests=3, claim_timeout_seconds=0.05)
    submit(ctx, 3)
    original = packing.request_rows

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.1)
        reap_abandoned_claims(ctx)
        return original(*args, **kwargs)

    monkeypatch.setattr(packing, "request_rows", slow)
    result = pack_buffer(ctx, buffer_name(DEFAULT_PROVIDER, "m-a"))

    # Then the packer's commit fails, its file is dropped, and the requests are pending once
    assert result is None
    assert len(pending_ids(ctx.redis, ctx.keys, buffer_name(DEFAULT_PROVIDER, "m-a"))) == 3
    assert list((ctx.batch_dir / "local").glob("*.jsonl")) == []


def test_reaper_only_drops_leftover_keys_of_a_committed_claim(
    worker_context: WorkerContext,
) -> None:
    ctx = with_settings(worker_context, max_batch_requests=2, claim_timeout_seconds=0.05)
    submit(ctx, 2)
    (batch,) = pack_due_buffers(ctx)
    # Simulate a crash between the SQL commit and dropping the claim keys.
    ctx.redis.zadd(ctx.keys.claims, {batch.id: 0})
    ctx.redis.hset(
        ctx.keys.claim(batch.id), mapping={"buf": buffer_name(DEFAULT_PROVIDER, "m-a"), "count": 2}
    )
    assert reap_abandoned_claims(ctx) == 0
    assert ctx.redis.zcard(ctx.keys.claims) == 0
    assert pending_ids(ctx.redis, ctx.keys, buffer_name(DEFAULT_PROVIDER, "m-a")) == []
    with ctx.session() as session:
        assert session.get(Batch, batch.id).state == BatchState.PACKED  # type: ignore[union-attr]


def test_a_reap_that_died_after_its_tombstone_is_finished_by_the_next(
    worker_context: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a reaper that recorded its tombstone and died before unclaiming
    ctx = with_settings(worker_context, max_batch_requests=4, claim_timeout_seconds=0.05)
    ids = submit(ctx, 4)
    with monkeypatch.context() as patch:
        patch.setattr(packing, "write_batch_file", _crash)
        with pytest.raises(KeyboardInterrupt):
            pack_buffer(ctx, buffer_name(DEFAULT_PROVIDER, "m-a"))
    time.sleep(0.06)
    original = ctx.scripts.run

    def die_on_unclaim(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "unclaim":
            raise KeyboardInterrupt("reaper killed")
        return original(name, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(ctx.scripts, "run", die_on_unclaim)
        with pytest.raises(KeyboardInterrupt):
            reap_abandoned_claims(ctx)

    # When the next reap runs
    assert reap_abandoned_claims(ctx) == 4

    # Then the requests are pending again rather than stranded
    pending = pending_ids(ctx.redis, ctx.keys, buffer_name(DEFAULT_PROVIDER, "m-a"))
    assert sorted(pending) == sorted(ids)


def _crash(*_args: object, **_kwargs: object) -> None:
    raise KeyboardInterrupt("packer killed")


def test_ages_are_measured_on_the_redis_clock_not_the_hosts(
    ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a producer and a packer whose clocks run an hour ahead of the Redis server's
    import producer.protocol
    from shared.redis_layout import server_time_ms

    ahead = time.time() + 3600
    monkeypatch.setattr(producer.protocol.time, "time", lambda: ahead)
    monkeypatch.setattr(packing.time, "time", lambda: ahead)
    ctx = with_settings(ctx, max_wait_seconds=300.0)

    # When a request is submitted and the aggregator looks at its buffer at once
    (request_id,) = submit(ctx, 1)
    enq = int(ctx.redis.hget(ctx.keys.request(request_id), "enq") or 0)

    # Then its enqueue time is the server's, and it is not (wrongly) an hour old
    assert abs(enq - server_time_ms(ctx.redis)) < 5000
    assert pack_buffer(ctx, buffer_name(DEFAULT_PROVIDER, "m-a")) is None


def test_requests_that_left_the_middle_of_a_buffer_are_skipped_by_the_next_claim(
    worker_context: WorkerContext,
) -> None:
    # Given six waiting requests, two of them cancelled from the middle of the buffer
    ctx = with_settings(worker_context, max_batch_requests=3, max_wait_seconds=60)
    buf = buffer_name(DEFAULT_PROVIDER, "m-a")
    ids = submit(ctx, 6)
    producer = Producer(settings=ctx.settings, client=ctx.redis)
    assert producer.cancel(ids[1]) and producer.cancel(ids[2])
    assert pending_ids(ctx.redis, ctx.keys, buf) == [ids[0], *ids[3:]]

    # When the aggregator packs batches of three
    first, rest = pack_due_buffers(ctx, force=True)

    # Then the four still waiting are packed, in their order, past the cancelled ones, and
    # the buffer's list, count and bytes are empty
    assert [line["custom_id"] for line in read_lines(first.path)] == [ids[0], ids[3], ids[4]]
    assert [line["custom_id"] for line in read_lines(rest.path)] == [ids[5]]
    assert ctx.redis.llen(ctx.keys.pending(buf)) == 0
    assert int(ctx.redis.hget(ctx.keys.pending_counts, buf) or 0) == 0
    assert int(ctx.redis.hget(ctx.keys.buffers, buf) or 0) == 0


def test_a_request_listed_twice_in_its_buffer_is_claimed_once(
    worker_context: WorkerContext,
) -> None:
    # Given a waiting request taken back by a batch while its id stays listed (what the
    # reconciler does after Redis lost a claim), then sent round again: listed twice
    ctx = with_settings(worker_context, max_batch_requests=100, max_wait_seconds=60)
    buf = buffer_name(DEFAULT_PROVIDER, "m-a")
    ids = submit(ctx, 3)
    ctx.scripts.run("reclaim_batch", [ctx.keys.buffers], [ctx.keys.base, "b-old", ids[1]])
    ctx.scripts.run("requeue", [ctx.keys.buffers], [ctx.keys.base, "b-old", "1", 60, ids[1]])
    listed = [m.decode() for m in ctx.redis.lrange(ctx.keys.pending(buf), 0, -1)]
    assert listed == [ids[1], ids[0], ids[1], ids[2]]

    # When the aggregator packs the buffer
    (batch,) = pack_due_buffers(ctx, force=True)

    # Then each request is in the batch file once, the one sent round again first
    assert [line["custom_id"] for line in read_lines(batch.path)] == [ids[1], ids[0], ids[2]]
    assert batch.request_count == 3 and ctx.redis.llen(ctx.keys.pending(buf)) == 0
