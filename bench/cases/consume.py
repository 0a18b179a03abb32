"""Consume: results off a callback queue with ``get_many``/``ack_many`` against raw
``XREADGROUP COUNT 500`` + ``XACK`` + ``XDEL`` of the same entries (target: >= 0.5x); the
one-at-a-time ``get``/``ack`` for reference.

Each round fills two streams with the same results (what the collector appends: one ``result``
field of Result JSON, a ~0.5 KB completion), drains one with each side, which side goes first
alternating. The median of the per-round ratios is judged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from bench._common import median, quartiles
from bench.harness import Bench, redis_cpu_seconds
from bench.report import CaseResult
from producer import CallbackQueue
from producer.aio_callback_queue import AsyncCallbackQueue
from shared.redis_layout import CALLBACK_GROUP, Keys
from shared.schemas import Result
from shared.settings import Settings

QUEUE = "bench"
CHUNK = 500
TARGET = 0.5
COMPLETION: dict[str, Any] = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "model": "meta-llama/Llama-3.3-70B-Instruct-Turbo",
    "choices": [
        {
            "index": 0,
            "finish_reason": "stop",
            "message": {
                "role": "assistant",
                "content": '{"sentiment": "neutral", "topics": ["quality", "packaging"], '
                '"reply": "Thank you for your review; we are sorry the lid sticks. Please '
                'write to support@northwind.example and we will help."}',
            },
        }
    ],
    "usage": {"prompt_tokens": 212, "completion_tokens": 48, "total_tokens": 260},
}


def fill(client: Redis, key: str, n: int) -> None:
    """Append ``n`` results to the stream, as the collector does."""
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        result = Result(request_id=f"{i:032x}", status="completed", response=COMPLETION)
        pipe.xadd(key, {"result": result.to_json()})
        if len(pipe) >= 1000:
            pipe.execute()
    pipe.execute()


def timed(fn: Callable[[], int]) -> tuple[float, int]:
    """Seconds ``fn`` took, and how many results it consumed."""
    start = time.perf_counter()
    n = fn()
    return time.perf_counter() - start, n


def cpu_used(client: Redis, fn: Callable[[], int]) -> tuple[float, float, int]:
    """``timed``, and the CPU seconds this process and the Redis server spent meanwhile."""
    cpu, redis_cpu = time.process_time(), redis_cpu_seconds(client)
    took, n = timed(fn)
    return took, time.process_time() - cpu + redis_cpu_seconds(client) - redis_cpu, n


def async_rates(
    client: Redis, url: str, settings: Settings, n: int, rounds: int
) -> dict[str, list[float]]:
    """The same two sides from asyncio code, alternating: AsyncCallbackQueue and redis.asyncio."""
    keys = Keys(settings.key_prefix)
    key, raw_key = keys.callback("async"), keys.callback("async-raw")

    async def both() -> dict[str, list[float]]:
        rates: dict[str, list[float]] = {"ours": [], "raw": []}
        async with (
            AsyncCallbackQueue("async", settings=settings) as queue,
            AsyncRedis.from_url(url) as raw_client,
        ):
            await queue.get_many(1, timeout=0)
            await raw_client.xgroup_create(raw_key, CALLBACK_GROUP, id="$", mkstream=True)

            async def ours() -> int:
                count = 0
                while chunk := await queue.get_many(CHUNK, timeout=0):
                    count += await queue.ack_many(chunk)
                return count

            async def raw() -> int:
                count = 0
                while True:
                    reply = await raw_client.xreadgroup(
                        CALLBACK_GROUP, "c", {raw_key: ">"}, count=CHUNK
                    )
                    if not reply or not reply[0][1]:
                        return count
                    ids = [entry_id for entry_id, _fields in reply[0][1]]
                    async with raw_client.pipeline(transaction=True) as pipe:
                        pipe.xack(raw_key, CALLBACK_GROUP, *ids)
                        pipe.xdel(raw_key, *ids)
                        acked, _ = await pipe.execute()
                    count += int(acked)

            for round_ in range(rounds):
                sides = [("ours", ours, key), ("raw", raw, raw_key)]
                for name, side, stream in sides[:: -1 if round_ % 2 else 1]:
                    fill(client, stream, n)
                    started = time.perf_counter()
                    if (count := await side()) != n:
                        raise AssertionError(f"async {name} consumed {count} of {n} results")
                    rates[name].append(n / (time.perf_counter() - started))
        return rates

    return asyncio.run(both())


def run(bench: Bench) -> CaseResult:
    """Alternate the two sides over the rounds; then one-at-a-time once, on a tenth."""
    result = CaseResult("consume")
    n, rounds = bench.size(50_000, 2_000), bench.size(7, 1)
    client = bench.client()
    settings = bench.settings(bench.data_dir("consume"))
    key = Keys(settings.key_prefix).callback(QUEUE)
    raw_key = Keys(settings.key_prefix).callback("raw")  # the same entries, read raw
    queue = CallbackQueue(QUEUE, settings=settings)
    try:
        queue.get_many(1, timeout=0)  # the group exists, the script is loaded
        client.xgroup_create(raw_key, CALLBACK_GROUP, id="$", mkstream=True)

        def ours() -> int:
            count = 0
            while chunk := queue.get_many(CHUNK, timeout=0):
                count += queue.ack_many(chunk)
            return count

        def raw() -> int:
            count = 0
            while True:
                reply = client.xreadgroup(CALLBACK_GROUP, "c", {raw_key: ">"}, count=CHUNK)
                if not reply or not reply[0][1]:
                    return count
                ids = [entry_id for entry_id, _fields in reply[0][1]]
                pipe = client.pipeline(transaction=True)
                pipe.xack(raw_key, CALLBACK_GROUP, *ids)
                pipe.xdel(raw_key, *ids)
                acked, _ = pipe.execute()
                count += int(acked)

        def one_at_a_time() -> int:
            count = 0
            while (delivery := queue.get(timeout=0)) is not None:
                delivery.ack()
                count += 1
            return count

        ratios: list[float] = []
        rates: dict[str, list[float]] = {"ours": [], "raw": []}
        cpu_us: list[float] = []  # ours, client and Redis, per result
        for round_ in range(rounds):
            sides = [("ours", ours), ("raw", raw)]
            if round_ % 2:
                sides.reverse()
            seconds: dict[str, float] = {}
            for name, fn in sides:
                fill(client, raw_key if name == "raw" else key, n)
                took, cpu, count = cpu_used(client, fn)
                if name == "ours":
                    cpu_us.append(cpu / n * 1e6)
                # A side that skipped entries would look fast.
                if count != n:
                    raise AssertionError(f"{name} consumed {count} of {n} results")
                seconds[name] = took
                rates[name].append(n / took)
            ratios.append(seconds["raw"] / seconds["ours"])
        fill(client, key, n // 10)
        took, count = timed(one_at_a_time)
        if count != n // 10:
            raise AssertionError(f"get+ack consumed {count} of {n // 10} results")
        single = count / took
    finally:
        queue.close()
        client.close()
    ratio = median(ratios)
    q1, q3 = quartiles(ratios) if len(ratios) > 1 else (ratio, ratio)
    result.measure(
        f"get_many({CHUNK}) + ack_many, {n:,} results",
        median(rates["ours"]),
        "results/s",
        baseline=f"XREADGROUP COUNT {CHUNK} + XACK + XDEL",
        baseline_value=median(rates["raw"]),
        round_ratio=ratio,
        detail=f"median of per-round ratios; IQR {q1:.2f}-{q3:.2f} over {len(ratios)} rounds; CPU "
        f"{median(cpu_us):.1f} us per result (this process and Redis)",
    )
    result.measure("get + ack, one at a time", single, "results/s", detail=f"{n // 10:,} results")
    with bench.client() as client:
        async_ = async_rates(client, bench.redis_url, settings, n, bench.size(3, 1))
    ratios_async = [o / r for o, r in zip(async_["ours"], async_["raw"], strict=True)]
    result.measure(
        f"asyncio: get_many({CHUNK}) + ack_many, {n:,} results",
        median(async_["ours"]),
        "results/s",
        baseline=f"redis.asyncio XREADGROUP COUNT {CHUNK} + XACK + XDEL",
        baseline_value=median(async_["raw"]),
        round_ratio=median(ratios_async),
        detail="AsyncCallbackQueue; median of the ratios per round "
        + ", ".join(f"{r:.2f}" for r in ratios_async),
    )
    result.target("get_many + ack_many vs raw XREADGROUP + XACK", ratio, TARGET, "min", "x")
    result.data = {
        "ratios": ratios,
        "rates": rates,
        "single_rate": single,
        "cpu_us": cpu_us,
        "async_rates": async_,
    }
    return result
