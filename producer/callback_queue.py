"""Consuming a callback queue: each result arrives at least once and stays until acked.

Results whose deliveries are never acked come back after the visibility timeout, at most
``callback_max_deliveries`` times in all; when one comes due again after that, it moves to the
queue's dead-letter stream (``{p}:cbdead:{queue}``) instead, which
``batchbridge callbacks dead QUEUE`` lists.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from redis import Redis
from redis.exceptions import ResponseError

from shared.embedded_redis import resolve_redis_url
from shared.redis_layout import CALLBACK_GROUP, Keys, script_source, text
from shared.schemas import Result
from shared.settings import Settings

log = logging.getLogger(__name__)

_START = "0-0"
# XAUTOCLAIM steps per script call; each scans at most 10 pending entries, so one round trip
# looks at up to 1,000 entries that are still in flight before giving the caller control back.
_SCAN_STEPS = 100


@dataclass(slots=True)
class Delivery:
    """One result taken from a callback queue; call :meth:`ack` once it is handled."""

    result: Result
    delivery_id: str
    redelivered: bool
    _queue: CallbackQueue = field(repr=False)
    deliveries: int = 1  # how many times this result has been handed out, this one included

    def ack(self) -> None:
        """Confirm the result was handled; it will not be delivered again."""
        self._queue.ack(self.delivery_id)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A result moved to a queue's dead-letter stream after too many unacked deliveries."""

    dead_id: str  # id in the dead-letter stream; its time part is when the result moved
    delivery_id: str  # its id in the callback queue
    request_id: str
    deliveries: int
    reason: str
    result_json: bytes

    @property
    def moved_at(self) -> datetime:
        """When the result was moved to the dead-letter stream."""
        return datetime.fromtimestamp(int(self.dead_id.split("-")[0]) / 1000, tz=UTC)

    @property
    def status(self) -> str | None:
        """The result's status, if its JSON can be read (a poison result may be malformed)."""
        value = self.result_value()
        status = value.get("status") if isinstance(value, dict) else None
        return status if isinstance(status, str) else None

    def result_value(self) -> Any:
        """The result as decoded JSON, or as text when it is not valid JSON."""
        try:
            return orjson.loads(self.result_json)
        except orjson.JSONDecodeError:
            return self.result_json.decode("utf-8", "replace")


class CallbackQueue:
    """A named callback queue (a Redis stream with one consumer group).

    Unacked deliveries come back, to any consumer of the queue, once they have been
    outstanding for ``visibility_timeout`` seconds. Each consumer walks the pending entries
    in order, resuming where its previous call stopped, so results that are never acked are
    retried in turn with the others instead of ahead of them.
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
        # Block in slices of half the client's socket timeout (5 s by default since redis-py
        # 8): a read blocked for longer fails with TimeoutError instead of waiting.
        socket_timeout = self._client.connection_pool.connection_kwargs.get("socket_timeout")
        self._block_slice_ms = (
            60_000 if socket_timeout is None else max(int(socket_timeout * 500), 10)
        )
        self.name = name
        keys = Keys(self.settings.key_prefix)
        self.key = keys.callback(name)
        self.dead_key = keys.callback_dead(name)
        self.consumer = consumer or uuid.uuid4().hex
        vt = visibility_timeout or self.settings.callback_visibility_timeout_seconds
        self.visibility_timeout_ms = int(vt * 1000)
        self.max_deliveries = self.settings.callback_max_deliveries
        self._reclaim_script = self._client.register_script(script_source("reclaim_callback"))
        # Where the next XAUTOCLAIM scan of the pending entries list starts.
        self._cursor = _START
        self._group_ready = False

    def get(self, timeout: float | None = None) -> Delivery | None:
        """The next result, waiting up to ``timeout`` seconds (None waits for ever)."""
        self._ensure_group()
        try:
            return self._get(timeout)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
        # Redis lost the stream or its group (a wipe, a restore, a failover): make it again
        # and carry on, so results the reconciler delivers anew reach this consumer.
        log.warning("callback queue %s: its consumer group was gone; created it again", self.name)
        self._group_ready = False
        self._cursor = _START
        self._ensure_group()
        return self._get(timeout)

    def _get(self, timeout: float | None) -> Delivery | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            reclaimed = self._reclaim_one()
            if reclaimed is not None:
                return reclaimed
            if self._cursor != _START:  # the scan stopped part-way: carry on before blocking
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                continue
            wait_ms = min(self.visibility_timeout_ms, self._block_slice_ms)
            if deadline is not None:
                wait_ms = min(wait_ms, int((deadline - time.monotonic()) * 1000))
                if wait_ms <= 0:
                    return None
            reply: Any = self._client.xreadgroup(
                CALLBACK_GROUP, self.consumer, {self.key: ">"}, count=1, block=max(wait_ms, 1)
            )
            if reply:
                entry_id, fields = reply[0][1][0]
                return self._delivery(entry_id, fields, redelivered=False, deliveries=1)

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

    def dead_count(self) -> int:
        """Results in the queue's dead-letter stream."""
        return int(self._client.xlen(self.dead_key))

    def dead_letters(self, limit: int | None = None) -> list[DeadLetter]:
        """The dead-lettered results, oldest first (at most ``limit`` of them)."""
        entries: Any = self._client.xrange(self.dead_key, count=limit)
        return [_dead_letter(entry_id, fields) for entry_id, fields in entries]

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
        args: list[str | int] = [
            CALLBACK_GROUP,
            self.consumer,
            self.visibility_timeout_ms,
            self._cursor,
            self.max_deliveries,
            _SCAN_STEPS,
        ]
        reply: Any = self._reclaim_script(keys=[self.key, self.dead_key], args=args)
        cursor, dead, entry_id, deliveries, flat = reply
        self._cursor = text(cursor)
        for request_id, delivered in zip(dead[::2], dead[1::2], strict=True):
            log.warning(
                "callback queue %s: result of request %s moved to the dead-letter stream after "
                "%d deliveries without an ack",
                self.name,
                text(request_id) or "?",
                delivered,
            )
        if not entry_id:
            return None
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        return self._delivery(entry_id, fields, redelivered=True, deliveries=int(deliveries))

    def _delivery(
        self, entry_id: bytes, fields: dict[bytes, bytes], *, redelivered: bool, deliveries: int
    ) -> Delivery:
        return Delivery(
            result=Result.from_json(fields[b"result"]),
            delivery_id=entry_id.decode(),
            redelivered=redelivered,
            _queue=self,
            deliveries=deliveries,
        )


def _dead_letter(entry_id: bytes, fields: dict[bytes, bytes]) -> DeadLetter:
    return DeadLetter(
        dead_id=text(entry_id),
        delivery_id=text(fields.get(b"id", b"")),
        request_id=text(fields.get(b"request_id", b"")),
        deliveries=int(fields.get(b"deliveries", b"0")),
        reason=text(fields.get(b"reason", b"")),
        result_json=fields.get(b"result", b""),
    )
