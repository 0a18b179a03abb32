"""What ``batchbridge status`` reports, read from Redis (the buffer) and SQL (the record).

``status --json`` prints :func:`collect_status`'s dict. Its keys are stable (new ones may be
added; none is renamed or removed). Ages and durations are seconds, times ISO 8601 in UTC.

* ``generated_at``: when the report was read.
* ``sources``: ``redis`` and ``database``, the URLs read, any password shown as ``***``.
* ``thresholds``: ``max_batch_requests``, ``max_batch_bytes``, ``max_wait_seconds``,
  ``aggregate_interval_seconds``: the settings the flush decisions below use.
* ``pending``: one entry per non-empty buffer: ``provider``, ``model``, ``count``, ``bytes``,
  ``oldest_age_seconds`` and ``flush``: ``due`` (a threshold is met: packed at the next
  aggregate tick), ``reason`` (``count``, ``bytes``, ``age`` or null), ``in_seconds`` (until
  the age limit; 0 when due), ``text`` (the same in words), ``max_requests``, ``max_bytes``,
  ``max_wait_seconds``.
* ``uncommitted_claims``: claims being packed into batch files right now.
* ``batches``: per (``provider``, ``state``, ``status``): ``count``, ``requests``,
  ``completed``, ``failed``, ``requeued`` (request counts; live for unfinished batches),
  ``oldest_age_seconds`` and, for ended batches, ``last_ended_seconds_ago``. ``state`` is the
  SQL state, ``status`` what the batch amounts to: ``held``, ``failed`` (also a batch the
  record calls ``finished`` whose outcome is failed), ``cancelled``, ``requeued``,
  ``expired``, ``lost``, ``no_output``, else the state.
* ``active_batches`` (the 20 oldest unfinished), ``held_batches`` (all held, oldest first),
  ``failed_batches`` (the 10 most recent; ``failed_batches_total`` counts them all),
  ``batches_with_errors`` (the 10 most recently updated unfinished batches with an error):
  batch summaries with ``batch``, ``provider``, ``model``, ``state``, ``status``,
  ``outcome``, ``requests``, ``completed``, ``failed``, ``requeued``, ``age_seconds``,
  ``created_at``, ``finished_at``, ``provider_batch_id``, ``provider_status``,
  ``held_since``, ``cancel_requested_at``, ``error`` (the reason).
* ``requests``: ``last_hour`` and ``last_day``, each ``{completed, failed, cancelled}``:
  requests that reached that outcome in the window (from the SQL record).
* ``callback_queues``: per queue: ``queue``, ``length`` (entries in its stream),
  ``unacked`` (not yet acknowledged by the consumer group: ``delivered`` to a consumer and
  awaiting its ack, plus ``undelivered``), ``consumers``, ``oldest_age_seconds`` (of the
  oldest entry) and ``dead`` (entries in its dead-letter stream).
* ``webhooks``: deliveries per state in the record (``pending``, ``delivered``, ``dead``:
  dead letters) and ``outbox`` (deliveries queued in Redis).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from redis import Redis
from redis.exceptions import ResponseError
from sqlalchemy import Engine
from sqlmodel import Session

from shared.db import make_engine
from shared.embedded_redis import resolve_redis_url
from shared.redis_layout import CALLBACK_GROUP, Keys, server_time_ms, text
from shared.settings import Settings
from shared.urls import safe_url
from worker import status_record as record
from worker.status_buffers import buffer_report, read_buffers

_ACTIVE_SHOWN = 20


class StatusSource:
    """Connections to Redis and the database, kept open across ``status --watch`` refreshes."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self._redis_url = resolve_redis_url(settings)
        self.redis = Redis.from_url(self._redis_url, socket_connect_timeout=5, socket_timeout=10)
        self._engine: Engine | None = None

    @property
    def engine(self) -> Engine:
        """The database engine, made on first use."""
        if self._engine is None:
            self._engine = make_engine(self.settings)
        return self._engine

    def collect(self) -> dict[str, Any]:
        """One status report (see the module docstring for its keys)."""
        s = self.settings
        now = datetime.now(UTC)
        now_ms = server_time_ms(self.redis)  # enqueue times are the Redis server's clock
        buffers = read_buffers(self.redis, self.keys, now_ms)
        report: dict[str, Any] = {
            "generated_at": now.isoformat(),
            "sources": {"redis": safe_url(self._redis_url), "database": safe_database_url(s)},
            "thresholds": {
                "max_batch_requests": s.max_batch_requests,
                "max_batch_bytes": s.max_batch_bytes,
                "max_wait_seconds": s.max_wait_seconds,
                "aggregate_interval_seconds": s.aggregate_interval_seconds,
            },
            "pending": [buffer_report(b, s) for b in buffers],
            "uncommitted_claims": int(self.redis.zcard(self.keys.claims)),
        }
        with Session(self.engine) as session:
            report["batches"] = record.batch_groups(session, now)
            report["active_batches"] = record.active_batches(session, now, _ACTIVE_SHOWN)
            report["held_batches"] = record.list_batches(session, now, "held", 1000, oldest=True)
            report["failed_batches"] = record.failed_batches(session, now)
            report["failed_batches_total"] = record.count_batches(session, "failed")
            report["batches_with_errors"] = record.errored_batches(session, now)
            report["requests"] = record.request_outcomes(session, now)
            webhooks = record.webhook_counts(session)
        report["callback_queues"] = callback_queues(self.redis, self.keys, now_ms)
        report["webhooks"] = {**webhooks, "outbox": int(self.redis.zcard(self.keys.webhook_queue))}
        return report

    def close(self) -> None:
        """Close the connections."""
        self.redis.close()
        if self._engine is not None:
            self._engine.dispose()

    def __enter__(self) -> StatusSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def collect_status(settings: Settings) -> dict[str, Any]:
    """One status report from freshly opened (and closed) connections."""
    with StatusSource(settings) as source:
        return source.collect()


