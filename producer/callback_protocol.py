"""What the sync and async callback queues say to Redis, and how they read the answers.

Both take results with ``take_callbacks.lua`` (idle results first, then new ones, in one
round trip) and block with a plain XREADGROUP only when the script took nothing; the
:class:`Reader` here decides every argument, parses every reply and keeps the scan's place,
so the two queues differ only in how they wait for Redis.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple, Protocol

from redis.exceptions import ResponseError

from shared.gc_pause import gc_paused
from shared.redis_layout import CALLBACK_GROUP, Keys, text
from shared.schemas import CALLBACK_QUEUE_NAME, Result
from shared.settings import Settings

log = logging.getLogger(__name__)

START = "0-0"  # a cursor that starts a new pass over the pending entries list (PEL)
_NO_SCAN = ""  # a cursor that tells the script to skip the PEL this time
# PEL entries one script call may look at, at the least: as many as the single-result
# reclaim script used to (1,000), and ten per result asked for beyond that, so a consumer
# draining a crashed one's backlog takes full chunks of idle results.
_SCAN_ENTRIES = 1_000
# Iteration fetches this many at a time. Each delivery is acked on its own, one round trip
# apiece, so a larger chunk would save little and spend more of the later results'
# visibility timeout while they wait their turn.
ITER_CHUNK = 100


class HasDeliveryId(Protocol):
    """Anything that names a delivery (a sync or async Delivery)."""

    @property
    def delivery_id(self) -> str: ...

    @property
    def queue_key(self) -> str: ...


class Taken(NamedTuple):
    """One result the queue handed out, before it is wrapped in a (sync or async) Delivery.

    A NamedTuple: a frozen dataclass sets each field through object.__setattr__, which
    costs a consumer taking thousands of results a second more than the tuple does.
    """

    delivery_id: str
    result: Result
    redelivered: bool
    deliveries: int


def block_slice_ms(connection_kwargs: Mapping[str, Any]) -> int:
    """The longest single blocking read (ms) the client's socket timeout allows."""
    # Half the socket timeout (5 s by default since redis-py 8): a read blocked for longer
    # fails with TimeoutError instead of waiting.
    socket_timeout = connection_kwargs.get("socket_timeout")
    return 60_000 if socket_timeout is None else max(int(socket_timeout * 500), 10)


def read_command(
    consumer: str, key: str, want: int, block_ms: int | None = None
) -> tuple[Any, ...]:
    """XREADGROUP of up to ``want`` new results, to send raw (see ``shared.redis_wire``)."""
    # redis-py's reply callback would rebuild each entry as a tuple and a dict.
    block = () if block_ms is None else ("BLOCK", block_ms)
    return (
        "XREADGROUP", "GROUP", CALLBACK_GROUP, consumer, "COUNT", want, *block,
        "STREAMS", key, ">",
    )  # fmt: skip


def lost_group(exc: ResponseError) -> bool:
    """Whether Redis lost the queue's stream or consumer group (a wipe, a restore, a failover)."""
    return "NOGROUP" in str(exc)


def delivery_ids(items: Iterable[str | HasDeliveryId], queue_key: str) -> list[str]:
    """The delivery ids of deliveries, or of ids given as they are.

    Raises ValueError for a delivery taken from another queue: every stream one collect
    writes gives its entries the same ids, so acking it here would delete this queue's own,
    never handed out, result of that id.
    """
    ids = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            ids.append(item)
        elif item.queue_key != queue_key:
            raise ValueError(
                f"deliveries[{i}] was taken from {item.queue_key!r}, not {queue_key!r}: "
                "ack it on the queue it came from (nothing was acked)"
            )
        else:
            ids.append(item.delivery_id)
    return ids


