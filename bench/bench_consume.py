"""Consume: results off a callback queue with ``get_many``/``ack_many`` against raw
``XREADGROUP COUNT 500`` + ``XACK`` + ``XDEL`` of the same entries (target: >= 0.5x), and the
one-at-a-time ``get``/``ack`` for reference.

Each round fills the stream with the same results (what the collector appends: one
``result`` field of Result JSON, a ~0.5 KB completion), drains it with one side, then the
other; which side goes first alternates. The median of the per-round ratios is judged.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from redis import Redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    bench_redis,
    environment,
    flush_stdout,
    median,
    quartiles,
    table,
    verdict,
    write_results,
)
from producer import CallbackQueue
from shared.redis_layout import CALLBACK_GROUP, Keys
from shared.schemas import Result
from shared.settings import Settings

QUEUE = "bench"
CHUNK = 500
TARGET = 0.5
COMPLETION = {
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


def main() -> int:
    """Run the rounds, print the table and the verdict, write the results file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=int, default=50_000, help="results per round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds (each side once)")
    args = parser.parse_args()
    with bench_redis() as url:
        client = Redis.from_url(url)
        client.flushdb()
        settings = Settings.load(redis_url=url, data_dir=Path("/tmp/bb-bench-consume"))
        key = Keys(settings.key_prefix).callback(QUEUE)
        raw_key = Keys(settings.key_prefix).callback("raw")  # the same entries, read raw
        queue = CallbackQueue(QUEUE, settings=settings)
        queue.get_many(1, timeout=0)  # the group exists, the script is loaded
        client.xgroup_create(raw_key, CALLBACK_GROUP, id="$", mkstream=True)

        def ours() -> int:
            n = 0
            while chunk := queue.get_many(CHUNK, timeout=0):
                n += queue.ack_many(chunk)
            return n

        def raw() -> int:
            n = 0
            while True:
                reply = client.xreadgroup(CALLBACK_GROUP, "c", {raw_key: ">"}, count=CHUNK)
                if not reply or not reply[0][1]:
                    return n
                ids = [entry_id for entry_id, _fields in reply[0][1]]
                pipe = client.pipeline(transaction=True)
                pipe.xack(raw_key, CALLBACK_GROUP, *ids)
                pipe.xdel(raw_key, *ids)
                acked, _ = pipe.execute()
                n += int(acked)

        def one_at_a_time() -> int:
            n = 0
            while (delivery := queue.get(timeout=0)) is not None:
                delivery.ack()
                n += 1
            return n

        ratios: list[float] = []
        rates: dict[str, list[float]] = {"get_many+ack_many": [], "raw": [], "get+ack": []}
        for round_ in range(args.rounds):
            sides = [("get_many+ack_many", ours), ("raw", raw)]
            if round_ % 2:
                sides.reverse()
            seconds: dict[str, float] = {}
            for name, fn in sides:
                fill(client, raw_key if name == "raw" else key, args.results)
                took, n = timed(fn)
                assert n == args.results, (name, n)
                seconds[name] = took
                rates[name].append(n / took)
            ratios.append(seconds["raw"] / seconds["get_many+ack_many"])
            print(f"round {round_ + 1}: ratio {ratios[-1]:.2f}", flush=True)
        # The one-at-a-time reference, once, on a tenth of the results.
        fill(client, key, args.results // 10)
        took, n = timed(one_at_a_time)
        rates["get+ack"].append(n / took)
        client.flushdb()
        env = environment(client)
        queue.close()
        client.close()

    rows = [[name, f"{median(r):,.0f}"] for name, r in rates.items()]
    print(table(["consumer", "results/s (median)"], rows))
    q1, q3 = quartiles(ratios) if len(ratios) > 1 else (ratios[0], ratios[0])
    ratio = median(ratios)
    line = verdict(
        "consume",
        ratio >= TARGET,
        f"get_many+ack_many at {ratio:.2f}x raw XREADGROUP+XACK+XDEL (IQR {q1:.2f}-{q3:.2f}); "
        f"target >= {TARGET}x",
    )
    print(line)
    flush_stdout()
    write_results(
        "consume",
        {
            "environment": env,
            "results_per_round": args.results,
            "ratios": ratios,
            "rates": rates,
            "verdict": line,
        },
    )
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
