"""After a result's Redis TTL, producers and the CLI read it from the SQL record."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import orjson

from producer import AsyncProducer, Producer, Result
from tests.conftest import drive_pipeline
from tests.conftest import submit_requests as submit
from worker.cancellation import record_unbatched
from worker.context import WorkerContext

MESSAGES = [{"role": "user", "content": "Is 'great value' positive?"}]


def expire_in_redis(ctx: WorkerContext, request_id: str) -> None:
    """Let the request's Redis TTL run out now (as RESULT_TTL_SECONDS would, later)."""
    ctx.redis.pexpire(ctx.keys.request(request_id), 1)
    time.sleep(0.01)
    assert not ctx.redis.exists(ctx.keys.request(request_id))


def test_a_result_past_its_redis_ttl_comes_from_the_record(ctx: WorkerContext) -> None:
    # Given a completed request, and a cancelled one, whose Redis hashes have expired
    producer = Producer(settings=ctx.settings, client=ctx.redis)
    ids = submit(ctx, 2)
    drive_pipeline(ctx)
    before = producer.result(ids[0])
    cancelled = producer.submit("m-a", MESSAGES, metadata={"k": 1})
    assert cancelled.cancel()
    assert record_unbatched(ctx) == 1
    for request_id in (ids[0], cancelled.id):
        expire_in_redis(ctx, request_id)

    # When the producer asks after them
    # Then it reads the very result that was delivered, and the state, from SQL
    assert before is not None and producer.result(ids[0]) == before
    assert producer.state(ids[0]) == "completed"
    handle = producer.submit("m-a", MESSAGES)  # a handle, to wait on an old id through it
    handle.id = ids[0]
    assert handle.wait(timeout=2) == before
    gone = producer.result(cancelled.id)
    assert gone is not None and gone.status == "cancelled" and gone.metadata == {"k": 1}
    assert producer.try_cancel(ids[0]) == ("finished", "completed")
    # And an id nobody knows is still unknown
    assert producer.state("0" * 32) == "unknown" and producer.result("0" * 32) is None


def test_the_async_producer_and_the_cli_read_the_record_too(ctx: WorkerContext) -> None:
    # Given a completed request whose Redis hash has expired
    (request_id,) = submit(ctx, 1)
    drive_pipeline(ctx)
    delivered = Producer(settings=ctx.settings, client=ctx.redis).result(request_id)
    expire_in_redis(ctx, request_id)

    # When the async producer asks
    async def ask() -> tuple[Result | None, str]:
        async with AsyncProducer(settings=ctx.settings) as producer:
            return await producer.result(request_id), await producer.state(request_id)

    # Then it gets it from the record
    assert asyncio.run(ask()) == (delivered, "completed")

    # And `batchbridge result` prints it
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHBRIDGE_")}
    env["BATCHBRIDGE_REDIS_URL"] = ctx.settings.configured_redis_url or ""
    env["BATCHBRIDGE_DATABASE_URL"] = ctx.settings.sqlalchemy_url
    env["BATCHBRIDGE_DATA_DIR"] = str(ctx.settings.data_dir)
    shown = subprocess.run(
        [sys.executable, "-m", "worker.cli", "result", request_id],
        env=env,
        capture_output=True,
        check=True,
        timeout=60,
    )
    assert delivered is not None
    assert Result.model_validate(orjson.loads(shown.stdout)) == delivered
    missing = subprocess.run(
        [sys.executable, "-m", "worker.cli", "result", "f" * 32],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert missing.returncode == 1 and b"no result yet (state: unknown)" in missing.stderr