def check_queue_args(name: str, visibility_timeout: float | None) -> None:
    """Refuse, naming the argument, a queue name no request could use or a timeout under 1 ms.

    A visibility timeout of 0 or less would hand every in-flight result to the next caller.
    """
    if not isinstance(name, str) or not CALLBACK_QUEUE_NAME.fullmatch(name):
        rule = CALLBACK_QUEUE_NAME.pattern
        raise ValueError(f"name must be a callback queue name ({rule}), not {name!r}")
    if visibility_timeout is not None and not (
        math.isfinite(visibility_timeout) and visibility_timeout >= 0.001
    ):
        raise ValueError(
            "visibility_timeout must be a finite number of seconds of at least 0.001, "
            f"not {visibility_timeout!r}"
        )


def check_max(max_results: int) -> None:
    """Refuse a chunk size that can take nothing."""
    if type(max_results) is not int or max_results < 1:  # bool and 2.5 included
        raise ValueError(f"max must be an integer of at least 1, not {max_results!r}")


class Reader:
    """One consumer's reading of one queue: script arguments, replies, when to scan or block.

    A pass over the pending entries list starts at most once per ``pass interval``
    (``min(visibility timeout, block slice)``); a pass that stops part-way (a full chunk, or
    the scan budget spent) carries on at the next call, whatever the time.
    """

    def __init__(
        self,
        name: str,
        consumer: str,
        *,
        visibility_timeout_ms: int,
        max_deliveries: int,
        slice_ms: int,
        key_prefix: str = "bb",
    ) -> None:
        self.name = name
        keys = Keys(key_prefix)
        self.key = keys.callback(name)
        self.dead_key = keys.callback_dead(name)
        self.consumer = consumer
        self.visibility_timeout_ms = visibility_timeout_ms
        self.max_deliveries = max_deliveries
        self.slice_ms = slice_ms
        # Why a pass need not run on every chunk: a delivery comes due no sooner than one
        # visibility timeout after it was handed out, and get() always noticed a due result
        # only after a blocking read of up to min(visibility timeout, block slice). Starting a
        # pass at most that often keeps redelivery as prompt as it was, while a consumer busy
        # with new results stops walking every other consumer's in-flight entries per chunk.
        self._pass_interval = min(visibility_timeout_ms, slice_ms) / 1000
        self._cursor = START  # where the next XAUTOCLAIM scan of the PEL starts
        self._next_pass_at = 0.0  # monotonic time a new pass may start (0: at once)

    @classmethod
    def for_queue(
        cls,
        name: str,
        settings: Settings,
        connection_kwargs: Mapping[str, Any],
        *,
        consumer: str | None,
        visibility_timeout: float | None,
    ) -> Reader:
        """The reader of queue ``name`` as a consumer built with these arguments reads it.

        ``name`` and ``visibility_timeout`` have passed ``check_queue_args`` (the queues
        check them before connecting).
        """
        vt = visibility_timeout or settings.callback_visibility_timeout_seconds
        return cls(
            name,
            consumer or uuid.uuid4().hex,
            visibility_timeout_ms=int(vt * 1000),
            max_deliveries=settings.callback_max_deliveries,
            slice_ms=block_slice_ms(connection_kwargs),
            key_prefix=settings.key_prefix,
        )

    @property
    def mid_pass(self) -> bool:
        """Whether a pass over the PEL stopped part-way (so it goes on before blocking)."""
        return self._cursor != START

    @property
    def scan_due(self) -> bool:
        """Whether the next take should look for due redeliveries (run the script).

        When it need not, a plain XREADGROUP takes new results: the script would only wrap
        the same read, and copying every entry through Lua costs Redis as much again.
        """
        return self.mid_pass or time.monotonic() >= self._next_pass_at

    def take_args(self, want: int) -> list[str | int]:
        """ARGV for ``take_callbacks.lua``, taking up to ``want`` results."""
        scan = self.scan_due
        return [
            CALLBACK_GROUP,
            self.consumer,
            self.visibility_timeout_ms,
            self._cursor if scan else _NO_SCAN,
            self.max_deliveries,
            max(_SCAN_ENTRIES, 10 * want),
            want,
        ]

    def read_take(self, reply: Any) -> list[Taken]:
        """The results a ``take_callbacks.lua`` reply hands out (the scan's place is kept)."""
        cursor, dead, idle, new = reply
        cursor = text(cursor)
        if cursor != _NO_SCAN:
            if cursor == START:  # the pass is complete: the next waits out the interval
                self._next_pass_at = time.monotonic() + self._pass_interval
            self._cursor = cursor
        for request_id, delivered in zip(dead[::2], dead[1::2], strict=True):
            log.warning(
                "callback queue %s: result of request %s moved to the dead-letter stream after "
                "%d deliveries without an ack",
                self.name,
                text(request_id) or "?",
                delivered,
            )
        with gc_paused():
            taken = [
                self._taken(entry_id, flat, int(deliveries))
                for entry_id, deliveries, flat in zip(
                    idle[::3], idle[1::3], idle[2::3], strict=True
                )
            ]
            taken += [self._taken(entry_id, flat, 1) for entry_id, flat in new]
        return [t for t in taken if t is not None]

    def read_new(self, reply: Any) -> list[Taken]:
        """The results an XREADGROUP reply hands out (as redis-py or as hiredis parsed it)."""
        if not reply:
            return []
        # RESP3 (redis-py's default protocol since 8.0) answers a map of stream to entries.
        entries = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
        with gc_paused():
            taken = [self._taken(entry_id, fields, 1) for entry_id, fields in entries]
        return [t for t in taken if t is not None]

    def wait_ms(self, deadline: float | None) -> int | None:
        """How long the next blocking read may wait (ms); None once the deadline has passed."""
        now = time.monotonic()
        # Wake when the next pass is due, so a result that comes due meanwhile is not late.
        wait = min(self.slice_ms, self.visibility_timeout_ms, (self._next_pass_at - now) * 1000)
        if deadline is not None:
            left = (deadline - now) * 1000
            if left < 1:
                return None
            wait = min(wait, left)
        return max(int(wait), 1)

    def restart(self) -> None:
        """Forget the scan's place: the stream or group was made again."""
        self._cursor = START
        self._next_pass_at = 0.0

    def _taken(self, entry_id: Any, fields: Any, deliveries: int) -> Taken | None:
        delivery_id = text(entry_id)
        try:
            result = Result.from_json(_result_field(fields))
        except (KeyError, ValueError):
            # Failing the whole chunk for one unreadable entry would hold the others back
            # each time it came round; left unacked, it dead-letters after max deliveries.
            log.warning(
                "callback queue %s: entry %s holds no readable result; left unacked",
                self.name,
                delivery_id,
            )
            return None
        return Taken(delivery_id, result, deliveries > 1, deliveries)


