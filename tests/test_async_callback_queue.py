"""The asyncio callback queue keeps the sync queue's guarantees against a real Redis."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from redis import Redis

from producer import AsyncCallbackQueue, CallbackQueue
from shared.redis_layout import CALLBACK_GROUP
from shared.settings import Settings
from tests.test_callback_queue import pending_request_ids
from tests.test_callback_queue_chunks import KEY, VT, command_calls, commands_run, put_results


def test_async_get_many_takes_chunks_in_order_and_ack_many_removes_exactly_those(
    settings: Settings, redis_client: Redis
) -> None:
    # Given five results
    ids = put_results(redis_client, 5)

    # When an asyncio consumer takes chunks of three, acks some, and finds nothing more
    async def scenario() -> tuple[list[str], int, list[Any], float]:
        async with AsyncCallbackQueue("svc", settings=settings) as queue:
            first = await queue.get_many(3, timeout=1)
            rest = await queue.get_many(3, timeout=1)
            acked = await queue.ack_many([first[0], rest[1].delivery_id])
            await first[1].ack()
            started = time.monotonic()
            empty = await queue.get_many(3, timeout=0.3)
            return [d.result.request_id for d in first + rest], acked, empty, started

    seen, acked, empty, started = asyncio.run(scenario())
    waited = time.monotonic() - started

    # Then they came in order, exactly the acked ones are gone, and the wait ended at its time
    assert seen == ids
    assert acked == 2
    assert redis_client.xlen(KEY) == 2
    assert pending_request_ids(redis_client) == [ids[2], ids[3]]
    assert empty == [] and 0.3 <= waited < 0.6


def test_async_drain_costs_round_trips_per_chunk(settings: Settings, redis_client: Redis) -> None:
    # Given a thousand results
    put_results(redis_client, 1000)

    # When an asyncio consumer drains them in chunks of 500, acking each chunk at once
    async def scenario() -> tuple[list[int], Any]:
        async with AsyncCallbackQueue("svc", settings=settings) as queue:
            await queue.ack_many(await queue.get_many(1, timeout=0))  # group made, script loaded
            before = command_calls(redis_client)
            sizes = []
            while chunk := await queue.get_many(500, timeout=0):
                sizes.append(len(chunk))
                await queue.ack_many(chunk)
            return sizes, commands_run(redis_client, before)

    sizes, drain = asyncio.run(scenario())

    # Then each chunk was one read and one MULTI
    assert sizes == [500, 499]
    assert drain["xreadgroup"] == 3 and drain["evalsha"] == 0 and drain["exec"] == 2
    assert sum(drain.values()) <= 20, drain
    assert redis_client.xlen(KEY) == 0


def test_async_unacked_results_come_back_and_dead_letter_once(
    settings: Settings, redis_client: Redis
) -> None:
    # Given a queue that hands a result out at most twice, and two results nobody acks
    settings = settings.model_copy(update={"callback_max_deliveries": 2})
    ids = put_results(redis_client, 2)

    # When an asyncio consumer takes them, and keeps asking after each visibility timeout
    async def scenario() -> tuple[list[list[tuple[str, bool, int]]], int, list[Any]]:
        rounds = []
        async with AsyncCallbackQueue("svc", settings=settings, visibility_timeout=VT) as queue:
            for _ in range(4):
                chunk = await queue.get_many(10, timeout=0.05)
                rounds.append([(d.result.request_id, d.redelivered, d.deliveries) for d in chunk])
                await asyncio.sleep(VT)
            return rounds, await queue.dead_count(), await queue.dead_letters(limit=1)

    rounds, dead_count, first_letters = asyncio.run(scenario())

    # Then they came once new, once redelivered (second delivery), then moved to the
    # dead-letter stream exactly once each
    assert rounds == [
        [(r, False, 1) for r in ids],
        [(r, True, 2) for r in ids],
        [],
        [],
    ]
    assert redis_client.xlen(KEY) == 0
    assert redis_client.xpending(KEY, CALLBACK_GROUP)["pending"] == 0
    reader = CallbackQueue("svc", settings=settings)
    letters = reader.dead_letters()
    reader.close()
    assert [(letter.request_id, letter.deliveries) for letter in letters] == [(r, 2) for r in ids]
    # ... which the asyncio queue reports as the sync one does
    assert dead_count == 2 and first_letters == letters[:1]


def test_a_result_an_async_consumer_dropped_comes_back_to_a_sync_one(
    settings: Settings, redis_client: Redis
) -> None:
    # Given an asyncio consumer that took a result and died without acking it
    (request_id,) = put_results(redis_client, 1)

    async def take() -> None:
        async with AsyncCallbackQueue("svc", settings=settings, visibility_timeout=VT) as queue:
            assert await queue.get(timeout=1) is not None

    asyncio.run(take())
    time.sleep(VT)

    # When a sync consumer of the same queue asks / Then it gets it, as a second delivery
    queue = CallbackQueue("svc", settings=settings, visibility_timeout=VT)
    delivery = queue.get(timeout=1)
    queue.close()
    assert delivery is not None and delivery.redelivered and delivery.deliveries == 2
    assert delivery.result.request_id == request_id


def test_async_consumer_carries_on_after_redis_lost_its_group(
    settings: Settings, redis_client: Redis
) -> None:
    # Given an asyncio consumer that has read its queue once, then Redis is wiped and
    # results are delivered anew
    async def scenario() -> list[str]:
        async with AsyncCallbackQueue("svc", settings=settings) as queue:
            assert await queue.get_many(timeout=0.05) == []
            redis_client.flushdb()
            put_results(redis_client, 2)
            # When it asks again / Then it makes its group again and gets them
            return [d.result.request_id for d in await queue.get_many(10, timeout=1)]

    assert asyncio.run(scenario()) == ["r0", "r1"]


def test_async_iteration_yields_each_result_to_ack(settings: Settings, redis_client: Redis) -> None:
    # Given 150 results (more than one chunk)
    ids = put_results(redis_client, 150)

    # When an asyncio consumer iterates the queue, acking each
    async def scenario() -> list[str]:
        seen = []
        async with AsyncCallbackQueue("svc", settings=settings) as queue:
            async for delivery in queue:
                seen.append(delivery.result.request_id)
                await delivery.ack()
                if len(seen) == len(ids):
                    break
        return seen

    # Then it saw them all in order, and none is left
    assert asyncio.run(scenario()) == ids
    assert redis_client.xlen(KEY) == 0


def test_an_async_delivery_acked_on_another_queue_is_refused_and_deletes_nothing(
    settings: Settings, redis_client: Redis
) -> None:
    # Given two queues holding an entry of the same id each, as one collect writes them
    for key in (KEY, "bb:cb:other"):
        put_results(redis_client, 1, key=key)

    # When an asyncio consumer acks svc's delivery on the other queue
    async def scenario() -> str:
        async with (
            AsyncCallbackQueue("svc", settings=settings) as svc,
            AsyncCallbackQueue("other", settings=settings) as other,
        ):
            (taken,) = await svc.get_many(10, timeout=1)
            try:
                await other.ack_many([taken])
            except ValueError as exc:
                return str(exc)
            return ""

    refused = asyncio.run(scenario())

    # Then it is refused, naming both queues, and neither queue lost its result
    assert "was taken from 'bb:cb:svc', not 'bb:cb:other'" in refused
    assert redis_client.xlen(KEY) == 1 and redis_client.xlen("bb:cb:other") == 1
