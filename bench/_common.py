"""What the benchmark cases share: a throwaway Redis, realistic payloads, statistics."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import redis
from redis import Redis

from shared.embedded_redis import EmbeddedRedis

REDIS_URL_ENV = "BATCHBRIDGE_BENCH_REDIS_URL"
MODEL = "meta-llama/Llama-3.3-70B-Instruct-Turbo"
MAX_TOKENS = 256

SYSTEM_PROMPT = (
    "You are the customer-support assistant of Northwind Home, an online shop for kitchen "
    "appliances. Read the customer's review and classify it. Answer with a JSON object with "
    'the keys "sentiment" (one of "positive", "neutral", "negative"), "topics" (a list of at '
    'most three of "delivery", "quality", "price", "support", "packaging") and "reply" (one '
    "or two polite sentences in the customer's language that thank them and, if the review "
    "is negative, tell them how to reach support). Never invent order details and never "
    "promise refunds."
)
REVIEW = (
    "Review #{n} of order NW-{n:07d}: I bought the 1.7 litre glass kettle three weeks ago. "
    "It boils quickly and is quieter than my old one. However, the lid started to stick "
    "after a few days and now I need both hands to open it. Delivery was fast, but the box "
    "was dented. Is this a known problem? Overall I would give it three stars out of five."
)


def chat_request(n: int = 0) -> dict[str, Any]:
    """The arguments of one ``Producer.submit``: a system prompt and a ~0.5 KB review."""
    return {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": REVIEW.format(n=n)},
        ],
        "max_tokens": MAX_TOKENS,
    }


def sized_request(size: int, n: int = 0) -> dict[str, Any]:
    """A chat request whose body JSON is ``size`` bytes (give or take a few): a review padded."""
    request = chat_request(n)
    request["messages"] = [{"role": "user", "content": REVIEW.format(n=n)}]
    short = len(body_bytes(request))
    if size < short:
        request["messages"][0]["content"] = request["messages"][0]["content"][: size - short]
    else:
        # The review has no characters JSON escapes, so characters and bytes agree.
        filler = (" " + REVIEW.format(n=n)) * (size // len(REVIEW) + 1)
        request["messages"][0]["content"] += filler[: size - short]
    return request


def body_bytes(request: dict[str, Any]) -> bytes:
    """The body JSON the producer stores for ``request`` (it has no producer-only options)."""
    return orjson.dumps(request)


@contextlib.contextmanager
def bench_redis() -> Iterator[str]:
    """The URL of a Redis to measure on: ``$BATCHBRIDGE_BENCH_REDIS_URL`` or a private one.

    The benchmarks FLUSHDB it, so an external URL must name a scratch database.
    """
    url = os.environ.get(REDIS_URL_ENV)
    if url:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="bb-bench-redis-") as tmp:
        server = EmbeddedRedis(Path(tmp), persistent=False)
        server.start()
        try:
            yield server.url
        finally:
            server.stop()


def environment(client: Redis) -> dict[str, Any]:
    """What the numbers depend on besides the code, so result files can be compared."""
    info: dict[str, Any] = client.info("server")
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg": " ".join(f"{x:.2f}" for x in load),
        "redis_server": info.get("redis_version"),
        "redis_py": redis.__version__,
        "hiredis": bool(redis.utils.HIREDIS_AVAILABLE),
        "external_redis": bool(os.environ.get(REDIS_URL_ENV)),
    }


def median(values: Sequence[float]) -> float:
    """The median, which one descheduled round on a noisy VM cannot drag."""
    return float(statistics.median(values))


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """The 25th and 75th percentiles: how far the rounds disagree, without the outliers."""
    q1, _, q3 = statistics.quantiles(values, n=4)
    return q1, q3
