"""The Celery broker transport: kombu's Redis transport, made to survive a Redis restart.

Why (kombu 5.7.0 / celery 5.7.0, the newest releases): when the broker connection drops,
the consumer first ``collect()``s the old connection, which detaches its transport
(``transport.client = None``) while the old channel is still open, because closing it failed
on the dead socket. It then ``close()``s the connection again; that closes the old channel
for real, which restores the channel's unacknowledged messages (any acks_late task running
at that moment), which builds a Redis client from ``transport.client.hostname``: an
``AttributeError`` that is not a connection error, so it escapes ``ignore_errors`` and the
worker dies ("Unrecoverable error: 'NoneType' object has no attribute 'hostname'"). A task
that finishes after the reconnect and acks through the old channel takes the same path.

The fix is at that point: a channel whose connection has been detached raises a Redis
``ConnectionError``, which kombu and celery already treat as "this connection is gone" —
the close goes on, the consumer reconnects, and a late ack is logged and dropped. Nothing
is lost: an unacked message stays in Redis and comes back after the visibility timeout, and
our messages are only wake-ups anyway.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError

# The value of Celery's ``broker_transport`` setting that selects this transport.
TRANSPORT_PATH = "worker.broker:Transport"


class Channel(kombu_redis.Channel):
    """A kombu Redis channel that fails like a lost connection once its transport is detached."""

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        if self.connection.client is None:
            raise RedisConnectionError(
                "this broker channel belongs to a connection that was closed after a "
                "connection loss"
            )
        params: dict[str, Any] = super()._connparams(asynchronous=asynchronous)  # type: ignore[no-untyped-call]
        return params


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel
