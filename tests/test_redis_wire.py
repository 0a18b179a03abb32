"""Commands sent packed by hiredis: replies as Redis gave them, errors raised, pool kept clean."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import ResponseError

from shared.redis_wire import call, call_async, transaction, transaction_async


def test_a_transaction_runs_every_command_and_returns_their_replies(redis_client: Redis) -> None:
    # Given a stream with three entries
    ids = [redis_client.xadd("s", {"f": str(i)}) for i in range(3)]

    # When two of them are deleted and the list length read, in one MULTI/EXEC
    replies = transaction(redis_client, [("XDEL", "s", *ids[:2]), ("XLEN", "s")])

    # Then each command's reply comes back in order, and the effect is there
    assert replies == [2, 1]
    assert redis_client.xlen("s") == 1


def test_an_error_reply_raises_and_leaves_the_connection_usable(redis_client: Redis) -> None:
    # Given a key of the wrong type for a stream command
    redis_client.set("plain", "x")

    # When a transaction holds a command Redis refuses as it runs
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        transaction(redis_client, [("INCR", "n"), ("XLEN", "plain")])

    # Then the commands before it ran (Redis has no rollback) and the pool still works
    assert redis_client.get("n") == b"1"
    assert call(redis_client, ("GET", "n")) == b"1"


def test_a_command_refused_when_queued_runs_nothing(redis_client: Redis) -> None:
    # When a transaction holds a command Redis refuses to queue (wrong arity)
    with pytest.raises(ResponseError):
        transaction(redis_client, [("INCR", "m"), ("XLEN",)])

    # Then nothing ran, and no unread reply is left on a pooled connection
    assert redis_client.get("m") is None
    assert call(redis_client, ("PING",)) in (b"PONG", "PONG")
    assert redis_client.ping() is True


def test_call_returns_the_reply_unparsed(redis_client: Redis) -> None:
    # Given a stream entry read by a consumer group
    redis_client.xgroup_create("q", "g", id="0", mkstream=True)
    entry = redis_client.xadd("q", {"result": b"{}"})

    # When it is read raw
    reply = call(redis_client, ("XREADGROUP", "GROUP", "g", "c", "COUNT", 5, "STREAMS", "q", ">"))

    # Then the entry's fields are the flat list Redis sent (RESP3 map or RESP2 array)
    entries = reply[b"q"] if isinstance(reply, dict) else reply[0][1]
    assert entries == [[entry, [b"result", b"{}"]]]


def test_the_async_twins_return_raw_replies_and_raise_errors(redis_url: str) -> None:
    async def scenario() -> tuple[list[Any], Any, Any]:
        async with AsyncRedis.from_url(redis_url) as client:
            # Given a stream with three entries, read by a consumer group
            await client.xgroup_create("aq", "g", id="0", mkstream=True)
            ids = [await client.xadd("aq", {"result": str(i)}) for i in range(3)]
            # When one is read raw, two deleted in a transaction, and a refused command sent
            read = await call_async(
                client, ("XREADGROUP", "GROUP", "g", "c", "COUNT", 1, "STREAMS", "aq", ">")
            )
            replies = await transaction_async(client, [("XDEL", "aq", *ids[1:]), ("XLEN", "aq")])
            await client.set("plain", "x")
            with pytest.raises(ResponseError, match="WRONGTYPE"):
                await transaction_async(client, [("XLEN", "plain")])
            after = await call_async(client, ("GET", "plain"))
            return replies, read, after

    replies, read, after = asyncio.run(scenario())
    # Then each reply is what Redis sent, and the error left no reply unread behind it
    assert replies == [2, 1]
    entries = read[b"aq"] if isinstance(read, dict) else read[0][1]
    assert entries == [[entries[0][0], [b"result", b"0"]]]
    assert after == b"x"


def test_a_cancelled_async_read_leaves_no_reply_on_a_pooled_connection(redis_url: str) -> None:
    async def scenario() -> Any:
        async with AsyncRedis.from_url(redis_url, max_connections=1) as client:
            await client.xgroup_create("idle", "g", id="$", mkstream=True)
            # Given a blocking read of an empty stream, on the pool's only connection
            block = ("XREADGROUP", "GROUP", "g", "c", "BLOCK", 1000, "STREAMS", "idle", ">")
            read = asyncio.ensure_future(call_async(client, block))
            await asyncio.sleep(0.2)
            # When the task waiting for it is cancelled (a consumer shutting down)
            read.cancel()
            with pytest.raises(asyncio.CancelledError):
                await read
            # Then the next command gets its own reply, not the abandoned read's
            return await call_async(client, ("PING",))

    assert asyncio.run(scenario()) in (b"PONG", "PONG")
