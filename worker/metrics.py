"""Prometheus metrics, computed when scraped from Redis and SQL and from nothing else.

No value lives in a process: gauges are read from the buffers, streams and tables, counters
from the ``{p}:counters`` hash (``shared.counters``), so any number of metrics servers (or
workers) report the same numbers and a restart loses nothing. Labels name providers,
models, states, outcomes and queues, never a request, a URL or anything secret.
``serve_metrics`` runs the HTTP endpoint behind ``batchbridge metrics``.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from redis import Redis
from redis.exceptions import RedisError
from sqlalchemy import Engine, func
from sqlmodel import Session, select

from shared.counters import LATENCY_BUCKETS, CounterValues, parse_counters
from shared.db import make_engine
from shared.embedded_redis import RedisUnavailable, resolve_redis_url
from shared.models import TERMINAL_REQUEST_STATES, Batch, BatchState
from shared.pricing import PriceFileError, PriceTable, load_price_table
from shared.redis_layout import CALLBACK_GROUP, Keys, pending_heads, split_buffer_name, text
from shared.settings import Settings

log = logging.getLogger(__name__)

P = "batchbridge_"
OUTCOMES = sorted(state.value for state in TERMINAL_REQUEST_STATES)
WEBHOOK_RESULTS = ("delivered", "retrying", "dead")
_HELD_STATES = (BatchState.PACKED.value, BatchState.UPLOADED.value)


class BatchbridgeCollector:
    """A prometheus_client Collector whose ``collect()`` reads everything afresh.

    A source that cannot be read (Redis or SQL down) leaves its metrics out of that scrape
    and reports ``batchbridge_metrics_source_up{source=...} 0``, rather than failing it.
    """

    def __init__(
        self, settings: Settings, *, redis: Redis | None = None, engine: Engine | None = None
    ) -> None:
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self._redis = redis
        self._own_redis = redis is None
        self._engine = engine
        self._own_engine = engine is None
        self._lock = threading.Lock()
        self._failing: set[str] = set()

    def describe(self) -> Iterable[Metric]:
        """Nothing: registering must not touch Redis or SQL (the registry calls this)."""
        return []

    def collect(self) -> Iterable[Metric]:
        """Every metric family, read now."""
        families: list[Metric] = []
        up = GaugeMetricFamily(
            f"{P}metrics_source_up",
            "1 if the source could be read for this scrape",
            labels=["source"],
        )
        for source, read in (("redis", self._redis_families), ("sql", self._sql_families)):
            ok = self._read(source, read, families)
            up.add_metric([source], 1.0 if ok else 0.0)
        families.append(up)
        return families

    def close(self) -> None:
        """Close the connections this collector opened."""
        with self._lock:
            if self._own_redis and self._redis is not None:
                self._redis.close()
                self._redis = None
            if self._own_engine and self._engine is not None:
                self._engine.dispose()
                self._engine = None

    def _read(self, source: str, read: Callable[[], list[Metric]], families: list[Metric]) -> bool:
        try:
            families.extend(read())
        except Exception as exc:  # one source down must not fail the other's metrics
            if source not in self._failing:  # once per outage, not once per scrape
                self._failing.add(source)
                log.warning("metrics: cannot read %s: %s", source, _describe(exc))
            if isinstance(exc, RedisError | RedisUnavailable) and self._own_redis:
                self._drop_redis()  # an embedded Redis may come back on another port
            return False
        if source in self._failing:
            self._failing.discard(source)
            log.info("metrics: %s can be read again", source)
        return True

    def _client(self) -> Redis:
        with self._lock:
            if self._redis is None:
                self._redis = Redis.from_url(
                    resolve_redis_url(self.settings), socket_timeout=10, socket_connect_timeout=5
                )
            return self._redis

    def _drop_redis(self) -> None:
        with self._lock:
            if self._redis is not None:
                self._redis.close()
                self._redis = None

    def _prices(self) -> PriceTable | None:
        # Read on each scrape (a small file), so an edited price file counts from then on.
        try:
            prices = load_price_table(self.settings.prices_file)
        except PriceFileError as exc:
            if "prices" not in self._failing:
                self._failing.add("prices")
                log.warning("metrics: no cost metrics: %s", exc)
            return None
        self._failing.discard("prices")
        return prices

    def _sql(self) -> Engine:
        with self._lock:
            if self._engine is None:
                self._engine = make_engine(self.settings)
            return self._engine

    def _redis_families(self) -> list[Metric]:
        client, keys = self._client(), self.keys
        pipe = client.pipeline(transaction=False)
        pipe.time()
        pipe.hgetall(keys.buffers)
        pipe.hgetall(keys.counters)
        pipe.smembers(keys.callback_queues)
        pipe.zcard(keys.webhook_queue)
        (seconds, micros), buffers, counters, queues, outbox = pipe.execute()
        now_ms = seconds * 1000 + micros // 1000  # Redis' clock: the same for every scraper
        values = parse_counters(counters)
        families = _pending_families(client, keys, buffers, now_ms)
        families += _counter_families(values)
        families += _cost_families(values, self._prices())
        families += _callback_families(client, keys, sorted(text(q) for q in queues))
        families.append(
            GaugeMetricFamily(
                f"{P}webhook_outbox",
                "webhook deliveries waiting to be sent or being sent",
                value=int(outbox),
            )
        )
        return families

    def _sql_families(self) -> list[Metric]:
        with Session(self._sql()) as session:
            by_state = list(
                session.exec(
                    select(Batch.provider, Batch.model, Batch.state, func.count()).group_by(
                        Batch.provider, Batch.model, Batch.state
                    )
                )
            )
            held = list(
                session.exec(
                    select(Batch.provider, Batch.model, func.count())
                    .where(Batch.held_since.is_not(None))  # type: ignore[union-attr]
                    .where(Batch.state.in_(_HELD_STATES))  # type: ignore[attr-defined]
                    .group_by(Batch.provider, Batch.model)
                )
            )
        batches = GaugeMetricFamily(
            f"{P}batches",
            "batches in the SQL record by state (finished ones until retention prunes them)",
            labels=["provider", "model", "state"],
        )
        counts = {(p, m, s): n for p, m, s, n in by_state}
        # Every state for every (provider, model) seen, so a state that empties reads 0 and
        # does not just vanish.
        for provider, model in sorted({(p, m) for p, m, _ in counts}):
            for state in BatchState:
                n = counts.get((provider, model, state.value), 0)
                batches.add_metric([provider, model, state.value], n)
        held_family = GaugeMetricFamily(
            f"{P}batches_held",
            "packed or uploaded batches on hold: the provider refuses them or retries ran out",
            labels=["provider", "model"],
        )
        on_hold = {(p, m): n for p, m, n in held}
        for provider, model in sorted({(p, m) for p, m, _ in counts}):
            held_family.add_metric([provider, model], on_hold.get((provider, model), 0))
        return [batches, held_family]


def _pending_families(
    client: Redis, keys: Keys, buffers: dict[Any, Any], now_ms: int
) -> list[Metric]:
    bufs = sorted((text(b), int(n)) for b, n in buffers.items())
    heads = pending_heads(client, keys, [buf for buf, _ in bufs])
    labels = ["provider", "model"]
    requests = GaugeMetricFamily(
        f"{P}pending_requests", "requests waiting in a pending buffer", labels=labels
    )
    size = GaugeMetricFamily(
        f"{P}pending_bytes", "bytes (lines and metadata) waiting in a pending buffer", labels=labels
    )
    oldest = GaugeMetricFamily(
        f"{P}oldest_pending_age_seconds",
        "age of the oldest pending request, since it was first submitted (0 when none)",
        labels=labels,
    )
    for (buf, n_bytes), (count, enq) in zip(bufs, heads, strict=True):
        # A request that names no provider waits under "default" until a worker packs it.
        label = list(split_buffer_name(buf))
        requests.add_metric(label, count)
        size.add_metric(label, n_bytes)
        age = max(now_ms - enq, 0) / 1000 if enq is not None else 0.0
        oldest.add_metric(label, age)
    return [requests, size, oldest]


def _counter_families(values: CounterValues) -> list[Metric]:
    outcomes = CounterMetricFamily(
        f"{P}requests", "requests that reached their outcome", labels=["outcome"]
    )
    for outcome in sorted({*OUTCOMES, *values.requests}):
        outcomes.add_metric([outcome], values.requests.get(outcome, 0))
    retries = CounterMetricFamily(
        f"{P}request_retries",
        "requests sent round again (a retryable error, or a batch that never ran)",
        labels=["provider", "model"],
    )
    for (provider, model), n in sorted(values.retries.items()):
        retries.add_metric([provider, model], n)
    families: list[Metric] = [outcomes, retries, _latency_family(values)]
    for kind in ("prompt", "completion"):
        tokens = CounterMetricFamily(
            f"{P}{kind}_tokens",
            f"{kind} tokens of finished batches, as the provider reported them (dry_run: "
            "the local echo engine answered, no model ran)",
            labels=["provider", "model", "dry_run"],
        )
        for (provider, model, counted, dry), n in sorted(values.tokens.items()):
            if counted == kind:
                tokens.add_metric([provider, model, "true" if dry else "false"], n)
        families.append(tokens)
    errors = CounterMetricFamily(
        f"{P}provider_api_errors",
        "provider calls that failed, by status code (none: no HTTP answer, e.g. a timeout)",
        labels=["provider", "operation", "status_code"],
    )
    for (provider, operation, status), n in sorted(values.provider_errors.items()):
        errors.add_metric([provider, operation, status], n)
    webhooks = CounterMetricFamily(
        f"{P}webhook_deliveries",
        "webhook attempts settled: delivered and dead end a delivery, retrying schedules "
        "another attempt",
        labels=["result"],
    )
    for result in sorted({*WEBHOOK_RESULTS, *values.webhooks}):
        webhooks.add_metric([result], values.webhooks.get(result, 0))
    responses = CounterMetricFamily(
        f"{P}webhook_responses",
        "answers to webhook attempts by status class (error: none, e.g. a timeout)",
        labels=["status_class"],
    )
    for status_class, n in sorted(values.webhook_statuses.items()):
        responses.add_metric([status_class], n)
    return [*families, errors, webhooks, responses]


def _cost_families(values: CounterValues, prices: PriceTable | None) -> list[Metric]:
    if prices is None:
        return []
    labels = ["provider", "model"]
    # Gauges, not counters: the token counters are priced with today's table at every scrape,
    # so a price change moves the whole value, down as well as up, which a counter must not.
    batch = GaugeMetricFamily(
        f"{P}cost_usd",
        "what the tokens of finished batches cost at the price table's batch prices "
        "(priced models only; a price change reprices them all)",
        labels=labels,
    )
    realtime = GaugeMetricFamily(
        f"{P}realtime_cost_usd",
        "what the same tokens would cost at real-time prices (the savings: the difference)",
        labels=labels,
    )
    used: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)
    for (provider, model, kind, dry), n in values.tokens.items():
        if not dry:  # echo answers cost nothing, whatever the model's name
            used[(provider, model)][kind] = n
    for (provider, model), tokens in sorted(used.items()):
        # An unpriced model gets no cost series at all, never a cost of 0.
        cost = prices.cost(model, tokens.get("prompt", 0), tokens.get("completion", 0))
        if cost is not None:
            batch.add_metric([provider, model], float(cost.batch))
            realtime.add_metric([provider, model], float(cost.realtime))
    return [batch, realtime]


def _latency_family(values: CounterValues) -> HistogramMetricFamily:
    family = HistogramMetricFamily(
        f"{P}request_latency_seconds",
        "time from submit to outcome, for requests whose submit time Redis still had",
        labels=["outcome"],
    )
    for outcome in sorted({*OUTCOMES, *values.latency_buckets}):
        own = values.latency_buckets.get(outcome, {})
        # The script writes each observation to one bucket; Prometheus wants them cumulative.
        # Bounds found in Redis but not declared here still count (and are shown).
        finite = {float(le): n for le, n in own.items() if le != "+Inf"}
        bounds = sorted({*LATENCY_BUCKETS, *finite})
        running, buckets = 0, []
        for bound in bounds:
            running += finite.get(bound, 0)
            buckets.append((str(float(bound)), float(running)))  # 1.0, as Go writes it
        running += own.get("+Inf", 0)
        buckets.append(("+Inf", float(running)))
        family.add_metric([outcome], buckets, values.latency_sum_ms.get(outcome, 0) / 1000)
    return family


def _callback_families(client: Redis, keys: Keys, queues: list[str]) -> list[Metric]:
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        pipe.xlen(keys.callback(queue))
        pipe.xpending(keys.callback(queue), CALLBACK_GROUP)
        pipe.xlen(keys.callback_dead(queue))
    # A queue no consumer has opened has no group yet: XPENDING fails for it alone.
    replies = pipe.execute(raise_on_error=False) if queues else []
    backlog = GaugeMetricFamily(
        f"{P}callback_backlog",
        "results on a callback queue that no consumer has acked yet",
        labels=["queue"],
    )
    unacked = GaugeMetricFamily(
        f"{P}callback_unacked",
        "results handed to a consumer and not acked yet (part of the backlog)",
        labels=["queue"],
    )
    dead = GaugeMetricFamily(
        f"{P}callback_dead_letters",
        "results moved to the queue's dead-letter stream after too many deliveries",
        labels=["queue"],
    )
    for i, queue in enumerate(queues):
        length, pending, dead_length = replies[3 * i : 3 * i + 3]
        for reply in (length, dead_length):
            if isinstance(reply, Exception):
                raise reply
        backlog.add_metric([queue], int(length))
        in_flight = pending.get("pending", 0) if isinstance(pending, dict) else 0
        unacked.add_metric([queue], int(in_flight))
        dead.add_metric([queue], int(dead_length))
    return [backlog, unacked, dead]


def _describe(exc: Exception) -> str:
    # The exception's own text: redis-py and SQLAlchemy name the host, never the password.
    return f"{type(exc).__name__}: {exc}"
