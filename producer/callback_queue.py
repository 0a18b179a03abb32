"""Consuming a callback queue: each result arrives at least once and stays until acked.

``get_many``/``ack_many`` take and confirm whole chunks in one round trip each; ``get`` and
iteration are built on them. :mod:`producer.aio_callback_queue` is the asyncio twin.

Results whose deliveries are never acked come back after the visibility timeout, at most
``callback_max_deliveries`` times in all; when one comes due again after that, it moves to the
queue's dead-letter stream (``{p}:cbdead:{queue}``) instead, which
``batchbridge callbacks dead QUEUE`` lists.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from redis import Redis
from redis.exceptions import ResponseError

from producer.callback_protocol import (
    ChunkPacer,
    Reader,
    Taken,
    check_max,
    check_queue_args,
    delivery_ids,
    lost_group,
    read_command,
)
from shared.embedded_redis import resolve_redis_url
from shared.gc_pause import gc_paused
from shared.redis_layout import CALLBACK_GROUP, script_source, text
from shared.redis_wire import call, transaction
from shared.schemas import Result
from shared.settings import Settings

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Delivery:
    """One result taken from a callback queue; call :meth:`ack` once it is handled."""

    result: Result
    delivery_id: str
    redelivered: bool
    _queue: CallbackQueue = field(repr=False)
    deliveries: int = 1  # how many times this result has been handed out, this one included

    @property
    def queue_key(self) -> str:
        """The Redis key of the queue this result was taken from."""
        return self._queue.key

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
        check_queue_args(name, visibility_timeout)  # before anything connects
        self.settings = settings or Settings.load()
        self._client = client or Redis.from_url(redis_url or resolve_redis_url(self.settings))
        self.name = name
        self._reader = Reader.for_queue(
            name,
            self.settings,
            self._client.connection_pool.connection_kwargs,
            consumer=consumer,
            visibility_timeout=visibility_timeout,
        )
        self.key, self.dead_key = self._reader.key, self._reader.dead_key
        self.consumer = self._reader.consumer
        self.visibility_timeout_ms = self._reader.visibility_timeout_ms
        self.max_deliveries = self._reader.max_deliveries
        self._take_script = self._client.register_script(script_source("take_callbacks"))
        self._group_ready = False

    def get(self, timeout: float | None = None) -> Delivery | None:
        """The next result, waiting up to ``timeout`` seconds (None waits for ever)."""
        taken = self.get_many(1, timeout)
        return taken[0] if taken else None

    def get_many(self, max: int = 500, timeout: float | None = None) -> list[Delivery]:
        """Up to ``max`` results, oldest first, once any are there; [] after ``timeout`` s.

        Due redeliveries come first, then new results; with results waiting this is one
        round trip. ``timeout`` None waits for ever.
        """
        check_max(max)
        self._ensure_group()
        try:
            return self._get_many(max, timeout)
        except ResponseError as exc:
            if not lost_group(exc):
                raise
        # Redis lost the stream or its group (a wipe, a restore, a failover): make it again
        # and carry on, so results the reconciler delivers anew reach this consumer.
        log.warning("callback queue %s: its consumer group was gone; created it again", self.name)
        self._group_ready = False
        self._reader.restart()
        self._ensure_group()
        return self._get_many(max, timeout)

    def _get_many(self, want: int, timeout: float | None) -> list[Delivery]:
        deadline = None if timeout is None else time.monotonic() + timeout
        keys = [self.key, self.dead_key]
        while True:
            if self._reader.scan_due:
                reply: Any = self._take_script(keys=keys, args=self._reader.take_args(want))
                if taken := self._reader.read_take(reply):
                    return self._deliveries(taken)
                if self._reader.mid_pass:  # the scan stopped part-way: carry on first
                    if deadline is not None and time.monotonic() >= deadline:
                        return []
                    continue
            # What is waiting now first, without blocking. Reading the reply, parsing each
            # result and wrapping it allocate a dozen containers per result: with the
            # collector paused until the chunk is built that is a third faster (a busy
            # consumer's case), and as the reply is a temporary, freed by then, the one
            # collection that follows walks the deliveries only. Collection stays on while
            # blocked: other threads allocate.
            with gc_paused():
                deliveries = self._deliveries(
                    self._reader.read_new(
                        call(self._client, read_command(self.consumer, self.key, want))
                    )
                )
            if deliveries:
                return deliveries
            # None once the deadline has passed: nothing more to wait for
            wait_ms = self._reader.wait_ms(deadline)
            if wait_ms is None:
                return []
            reply = call(self._client, read_command(self.consumer, self.key, want, wait_ms))
            if taken := self._reader.read_new(reply):
                return self._deliveries(taken)

    def __iter__(self) -> Iterator[Delivery]:
        """Every result in turn, fetched a chunk at a time; ack each one."""
        pacer = ChunkPacer(self.visibility_timeout_ms)
        while True:
            chunk = self.get_many(pacer.size)
            taken_at = time.monotonic()
            for delivery in chunk:
                if not pacer.fresh(taken_at):
                    pacer.stale()
                    break
                yield delivery
            else:
                pacer.handled()

    def ack(self, delivery_id: str) -> None:
        """Confirm one delivery and drop it from the stream."""
        self.ack_many([delivery_id])

    def ack_many(self, deliveries: Iterable[str | Delivery]) -> int:
        """Confirm deliveries (or delivery ids) and drop them, in one round trip.

        Returns how many were still unacked.
        """
        ids = delivery_ids(deliveries, self.key)
        if not ids:
            return 0
        acked, _deleted = transaction(
            self._client,
            [("XACK", self.key, CALLBACK_GROUP, *ids), ("XDEL", self.key, *ids)],
        )
        return int(acked)

    def backlog(self) -> int:
        """Results in the queue, delivered or not, that nobody has acked yet."""
        return int(self._client.xlen(self.key))

    def dead_count(self) -> int:
        """Results in the queue's dead-letter stream."""
        return int(self._client.xlen(self.dead_key))

    def dead_letters(self, limit: int | None = None) -> list[DeadLetter]:
        """The dead-lettered results, oldest first (at most ``limit`` of them)."""
        entries: Any = self._client.xrange(self.dead_key, count=limit)
        return [dead_letter_of(entry_id, fields) for entry_id, fields in entries]

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

    def _deliveries(self, taken: list[Taken]) -> list[Delivery]:
        return [Delivery(result, id_, again, self, n) for id_, result, again, n in taken]


def dead_letter_of(entry_id: bytes, fields: dict[bytes, bytes]) -> DeadLetter:
    """A DeadLetter from one entry of a dead-letter stream."""
    return DeadLetter(
        dead_id=text(entry_id),
        delivery_id=text(fields.get(b"id", b"")),
        request_id=text(fields.get(b"request_id", b"")),
        deliveries=int(fields.get(b"deliveries", b"0")),
        reason=text(fields.get(b"reason", b"")),
        result_json=fields.get(b"result", b""),
    )