def safe_database_url(settings: Settings) -> str:
    """The database URL with any password (in its user part or its query) masked."""
    return safe_url(settings.sqlalchemy_url)


def callback_queues(client: Redis, keys: Keys, now_ms: int) -> list[dict[str, Any]]:
    """Backlog of every callback queue found in Redis (its stream or dead-letter stream)."""
    live, dead = f"{keys.prefix}:cb:", f"{keys.prefix}:cbdead:"
    names = {text(k).removeprefix(live) for k in client.scan_iter(match=f"{live}*", count=1000)}
    names |= {text(k).removeprefix(dead) for k in client.scan_iter(match=f"{dead}*", count=1000)}
    ordered = sorted(names)
    pipe = client.pipeline(transaction=False)
    for name in ordered:
        pipe.xlen(keys.callback(name))
        pipe.xinfo_groups(keys.callback(name))
        pipe.xrange(keys.callback(name), count=1)
        pipe.xlen(keys.callback_dead(name))
    replies = pipe.execute(raise_on_error=False)
    queues = []
    for i, name in enumerate(ordered):
        length, groups, first, dead_n = replies[4 * i : 4 * i + 4]
        length = 0 if isinstance(length, ResponseError) else int(length)
        group = _group(groups)
        delivered = int(group["pending"]) if group else 0
        lag = group.get("lag") if group else None
        # Without a group nobody has read anything; acked entries are deleted (XACK + XDEL),
        # so when Redis cannot tell the lag, what is left beyond the delivered is undelivered.
        undelivered = length if not group else int(lag) if lag is not None else length - delivered
        undelivered = max(0, undelivered)
        oldest = None
        if first and not isinstance(first, ResponseError):
            oldest = round(max(0, now_ms - int(text(first[0][0]).split("-")[0])) / 1000, 1)
        queues.append(
            {
                "queue": name,
                "length": length,
                "unacked": delivered + undelivered,
                "delivered": delivered,
                "undelivered": undelivered,
                "consumers": int(group["consumers"]) if group else 0,
                "oldest_age_seconds": oldest,
                "dead": 0 if isinstance(dead_n, ResponseError) else int(dead_n),
            }
        )
    return queues


def _group(groups: Any) -> dict[Any, Any] | None:
    if isinstance(groups, ResponseError):
        return None
    for group in groups:
        if text(group.get("name", b"")) == CALLBACK_GROUP:
            return dict(group)
    return None
