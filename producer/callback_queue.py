"""Consuming a callback queue: each result arrives at least once and stays until acked."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from redis import Redis
from redis.exceptions import ResponseError

from shared.embedded_redis import resolve_redis_url
from shared.redis_layout import CALLBACK_GROUP, Keys
from shared.schemas import Result
from shared.settings import Settings


@dataclass(slots=True)
class Delivery:
    """One result taken from a callback queue; call :meth:`ack` once it is handled."""

    result: Result
    delivery_id: str
    redelivered: bool
    _queue: CallbackQueue = field(repr=False)

    def ack(self) -> None:
        """Confirm the result was handled; it will not be delivered again."""
        self._queue.ack(self.delivery_id)


class CallbackQueue:
    """A named callback queue (a Redis stream with one consumer group).

    Unacked deliveries come back, to any consumer of the queue, once they have been
    outstanding for ``visibility_timeout`` seconds.
    """

    def __init__(
        self,
        name: str,
        redis_url: str | None = None,
        *,
        settings: Settings | None = None,
        client: Redis | None = None,
        consumer: str | None = None,
        visibility_timeout: float | None = None,
    ) -> None:
        self.settings = settings or Settings.load()
        self._client = client or Redis.from_url(redis_url or resolve_redis_url(self.settings))
        self.name = name
        self.key = Keys(self.settings.key_prefix).callback(name)
        self.consumer = consumer or uuid.uuid4().hex
        vt = visibility_timeout or self.settings.callback_visibility_timeout_seconds
        self.visibility_timeout_ms = int(vt * 1000)
        self._group_ready = False

    def get(self, timeout: float | None = None) -> Delivery | None:
        """The next result, waiting up to ``timeout`` seconds (None waits for ever)."""
        self._ensure_group()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            reclaimed = self._reclaim_one()
            if reclaimed is not None:
                return reclaimed
            wait_ms = self.visibility_timeout_ms
            if deadline is not None:
                wait_ms = min(wait_ms, int((deadline - time.monotonic()) * 1000))
                if wait_ms <= 0:
                    return None
            reply: Any = self._client.xreadgroup(
                CALLBACK_GROUP, self.consumer, {self.key: ">"}, count=1, block=max(wait_ms, 1)
            )
            if reply:
                entry_id, fields = reply[0][1][0]
                return self._delivery(entry_id, fields, redelivered=False)

    def __iter__(self) -> Iterator[Delivery]:
        while True:
            delivery = self.get(timeout=1.0)
            if delivery is not None:
                yield delivery

    def ack(self, delivery_id: str) -> None:
        """Confirm one delivery and drop it from the stream."""
        pipe = self._client.pipeline(transaction=True)
        pipe.xack(self.key, CALLBACK_GROUP, delivery_id)
        pipe.xdel(self.key, delivery_id)
        pipe.execute()

    def backlog(self) -> int:
        """Results in the queue, delivered or not, that nobody has acked yet."""
        return int(self._client.xlen(self.key))

    def close(self) -> None:
        """Close the Redis connections."""
        self._client.close()

    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            self._client.xgroup_create(self.key, CALLBACK_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def _reclaim_one(self) -> Delivery | None:
        reply: Any = self._client.xautoclaim(
            self.key, CALLBACK_GROUP, self.consumer, self.visibility_timeout_ms, "0-0", count=1
        )
        for entry_id, fields in reply[1]:
            if fields:  # an entry deleted while pending comes back empty: nothing to deliver
                return self._delivery(entry_id, fields, redelivered=True)
            self._client.xack(self.key, CALLBACK_GROUP, entry_id)
        return None

    def _delivery(
        self, entry_id: bytes, fields: dict[bytes, bytes], *, redelivered: bool
    ) -> Delivery:
        return Delivery(
            result=Result.from_json(fields[b"result"]),
            delivery_id=entry_id.decode(),
            redelivered=redelivered,
            _queue=self,
        )
