"""Commands packed by hiredis, sent on a pooled connection, their replies read unparsed.

redis-py's packer walks every argument in Python (encoding, length prefixes), and its reply
callbacks rebuild what hiredis already parsed (XREADGROUP's entries become tuples of dicts);
for a 500-result chunk of a callback queue, both cost more than Redis takes to run the
commands. Here hiredis packs in C and replies come back as hiredis built them: nested lists
of bytes and ints. Connection errors are retried as the client's own commands are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import hiredis
from redis import Redis
from redis.asyncio import Redis as AsyncRedis


def pack(command: Sequence[Any]) -> bytes:
    """One command in Redis' wire format (str arguments as UTF-8)."""
    return hiredis.pack_command(tuple(command))  # type: ignore[no-any-return]


def call(client: Redis, command: Sequence[Any]) -> Any:
    """Run one command; its reply as hiredis parsed it (an error reply raises)."""
    packed = [pack(command)]
    return _on_connection(client, lambda conn: _send_and_read(conn, packed, 1)[0])


def transaction(client: Redis, commands: Sequence[Sequence[Any]]) -> list[Any]:
    """Run ``commands`` in one MULTI/EXEC, in one round trip; their replies, in order.

    A reply that is an error raises, as a redis-py pipeline's would.
    """
    packed = _multi_exec(commands)
    replies = _on_connection(client, lambda conn: _send_and_read(conn, packed, len(packed))[-1])
    return _checked(replies)


async def call_async(client: AsyncRedis, command: Sequence[Any]) -> Any:
    """:func:`call` for an asyncio client."""
    return (await _on_async_connection(client, [pack(command)], 1))[0]


async def transaction_async(client: AsyncRedis, commands: Sequence[Sequence[Any]]) -> list[Any]:
    """:func:`transaction` for an asyncio client."""
    packed = _multi_exec(commands)
    return _checked((await _on_async_connection(client, packed, len(packed)))[-1])


def _multi_exec(commands: Sequence[Sequence[Any]]) -> list[bytes]:
    # Replies: OK to MULTI, QUEUED per command, then EXEC's list of the commands' replies.
    return [pack(("MULTI",)), *(pack(c) for c in commands), pack(("EXEC",))]


def _checked(replies: Any) -> list[Any]:
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return list(replies)


def _send_and_read(conn: Any, packed: list[bytes], n_replies: int) -> list[Any]:
    conn.send_packed_command(packed, check_health=False)
    return [conn.read_response() for _ in range(n_replies)]


def _on_connection(client: Redis, run: Callable[[Any], Any]) -> Any:
    pool = client.connection_pool
    conn: Any = pool.get_connection()
    try:
        # A failed attempt drops the connection, so no reply is left unread on it.
        return conn.retry.call_with_retry(lambda: run(conn), lambda _error: conn.disconnect())
    except BaseException:
        conn.disconnect()
        raise
    finally:
        pool.release(conn)


async def _on_async_connection(client: AsyncRedis, packed: list[bytes], n_replies: int) -> Any:
    pool = client.connection_pool
    conn: Any = await pool.get_connection()  # type: ignore[no-untyped-call]

    async def attempt() -> list[Any]:
        await conn.send_packed_command(packed, check_health=False)
        return [await conn.read_response() for _ in range(n_replies)]

    try:
        # As _on_connection; a task cancelled between sending and reading also drops it.
        return await conn.retry.call_with_retry(attempt, lambda _error: conn.disconnect())
    except BaseException:
        await conn.disconnect()
        raise
    finally:
        await pool.release(conn)
