"""Where batchbridge keeps things in Redis, and the Lua scripts that change them atomically.

Every key starts with the configured prefix (default ``bb``):

``{p}:req:{id}``            hash    request: state, buf (its buffer's number), enq (ms), cbq,
                                    wh (webhook URL), meta, batch, cx (set once cancelled while
                                    batched: the cancelled Result to deliver) ...
``{p}:bodies:{buf}``        hash    request id -> body JSON, until the request has an outcome
``{p}:idem:{key}``          string  idempotency key -> "{request id}/{request digest}" (expires)
``{p}:pending:{buf}``       list    the pending buffer of one (provider, model): request ids in
                                    arrival order; ids of requests that left other than by
                                    claim stay until a claim drops them (_buffers.lua)
``{p}:buffers``             hash    buf -> bytes waiting (lines + metadata); fields list buffers
``{p}:npending``            hash    buf -> requests waiting
``{p}:bufno``, ``{p}:bufname``  hash    buf -> its number, and back (numbers never change)
``{p}:claim:{batch}``       hash    an uncommitted claim: buf, count, bytes, at
``{p}:claim:{batch}:ids``   list    the request ids of that claim, in file order
``{p}:claims``              zset    batch ids of uncommitted claims, by claim time
``{p}:cb:{queue}``          stream  a callback queue (consumer group ``consumers``)
``{p}:cbdead:{queue}``      stream  results of that queue delivered too often without an ack:
                                    id, request_id, deliveries, reason, result
``{p}:wh:{id}``             hash    a webhook delivery waiting to be sent: url, type (outcome),
                                    result (JSON), at (ms, the event's time), attempts
``{p}:whq``                 zset    webhook deliveries by when they are due (ms); a delivery
                                    being sent is pushed into the future while it is in flight
``{p}:torecord``            list    ids of requests finished outside any batch (cancelled in
                                    their buffer) that the reaper has yet to record in SQL
``{p}:lock:{name}``         string  short leases that keep periodic work single-flight
``{p}:wake:{buf}``          string  debounces aggregator wake-ups sent by producers
``{p}:wakeups``             list    buffers whose producers asked for an aggregate now; every
                                    worker's watcher pops it (worker/wakeups.py), at most the
                                    newest 64 are kept
``{p}:epoch``               string  random id of this Redis dataset; SQL remembers it, so a
                                    wiped or replaced Redis is noticed (worker/redis_checks.py)
``{p}:counters``            hash    monotonic counters behind the metrics: outcomes, latency
                                    buckets, retries, tokens, errors (shared/counters.py)
``{p}:cbqueues``            set     names of the callback queues results were put on

A request's state in Redis moves ``pending -> batched -> done``; ``batched -> pending`` when a
claim is abandoned or a retryable failure sends it round again; ``pending -> done`` on cancel.
Every move to ``done`` is made by ``_terminal.lua`` (prepended to the scripts that finish a
request), which puts the result on the callback stream and in the webhook outbox in the same
step: that is what makes each delivery happen once. A request cancelled while ``batched``
keeps its state and gains ``cx``; whatever then ends its batch ends it ``cancelled``.
``buf`` is ``"{provider}:{model}"``; provider names never contain a colon. A request that
names no provider waits in ``"default:{model}"``; the packer sends it to the worker's
default provider.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis import Redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from shared.redis_wire import pack

CALLBACK_GROUP = "consumers"
# A request's states in Redis and the scripts that move it (the Lua checks the source state
# and skips a request found elsewhere, which is what makes every step safe to repeat).
# "cancelling" is "batched" with the cx mark; "done" is final (until the hash expires).
LIVE_TRANSITIONS: dict[str, dict[str, str]] = {
    "pending": {"batched": "claim, reclaim_batch", "done": "cancel, restore_done"},
    "batched": {
        "pending": "unclaim, requeue",
        "cancelling": "cancel",
        "done": "finish, restore_done",
    },
    "cancelling": {"done": "finish, requeue, unclaim (ending cancelled)"},
    "done": {},
}
_SCRIPT_NAMES = (
    "enqueue",
    "claim",
    "unclaim",
    "requeue",
    "finish",
    "release_lease",
    "renew_lease",
    "restore_done",
    "reclaim_batch",
    "cancel",
    "claim_webhooks",
    "settle_webhook",
    "request_fields",
    "batch_strays",
    "upgrade_buffer",
)
# Requests per request_fields call: one reply stays a few MB even for large metadata.
_FIELDS_CHUNK = 2000
# Lua libraries prepended to the scripts that use them: _buffers keeps pending buffers,
# _terminal gives requests their terminal outcome.
_LIBRARIES: dict[str, tuple[str, ...]] = {
    "_buffers": (
        "enqueue",
        "claim",
        "unclaim",
        "requeue",
        "finish",
        "restore_done",
        "reclaim_batch",
        "cancel",
        "request_fields",
        "upgrade_buffer",
    ),
    "_terminal": ("finish", "requeue", "unclaim", "restore_done", "cancel"),
}


def buffer_name(provider: str, model: str) -> str:
    """The name of the pending buffer for one (provider, model)."""
    return f"{provider}:{model}"


def split_buffer_name(buf: str) -> tuple[str, str]:
    """Inverse of :func:`buffer_name`."""
    provider, _, model = buf.partition(":")
    return provider, model


@dataclass(frozen=True, slots=True)
class Keys:
    """Builds the key names for one prefix."""

    prefix: str = "bb"

    @property
    def base(self) -> str:
        """The prefix with its trailing colon, as the Lua scripts expect it."""
        return f"{self.prefix}:"

    def request(self, request_id: str) -> str:
        """Hash holding one request."""
        return f"{self.prefix}:req:{request_id}"

    def bodies(self, buf: str) -> str:
        """Hash of request id -> body JSON for one buffer."""
        return f"{self.prefix}:bodies:{buf}"

    def idempotency(self, key: str) -> str:
        """String mapping an idempotency key to its request id."""
        return f"{self.prefix}:idem:{key}"

    def pending(self, buf: str) -> str:
        """List of request ids waiting in one buffer, oldest first (may hold dropped ids)."""
        return f"{self.prefix}:pending:{buf}"

    @property
    def pending_counts(self) -> str:
        """Hash of buffer name -> requests waiting."""
        return f"{self.prefix}:npending"

    @property
    def buffer_names(self) -> str:
        """Hash of buffer number (as request hashes store it) -> buffer name."""
        return f"{self.prefix}:bufname"

    @property
    def buffers(self) -> str:
        """Hash of buffer name -> pending bytes."""
        return f"{self.prefix}:buffers"

    def claim(self, batch_id: str) -> str:
        """Hash describing an uncommitted claim."""
        return f"{self.prefix}:claim:{batch_id}"

    def claim_ids(self, batch_id: str) -> str:
        """List of the request ids in an uncommitted claim."""
        return f"{self.prefix}:claim:{batch_id}:ids"

    def claim_script_keys(self, buf: str, batch_id: str) -> list[str]:
        """The KEYS of ``claim.lua`` claiming from buffer ``buf`` for batch ``batch_id``."""
        return [
            self.pending(buf),
            self.buffers,
            self.claim_ids(batch_id),
            self.claim(batch_id),
            self.claims,
            self.pending_counts,
        ]

    def intact(self, batch_id: str) -> str:
        """Mark that no request has left a batch since its claim (see ``claim.lua``)."""
        return f"{self.prefix}:intact:{batch_id}"

    @property
    def claims(self) -> str:
        """Sorted set of uncommitted claims by claim time."""
        return f"{self.prefix}:claims"

    def callback(self, queue: str) -> str:
        """Stream backing one callback queue."""
        return f"{self.prefix}:cb:{queue}"

    def callback_dead(self, queue: str) -> str:
        """Dead-letter stream of one callback queue."""
        return f"{self.prefix}:cbdead:{queue}"

    def lock(self, name: str) -> str:
        """A short lease."""
        return f"{self.prefix}:lock:{name}"

    def wake(self, buf: str) -> str:
        """Debounce marker for aggregator wake-ups of one buffer."""
        return f"{self.prefix}:wake:{buf}"

    @property
    def wakeups(self) -> str:
        """List of buffers whose producers asked for an aggregate now (workers pop it)."""
        return f"{self.prefix}:wakeups"

    def webhook(self, delivery_id: str) -> str:
        """Hash of one webhook delivery waiting in the outbox."""
        return f"{self.prefix}:wh:{delivery_id}"

    @property
    def webhook_queue(self) -> str:
        """Sorted set of webhook deliveries by due time (ms)."""
        return f"{self.prefix}:whq"

    @property
    def to_record(self) -> str:
        """List of requests finished outside a batch, to be recorded in SQL."""
        return f"{self.prefix}:torecord"

    @property
    def epoch(self) -> str:
        """The random id naming this Redis dataset."""
        return f"{self.prefix}:epoch"

    @property
    def counters(self) -> str:
        """Hash of the monotonic counters behind the metrics (see shared/counters.py)."""
        return f"{self.prefix}:counters"

    @property
    def callback_queues(self) -> str:
        """Set of the callback queues results were put on."""
        return f"{self.prefix}:cbqueues"


def script_source(name: str) -> str:
    """The text of one Lua script from ``shared/redis_scripts`` (with the library it uses)."""
    folder = resources.files("shared") / "redis_scripts"
    parts = [
        (folder / f"{lib}.lua").read_text("utf-8")
        for lib, users in _LIBRARIES.items()
        if name in users
    ]
    return "\n".join([*parts, (folder / f"{name}.lua").read_text("utf-8")])


class Scripts:
    """The Lua scripts, read from their ``.lua`` files once and registered on a client."""

    def __init__(self, client: Redis) -> None:
        self._scripts: dict[str, Script] = {
            name: client.register_script(script_source(name)) for name in _SCRIPT_NAMES
        }

    def sha(self, name: str) -> str:
        """The SHA1 of a script, for sending EVALSHA by hand."""
        return str(self._scripts[name].sha)

    def load(self, name: str) -> None:
        """Load a script into Redis (after a restart or SCRIPT FLUSH forgot it)."""
        script = self._scripts[name]
        script.registered_client.script_load(script.script)

    def run(self, name: str, keys: list[str], args: list[Any], client: Any | None = None) -> Any:
        """Run one script (EVALSHA, loading it on first use) on ``client`` or a pipeline."""
        return self._scripts[name](keys=keys, args=args, client=client)


class SentScript:
    """A script call sent on a connection of its own, its reply read later (or discarded)."""

    def __init__(
        self, scripts: Scripts, client: Redis, name: str, keys: list[str], args: list[Any]
    ) -> None:
        self._scripts, self._name, self._keys, self._args = scripts, name, keys, args
        self._pool = client.connection_pool
        self._conn: Any = self._pool.get_connection()
        command = ("EVALSHA", scripts.sha(name), len(keys), *keys, *args)
        try:
            # hiredis packs the arguments in C; redis-py's packer first encodes each one in
            # Python: 0.6 s of a 4.0 s fan-out of 50,000 results, profiled (cProfile).
            packed = pack(command)
            self._conn.send_packed_command([packed], check_health=False)  # type: ignore[no-untyped-call]
        except BaseException:
            self.discard()
            raise

    def reply(self) -> Any:
        """Wait for the script's reply (running it again, loaded, if Redis had forgotten it)."""
        conn, self._conn = self._conn, None
        try:
            reply = conn.read_response()
        except NoScriptError:
            self._pool.release(conn)
            # Not run at all, so running it now is the same call.
            return self._scripts.run(self._name, self._keys, self._args)
        except BaseException:
            conn.disconnect()
            self._pool.release(conn)
            raise
        self._pool.release(conn)
        return reply

    def discard(self) -> None:
        """Give the connection up without reading the reply (the call may or may not run)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.disconnect()
            self._pool.release(conn)


def request_fields(
    scripts: Scripts, prefix: str, ids: Sequence[str], fields: Sequence[str]
) -> list[tuple[Any, ...]]:
    """``fields`` of each request's hash, in ``ids`` order (None where absent or gone)."""
    out: list[tuple[Any, ...]] = []
    for start in range(0, len(ids), _FIELDS_CHUNK):
        for _, rows in request_fields_within(
            scripts, prefix, ids[start : start + _FIELDS_CHUNK], fields, 0
        ):
            out += rows
    return out