class ChunkPacer:
    """How many results iteration fetches at a time, and which fetched ones are still fresh.

    Results fetched in a chunk wait in the consumer while the ones before them are handled,
    and their visibility timeout runs meanwhile. One that has waited half of it is not handed
    out (it comes back to some consumer once due, like any unacked delivery), so no result
    reaches the caller with less than half its timeout left; the next chunk is then halved,
    and grows back once whole chunks are handled in time.
    """

    def __init__(self, visibility_timeout_ms: int, size: int = ITER_CHUNK) -> None:
        self._ceiling = size
        self.size = size
        self._fresh_for = visibility_timeout_ms / 2000

    def fresh(self, taken_at: float) -> bool:
        """Whether results fetched at ``taken_at`` (monotonic) may still be handed out."""
        return time.monotonic() - taken_at < self._fresh_for

    def stale(self) -> None:
        """A chunk went stale before it was all handled: fetch fewer next time."""
        self.size = max(1, self.size // 2)

    def handled(self) -> None:
        """A whole chunk was handled in time: fetch more next time (up to the first size)."""
        self.size = min(self._ceiling, self.size * 2)


def _result_field(fields: Any) -> Any:
    """An entry's ``result`` field, from redis-py's dict of its fields or their flat list."""
    # The collector writes that one field, so a flat list almost always starts with it.
    if isinstance(fields, dict):
        return fields[b"result"]
    for i in range(0, len(fields) - 1, 2):
        if fields[i] == b"result":
            return fields[i + 1]
    raise KeyError("result")
