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
    packed = [pack(("MULTI",)), *(pack(c) for c in commands), pack(("EXEC",))]
    # Replies: OK to MULTI, QUEUED per command, then EXEC's list of the commands' replies.
    replies = _on_connection(client, lambda conn: _send_and_read(conn, packed, len(packed))[-1])
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