def request_fields_args(
    prefix: str, ids: Sequence[str], fields: Sequence[str], max_bytes: int
) -> list[Any]:
    """The arguments of one ``request_fields`` call."""
    return [prefix, len(fields), max_bytes, *fields, *ids]


def request_fields_within(
    scripts: Scripts,
    prefix: str,
    ids: Sequence[str],
    fields: Sequence[str],
    max_bytes: int,
    first: SentScript | None = None,
) -> Iterator[tuple[int, list[tuple[Any, ...]]]]:
    """(index of the first id, its rows) per call, each reply about ``max_bytes`` at most.

    ``first``, when given, is the first call already sent (``request_fields_args`` of all
    ``ids``): its reply is read instead of calling again.
    """
    n, start = len(fields), 0
    while start < len(ids):
        if first is not None:
            flat, first = first.reply(), None
        else:
            args = request_fields_args(prefix, ids[start:], fields, max_bytes)
            flat = scripts.run("request_fields", [], args)
        rows = [tuple(flat[i : i + n]) for i in range(0, len(flat), n)]
        yield start, rows
        start += len(rows)


def pending_ids(client: Redis, keys: Keys, buf: str) -> list[str]:
    """The requests waiting in a buffer, oldest first: what claims would take, in their order."""
    listed = [text(v) for v in client.lrange(keys.pending(buf), 0, -1)]
    pipe = client.pipeline(transaction=False)
    for request_id in listed:
        pipe.hget(keys.request(request_id), "state")
    seen: set[str] = set()
    waiting = []
    for request_id, state in zip(listed, pipe.execute(), strict=True):
        # An id listed twice (sent round again) is claimed where it first appears.
        if state == b"pending" and request_id not in seen:
            waiting.append(request_id)
        seen.add(request_id)
    return waiting


