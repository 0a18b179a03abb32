"""The asyncio producer keeps the sync producer's guarantees against a real Redis."""

from __future__ import annotations

import asyncio

import pytest
from redis import Redis

from producer import AsyncProducer, InvalidRequest, PartialSubmitError, Producer
from shared.redis_layout import Keys, buffer_name, pending_ids
from shared.schemas import DEFAULT_PROVIDER
from shared.settings import Settings

MESSAGES = [{"role": "user", "content": "Positive or negative: 'lovely'"}]


def test_async_submit_is_idempotent_validates_and_cancels(
    settings: Settings, redis_client: Redis
) -> None:
    async def scenario() -> tuple[str, str, list[str], str]:
        async with AsyncProducer(settings=settings) as producer:
            first = await producer.submit("m-a", MESSAGES, idempotency_key="k1", max_tokens=3)
            again = await producer.submit("m-a", MESSAGES, idempotency_key="k1", max_tokens=3)
            many = await producer.submit_many(
                [{"model": "m-a", "messages": MESSAGES, "callback_queue": "svc"}] * 3
            )
            with pytest.raises(InvalidRequest) as err:
                await producer.submit_many([{"model": "m-a", "messages": []}])
            assert err.value.field == "requests[0].messages"
            with pytest.raises(InvalidRequest) as err:
                await producer.submit_many([{"model": "m-a", "messages": MESSAGES}, None])  # type: ignore[list-item]
            assert err.value.field == "requests[1]"
            assert await many[0].cancel()
            result = await many[0].wait(timeout=1)
            assert result.status == "cancelled"
            return first.id, again.id, [h.id for h in many], await many[1].status()

    first, again, many, status = asyncio.run(scenario())
    assert first == again
    assert status == "pending"
    pending = pending_ids(redis_client, Keys(), buffer_name(DEFAULT_PROVIDER, "m-a"))
    assert pending == [first, many[1], many[2]]
    # the sync producer sees the same requests
    assert Producer(settings=settings).state(many[0]) == "cancelled"


def test_async_wait_times_out(settings: Settings) -> None:
    async def scenario() -> None:
        async with AsyncProducer(settings=settings) as producer:
            handle = await producer.submit("m-a", MESSAGES)
            with pytest.raises(TimeoutError):
                await handle.wait(timeout=0.1)

    asyncio.run(scenario())


def test_a_refused_chunk_reports_which_requests_were_stored(
    settings: Settings, redis_client: Redis
) -> None:
    # Given a Redis that runs out of memory part-way through a large submit_many
    async def scenario() -> PartialSubmitError:
        async with AsyncProducer(settings=settings) as producer:
            await producer.submit("m-a", MESSAGES)  # loads the script while memory allows
            used = int(redis_client.info("memory")["used_memory"])
            redis_client.config_set("maxmemory", used + 2_000_000)
            big = [{"role": "user", "content": "x" * 900}]
            try:
                await producer.submit_many([{"model": "m-a", "messages": big}] * 3000)
            except PartialSubmitError as exc:
                return exc
            raise AssertionError("Redis accepted everything")

    try:
        err = asyncio.run(scenario())
    finally:
        redis_client.config_set("maxmemory", 0)
    # Then the handles say exactly which requests are in the buffer
    stored = {h.id for h in err.handles if h is not None}
    assert 0 < len(stored) < 3000
    pending = pending_ids(redis_client, Keys(), buffer_name(DEFAULT_PROVIDER, "m-a"))
    assert stored <= set(pending)
    assert len(pending) == len(stored) + 1
