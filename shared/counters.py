"""The monotonic counters behind the Prometheus metrics: one Redis hash, ``{p}:counters``.

A counter cannot be derived from SQL, which retention prunes, nor kept in a process, which
restarts and is one of many: each is a hash field incremented in Redis where its event
happens, so every worker and metrics server reads the same numbers. Fields:

``requests:{outcome}``                          requests that reached an outcome  (_terminal.lua)
``lat:{outcome}:{le}``, ``lat_ms:{outcome}``    their submit-to-outcome latency: the count in
                                                the smallest bucket holding it, and the sum in
                                                milliseconds  (_terminal.lua)
``retries:{provider}:{model}``                  requests sent round again  (requeue.lua)
``tokens:{kind}:{dry}:{provider}:{model}``     prompt or completion tokens of finished batches;
                                                dry is 1 when an echo engine answered (no model
                                                ran, nothing to pay)  (worker.collection)
``provider_errors:{provider}:{operation}:{status}``  provider calls that raised ProviderError
``webhooks:{result}``                           settled webhook attempts: delivered, retrying,
                                                dead  (worker.webhook_sender)
``webhook_status:{class}``                      answers to attempts sent: 2xx..5xx, or error

The Lua ones change in the same script as their event, so they are exact. The Python ones
are added right after the durable step (the SQL commit): a crash in between loses that one
increment, never counts it twice. A Redis that is wiped starts them again from 0, which
Prometheus reads as a counter reset.
"""

from __future__ import annotations

import functools
import logging
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from redis import Redis
from redis.exceptions import RedisError

from shared.providers.base import BatchProvider, ProviderError
from shared.redis_layout import Keys, split_buffer_name, text

log = logging.getLogger(__name__)

# Upper bounds (seconds) of the latency histogram; _terminal.lua's BB_LATENCY_BUCKETS must
# hold the same. Batches take minutes to a day, so the buckets run from 1 s to 24 h.
LATENCY_BUCKETS = (
    1.0,
    5.0,
    15.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1200.0,
    1800.0,
    3600.0,
    7200.0,
    14400.0,
    28800.0,
    86400.0,
)
# The calls of BatchProvider whose failures are counted.
PROVIDER_CALLS = (
    "upload_file",
    "create_batch",
    "get_batch",
    "cancel_batch",
    "list_batches",
    "file_exists",
    "download_file",
    "delete_file",
)
NO_STATUS = "none"  # the status_code label of a failure without an HTTP answer (a timeout)
_COUNTED = "_batchbridge_counted"
F = TypeVar("F", bound=Callable[..., Any])


class Counters:
    """Adds to the counters hash of one key prefix; never fails the work it counts."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._redis = redis
        self._key = keys.counters

    def add(self, increments: Mapping[str, int]) -> None:
        """Add each value to its field, in one round trip; a Redis error is only logged."""
        due = {name: n for name, n in increments.items() if n}
        if not due:
            return
        try:
            pipe = self._redis.pipeline(transaction=False)
            for name, n in due.items():
                pipe.hincrby(self._key, name, n)
            pipe.execute()
        except RedisError as exc:
            # The work itself is done and recorded; a lost increment only skews a metric.
            log.warning("could not update the metrics counters: %s", exc)

    def provider_error(self, provider: str, operation: str, status_code: int | None) -> None:
        """Count one failed provider call."""
        status = NO_STATUS if status_code is None else str(status_code)
        self.add({f"provider_errors:{provider}:{operation}:{status}": 1})

    def tokens(
        self, provider: str, model: str, prompt: int, completion: int, *, dry_run: bool
    ) -> None:
        """Count the tokens of a finished batch (``dry_run``: the echo engine's, unpaid)."""
        dry = int(dry_run)
        self.add(
            {
                f"tokens:prompt:{dry}:{provider}:{model}": prompt,
                f"tokens:completion:{dry}:{provider}:{model}": completion,
            }
        )

    def webhook_attempt(self, result: str, status: int | None, *, sent: bool) -> None:
        """Count one settled webhook attempt (``result``: delivered, retrying or dead)."""
        increments = {f"webhooks:{result}": 1}
        if sent:
            status_class = "error" if status is None else f"{status // 100}xx"
            increments[f"webhook_status:{status_class}"] = 1
        self.add(increments)


def instrument_provider(provider: BatchProvider, counters: Counters) -> BatchProvider:
    """The same provider, each call counting the ProviderErrors it raises; returns it."""
    # Wrapped in place rather than behind a proxy: callers rely on the object itself (its
    # class, the local provider's store). One wrapper per call covers every place a provider
    # error is handled, present and future.
    for operation in PROVIDER_CALLS:
        method = getattr(provider, operation, None)
        if method is None or getattr(method, _COUNTED, False):
            continue
        setattr(provider, operation, _counted(method, provider.name, operation, counters))
    return provider


def _counted(method: F, provider: str, operation: str, counters: Counters) -> F:
    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except ProviderError as exc:
            counters.provider_error(provider, operation, exc.status_code)
            raise

    setattr(call, _COUNTED, True)
    return call  # type: ignore[return-value]


@dataclass
class CounterValues:
    """The counters hash, read back by field kind."""

    requests: dict[str, int] = field(default_factory=dict)
    # outcome -> bucket upper bound (as written, "+Inf" included) -> count in that bucket only
    latency_buckets: dict[str, dict[str, int]] = field(default_factory=lambda: defaultdict(dict))
    latency_sum_ms: dict[str, int] = field(default_factory=dict)
    retries: dict[tuple[str, str], int] = field(default_factory=dict)
    # (provider, model, "prompt" | "completion", dry run) -> tokens
    tokens: dict[tuple[str, str, str, bool], int] = field(default_factory=dict)
    provider_errors: dict[tuple[str, str, str], int] = field(default_factory=dict)
    webhooks: dict[str, int] = field(default_factory=dict)
    webhook_statuses: dict[str, int] = field(default_factory=dict)


def read_counters(redis: Any, keys: Keys) -> CounterValues:
    """Every counter, from one HGETALL (``redis`` may be a client or a pipeline's reply)."""
    raw: dict[Any, Any] = redis.hgetall(keys.counters)
    return parse_counters(raw)


def parse_counters(raw: Mapping[Any, Any]) -> CounterValues:
    """Sort the fields of the counters hash by kind; fields of unknown kinds are ignored."""
    values = CounterValues()
    for raw_name, raw_value in raw.items():
        name, n = text(raw_name), int(raw_value)
        kind, _, rest = name.partition(":")
        # Model names may hold colons, provider names never: the model always comes last.
        if kind == "requests":
            values.requests[rest] = n
        elif kind == "lat":
            outcome, _, le = rest.partition(":")
            values.latency_buckets[outcome][le] = n
        elif kind == "lat_ms":
            values.latency_sum_ms[rest] = n
        elif kind == "retries":
            values.retries[split_buffer_name(rest)] = n
        elif kind == "tokens":
            parts = rest.split(":", 3)
            if len(parts) == 4:
                counted, dry, provider, model = parts
                values.tokens[(provider, model, counted, dry == "1")] = n
        elif kind == "provider_errors":
            parts = rest.split(":", 2)
            if len(parts) == 3:
                values.provider_errors[(parts[0], parts[1], parts[2])] = n
        elif kind == "webhooks":
            values.webhooks[rest] = n
        elif kind == "webhook_status":
            values.webhook_statuses[rest] = n
    return values