def pending_heads(client: Redis, keys: Keys, bufs: Sequence[str]) -> list[tuple[int, int | None]]:
    """(requests waiting, enqueue time in ms of the oldest or None) of each buffer."""
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(keys.pending_counts)
    for buf in bufs:
        pipe.lindex(keys.pending(buf), 0)
    counts, *heads = pipe.execute()
    # claim.lua takes the age from the head of the list, which is always a waiting request.
    pipe = client.pipeline(transaction=False)
    for head in heads:
        pipe.hget(keys.request(text(head) if head else "-"), "enq")
    enqueued = pipe.execute() if bufs else []
    return [
        (int(counts.get(buf.encode(), 0)), int(enq) if enq is not None else None)
        for buf, enq in zip(bufs, enqueued, strict=True)
    ]


def buffer_name_of(client: Redis, keys: Keys, number: Any) -> str | None:
    """The buffer a request hash's ``buf`` field (its buffer's number) stands for."""
    if number is None:
        return None
    field = text(number)
    if ":" in field:
        return field  # written before buffers had numbers: the name itself
    name: Any = client.hget(keys.buffer_names, field)
    return text(name) if name is not None else None


def upgrade_buffers(client: Redis, scripts: Scripts, keys: Keys) -> int:
    """Move pending buffers an older batchbridge kept as sorted sets to lists; ids moved."""
    return sum(
        int(scripts.run("upgrade_buffer", [], [keys.base, text(buf)]))
        for buf in client.hkeys(keys.buffers)
    )


def server_time_ms(client: Any) -> int:
    """The Redis server's clock in ms: the one clock every host's workers share."""
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def text(value: Any) -> str:
    """A Redis reply value as str (replies are bytes; typed stubs also allow str)."""
    return value.decode() if isinstance(value, bytes) else str(value)
