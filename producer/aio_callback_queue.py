"""The asyncio callback queue: the same script, chunks and guarantees as :class:`CallbackQueue`.

Create it inside the event loop that uses it. What to send and how to read the replies lives
in :mod:`producer.callback_protocol`, shared with the sync queue; this module only awaits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
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
from producer.callback_queue import DeadLetter, dead_letter_of
from shared.embedded_redis import resolve_redis_url
from shared.gc_pause import gc_paused
from shared.redis_layout import CALLBACK_GROUP, script_source
from shared.redis_wire import call_async, transaction_async
from shared.schemas import Result
from shared.settings import Settings

log = logging.getLogger(__name__)


@dataclass(slots=True)
class AsyncDelivery:
    """One result taken from a callback queue; await :meth:`ack` once it is handled."""

    result: Result
    delivery_id: str
    redelivered: bool
    _queue: AsyncCallbackQueue = field(repr=False)
    deliveries: int = 1  # how many times this result has been handed out, this one included

    @property
    def queue_key(self) -> str:
        """The Redis key of the queue this result was taken from."""
        return self._queue.key

    async def ack(self) -> None:
        """Confirm the result was handled; it will not be delivered again."""
        await self._queue.ack(self.delivery_id)


class AsyncCallbackQueue:
    """A named callback queue read from asyncio code (see :class:`CallbackQueue`)."""

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

    async def get(self, timeout: float | None = None) -> AsyncDelivery | None:
        """The next result, waiting up to ``timeout`` seconds (None waits for ever)."""
        taken = await self.get_many(1, timeout)
        return taken[0] if taken else None

    async def get_many(self, max: int = 500, timeout: float | None = None) -> list[AsyncDelivery]:
        """Up to ``max`` results, oldest first, once any are there; [] after ``timeout`` s."""
        check_max(max)
        await self._ensure_group()
        try:
            return await self._get_many(max, timeout)
        except ResponseError as exc:
            if not lost_group(exc):
                raise
        # As CallbackQueue.get_many: Redis lost the stream or its group; make it again.
        log.warning("callback queue %s: its consumer group was gone; created it again", self.name)
        self._group_ready = False
        self._reader.restart()
        await self._ensure_group()
        return await self._get_many(max, timeout)

    async def _get_many(self, want: int, timeout: float | None) -> list[AsyncDelivery]:
        deadline = None if timeout is None else time.monotonic() + timeout
        keys = [self.key, self.dead_key]
        while True:
            if self._reader.scan_due:
                reply: Any = await self._take_script(keys=keys, args=self._reader.take_args(want))
                if taken := self._reader.read_take(reply):
                    return self._deliveries(taken)
                if self._reader.mid_pass:  # the scan stopped part-way: carry on first
                    if deadline is not None and time.monotonic() >= deadline:
                        return []
                    continue
            # None once the deadline has passed: look once more, without waiting
            wait_ms = self._reader.wait_ms(deadline)
            command = read_command(self.consumer, self.key, want, wait_ms)
            reply = await call_async(self._client, command)
            # As the sync queue: parsing and wrapping allocate a dozen containers per result,
            # a third faster with the collector paused (no await in between).
            with gc_paused():
                deliveries = self._deliveries(self._reader.read_new(reply))
            if deliveries:
                return deliveries
            if wait_ms is None:
                return []

    async def __aiter__(self) -> AsyncIterator[AsyncDelivery]:
        """Every result in turn, fetched a chunk at a time; ack each one."""
        pacer = ChunkPacer(self.visibility_timeout_ms)
        while True:
            chunk = await self.get_many(pacer.size)
            taken_at = time.monotonic()
            for delivery in chunk:
                if not pacer.fresh(taken_at):
                    pacer.stale()
                    break
                yield delivery
            else:
                pacer.handled()

    async def ack(self, delivery_id: str) -> None:
        """Confirm one delivery and drop it from the stream."""
        await self.ack_many([delivery_id])

    async def ack_many(self, deliveries: Iterable[str | AsyncDelivery]) -> int:
        """Confirm deliveries (or delivery ids) and drop them, in one round trip.

        Returns how many were still unacked.
        """
        ids = delivery_ids(deliveries, self.key)
        if not ids:
            return 0
        acked, _deleted = await transaction_async(
            self._client,
            [("XACK", self.key, CALLBACK_GROUP, *ids), ("XDEL", self.key, *ids)],
        )
        return int(acked)

    async def backlog(self) -> int:
        """Results in the queue, delivered or not, that nobody has acked yet."""
        return int(await self._client.xlen(self.key))

    async def dead_count(self) -> int:
        """Results in the queue's dead-letter stream."""
        return int(await self._client.xlen(self.dead_key))

    async def dead_letters(self, limit: int | None = None) -> list[DeadLetter]:
        """The dead-lettered results, oldest first (at most ``limit`` of them)."""
        entries: Any = await self._client.xrange(self.dead_key, count=limit)
        return [dead_letter_of(entry_id, fields) for entry_id, fields in entries]

    async def aclose(self) -> None:
        """Close the Redis connections."""
        await self._client.aclose()

    async def __aenter__(self) -> AsyncCallbackQueue:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            await self._client.xgroup_create(self.key, CALLBACK_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def _deliveries(self, taken: list[Taken]) -> list[AsyncDelivery]:
        return [
            AsyncDelivery(t.result, t.delivery_id, t.redelivered, self, t.deliveries) for t in taken
        ]
