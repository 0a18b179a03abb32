"""A Redis holding buffers as an older batchbridge kept them is brought to the current layout.

Before pending buffers were lists, a buffer was a sorted set of request ids scored by an
enqueue sequence, and each request hash named its buffer and kept ``seq`` and ``size``.
Workers move such buffers at start (``upgrade_buffers``), so requests submitted before an
upgrade are still packed, once each, and batched ones still go round again.
"""

from __future__ import annotations

import os
import time

import orjson
import pytest
from redis.exceptions import ResponseError

from producer import PartialSubmitError, Producer
from shared.redis_layout import pending_ids, upgrade_buffers
from shared.schemas import LINE_OVERHEAD
from worker.context import WorkerContext
from worker.packing import pack_due_buffers

BUF = "default:m-a"


def old_request(ctx: WorkerContext, seq: int, state: str, batch: str = "") -> tuple[str, int]:
    """Write one request as the older layout did; its id and the size it recorded."""
    request_id = os.urandom(16).hex()  # ids were 32 hex characters
    body = orjson.dumps({"model": "m-a", "messages": [{"role": "user", "content": f"hi {seq}"}]})
    size = LINE_OVERHEAD + len(request_id) + len(body)
    fields = {"state": state, "enq": int(time.time() * 1000), "seq": seq, "size": size, "buf": BUF}
    if batch:
        fields["batch"] = batch
    ctx.redis.hset(ctx.keys.request(request_id), mapping=fields)  # type: ignore[arg-type]
    ctx.redis.hset(ctx.keys.bodies(BUF), request_id, body)
    if state == "pending":
        ctx.redis.zadd(ctx.keys.pending(BUF), {request_id: seq})
        ctx.redis.hincrby(ctx.keys.buffers, BUF, size)
    return request_id, size


def packed_ids(ctx: WorkerContext) -> list[list[str]]:
    batches = pack_due_buffers(ctx, force=True)
    return [
        [orjson.loads(line)["custom_id"] for line in b.path.read_bytes().splitlines()]
        for b in batches
    ]


def test_a_buffer_kept_as_a_sorted_set_is_packed_after_the_upgrade(
    worker_context: WorkerContext,
) -> None:
    # Given three waiting requests and one in a batch, written by the older layout
    ctx = worker_context
    waiting = [old_request(ctx, seq, "pending")[0] for seq in (3, 1, 2)]
    batched, _ = old_request(ctx, 0, "batched", batch="b-old")

    # When a worker starts and upgrades the buffers (twice: a second start changes nothing)
    assert upgrade_buffers(ctx.redis, ctx.scripts, ctx.keys) == 3
    assert upgrade_buffers(ctx.redis, ctx.scripts, ctx.keys) == 0

    # Then the buffer lists them oldest first, counts them, and they are packed once each
    in_order = [waiting[1], waiting[2], waiting[0]]
    assert pending_ids(ctx.redis, ctx.keys, BUF) == in_order
    assert int(ctx.redis.hget(ctx.keys.pending_counts, BUF) or 0) == 3
    assert packed_ids(ctx) == [in_order]
    assert int(ctx.redis.hget(ctx.keys.buffers, BUF) or 0) == 0

    # And the batched one, whose hash still names its buffer, goes round again into it
    requeued = ctx.scripts.run(
        "requeue", [ctx.keys.buffers], [ctx.keys.base, "b-old", "1", 60, batched]
    )
    assert requeued[0] == 1
    assert pending_ids(ctx.redis, ctx.keys, BUF) == [batched]
    assert packed_ids(ctx) == [[batched]]
    assert int(ctx.redis.hget(ctx.keys.buffers, BUF) or 0) == 0


def test_a_producer_refused_by_a_buffer_not_yet_upgraded_stores_nothing(
    ctx: WorkerContext,
) -> None:
    # Given a buffer still kept as a sorted set (the workers have not been upgraded yet)
    old_request(ctx, 1, "pending")
    before = {key: ctx.redis.dump(key) for key in ctx.redis.keys("*")}
    producer = Producer(settings=ctx.settings, client=ctx.redis)
    message = [{"role": "user", "content": "hi"}]

    # When a new producer submits to it, with an idempotency key, alone and in a chunk
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        producer.submit("m-a", message, idempotency_key="order-1", callback_queue="q")
    with pytest.raises(PartialSubmitError):
        producer.submit_many(
            [
                {"model": "m-b", "messages": message, "idempotency_key": "order-2"},
                {"model": "m-a", "messages": message, "idempotency_key": "order-3"},
            ]
        )

    # Then Redis holds exactly what it held: no request hash, key or buffer was written, so
    # a retry after the upgrade makes the request afresh
    assert {key: ctx.redis.dump(key) for key in ctx.redis.keys("*")} == before
    upgrade_buffers(ctx.redis, ctx.scripts, ctx.keys)
    retried = producer.submit("m-a", message, idempotency_key="order-1", callback_queue="q")
    assert retried.id in pending_ids(ctx.redis, ctx.keys, BUF)
