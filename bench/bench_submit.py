"""How fast the producer enqueues, relative to the cheapest way to put the same bytes in Redis.

Targets (one Redis, one run):

* ``Producer.submit`` in a loop reaches >= 60% of the rate of a redis-py ``RPUSH`` loop;
* ``Producer.submit_many`` of 1,000 requests reaches >= 50% of a pipelined 1,000 ``RPUSH``.

Both sides push the same ~1 KB chat request: the baseline ``RPUSH``-es exactly the body bytes
the producer stores. The machine this runs on is usually a small shared VM, so baseline and
candidate alternate in many short rounds, each round yields the ratio of two back-to-back
measurements, and the verdict uses the median ratio over the rounds.

Run it with ``make bench`` (or ``.venv/bin/python bench/bench_submit.py``). It starts a private
redis-server unless ``BATCHBRIDGE_BENCH_REDIS_URL`` is set, in which case that database is
FLUSHDB-ed between rounds. Numbers go to ``bench/results/submit.json``; the exit code is 1 when
a target is missed.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    MAX_TOKENS,
    MODEL,
    bench_redis,
    body_bytes,
    chat_request,
    environment,
    flush_stdout,
    median,
    quartiles,
    table,
    verdict,
    write_results,
)
from redis import Redis

from producer import Producer
from shared.redis_layout import buffer_name
from shared.schemas import DEFAULT_PROVIDER
from shared.settings import Settings

BASELINE_KEY = "bench:rpush"


@dataclass
class Case:
    """One comparison: a candidate and its baseline, each doing ``ops`` requests per round."""

    name: str
    baseline_label: str
    candidate_label: str
    ops: int
    baseline: Callable[[], None]
    candidate: Callable[[], None]
    target: float
    rounds: list[dict[str, float]] = field(default_factory=list)
    server: dict[str, float] = field(default_factory=dict)


def timed(fn: Callable[[], None]) -> tuple[float, float]:
    """Wall and client-CPU seconds of one call; the CPU share shows where the time goes."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def run_case(case: Case, client: Redis, producer: Producer, rounds: int) -> None:
    """Alternate baseline and candidate for ``rounds`` rounds, after one untimed warm-up."""
    pending = producer.keys.pending(buffer_name(DEFAULT_PROVIDER, MODEL))
    for i in range(rounds + 1):
        client.flushdb()
        # The collector would otherwise run inside whichever side allocates the next garbage.
        gc.collect()
        # Going first is not neutral (caches, CPU frequency, the other core's load): alternate.
        if i % 2:
            cand_s, cand_cpu = timed(case.candidate)
            base_s, base_cpu = timed(case.baseline)
        else:
            base_s, base_cpu = timed(case.baseline)
            cand_s, cand_cpu = timed(case.candidate)
        # A benchmark that lost its writes would look fast: check both sides did the work.
        pushed, enqueued = client.llen(BASELINE_KEY), client.zcard(pending)
        if pushed != case.ops or enqueued != case.ops:
            raise RuntimeError(f"{case.name}: expected {case.ops} writes, got {pushed}/{enqueued}")
        if i == 0:
            # Scripts are loaded and connections opened now; start counting server time here.
            client.config_resetstat()
            continue
        case.rounds.append(
            {
                "baseline_s": base_s,
                "candidate_s": cand_s,
                "baseline_rate": case.ops / base_s,
                "candidate_rate": case.ops / cand_s,
                "ratio": base_s / cand_s,
                "baseline_cpu_s": base_cpu,
                "candidate_cpu_s": cand_cpu,
            }
        )
    case.server = server_usec_per_request(client, case.ops * rounds)
    client.flushdb()


def server_usec_per_request(client: Redis, requests: int) -> dict[str, float]:
    """Redis-side microseconds per request for each side, from INFO commandstats."""
    stats: dict[str, Any] = client.info("commandstats")

    def usec(command: str) -> float:
        return float(stats.get(f"cmdstat_{command}", {}).get("usec", 0))

    # Commands a script runs are also counted under their own names; EVALSHA's total already
    # includes them, so only it is charged to the candidate.
    return {
        "baseline_usec_per_request": usec("rpush") / requests,
        "candidate_usec_per_request": (usec("evalsha") + usec("eval")) / requests,
    }


def check_same_payload(client: Redis, producer: Producer, payload: bytes) -> None:
    """The comparison is only fair if the producer stores exactly the baseline's bytes."""
    request = chat_request()
    handle = producer.submit(request["model"], request["messages"], max_tokens=MAX_TOKENS)
    buf = buffer_name(DEFAULT_PROVIDER, request["model"])
    stored = client.hget(producer.keys.bodies(buf), handle.id)
    if stored != payload:
        raise RuntimeError(f"producer stored {stored!r:.80}, baseline pushes {payload!r:.80}")
    client.flushdb()


def build_cases(
    client: Redis, producer: Producer, payload: bytes, loop_ops: int, batches: int
) -> list[Case]:
    """The loop case and the pipelined case, with the call sites bound to locals."""
    request = chat_request()
    model, messages = request["model"], request["messages"]
    submit, submit_many, rpush = producer.submit, producer.submit_many, client.rpush
    batch = [chat_request() for _ in range(1000)]

    def rpush_loop() -> None:
        for _ in range(loop_ops):
            rpush(BASELINE_KEY, payload)

    def submit_loop() -> None:
        for _ in range(loop_ops):
            submit(model, messages, max_tokens=MAX_TOKENS)

    def rpush_pipelined() -> None:
        for _ in range(batches):
            pipe = client.pipeline(transaction=False)
            for _ in range(1000):
                pipe.rpush(BASELINE_KEY, payload)
            pipe.execute()

    def submit_batches() -> None:
        for _ in range(batches):
            submit_many(batch)

    return [
        Case("loop", "rpush loop", "submit loop", loop_ops, rpush_loop, submit_loop, 0.60),
        Case(
            "pipelined",
            "pipelined rpush x1000",
            "submit_many(1000)",
            batches * 1000,
            rpush_pipelined,
            submit_batches,
            0.50,
        ),
    ]


def report(cases: list[Case]) -> list[str]:
    """Print the table; return the verdict lines."""
    rows, verdicts = [], []
    for case in cases:
        ratios = [r["ratio"] for r in case.rounds]
        base_cpu = median([r["baseline_cpu_s"] / case.ops * 1e6 for r in case.rounds])
        cand_cpu = median([r["candidate_cpu_s"] / case.ops * 1e6 for r in case.rounds])
        ratio = median(ratios)
        rows.append(
            [
                case.name,
                f"{median([r['baseline_rate'] for r in case.rounds]):,.0f}",
                f"{median([r['candidate_rate'] for r in case.rounds]):,.0f}",
                f"{ratio:.2f}",
                "{:.2f}-{:.2f}".format(*quartiles(ratios)),
                f"{base_cpu:.0f} / {cand_cpu:.0f}",
                f"{case.server['baseline_usec_per_request']:.1f} / "
                f"{case.server['candidate_usec_per_request']:.1f}",
            ]
        )
        verdicts.append(
            verdict(
                f"{case.candidate_label} vs {case.baseline_label}",
                ratio >= case.target,
                f"median ratio {ratio:.2f} (target >= {case.target:.2f}, {len(ratios)} rounds)",
            )
        )
    header = [
        "case",
        "baseline req/s",
        "candidate req/s",
        "ratio",
        "ratio IQR",
        "client CPU us/req b/c",
        "server us/req b/c",
    ]
    print(table(header, rows))
    return verdicts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # An odd count gives the median a middle round; 21 rounds still finish in ~15 s.
    parser.add_argument("--rounds", type=int, default=21, help="timed rounds per case")
    parser.add_argument("--loop-ops", type=int, default=500, help="submits per loop round")
    parser.add_argument("--batches", type=int, default=5, help="1,000-request batches per round")
    args = parser.parse_args()

    started = time.perf_counter()
    payload = body_bytes(chat_request())
    with bench_redis() as url, tempfile.TemporaryDirectory(prefix="bb-bench-") as tmp:
        # A buffer that reaches max_batch_requests makes the producer wake the aggregator over
        # Celery; rounds stay far below the highest allowed value so only enqueueing is timed.
        settings = Settings.load(
            redis_url=url, data_dir=Path(tmp), provider="local", max_batch_requests=50_000
        )
        client = Redis.from_url(url)
        producer = Producer(settings=settings)
        try:
            env = environment(client)
            check_same_payload(client, producer, payload)
            print(
                f"payload {len(payload)} bytes; redis {env['redis_server']}, redis-py "
                f"{env['redis_py']}, hiredis {env['hiredis']}, {env['cpus']} CPUs, "
                f"load {env['loadavg'][0]}"
            )
            flush_stdout()
            cases = build_cases(client, producer, payload, args.loop_ops, args.batches)
            for case in cases:
                run_case(case, client, producer, args.rounds)
        finally:
            producer.close()
            client.close()

    verdicts = report(cases)
    print("\n".join(verdicts))
    elapsed = time.perf_counter() - started
    print(f"({elapsed:.1f} s)")
    path = write_results(
        "submit",
        {
            "environment": env,
            "payload_bytes": len(payload),
            "elapsed_s": elapsed,
            "cases": {
                case.name: {
                    "baseline": case.baseline_label,
                    "candidate": case.candidate_label,
                    "requests_per_round": case.ops,
                    "target_ratio": case.target,
                    "median_ratio": median([r["ratio"] for r in case.rounds]),
                    "ratio_quartiles": quartiles([r["ratio"] for r in case.rounds]),
                    "median_baseline_rate": median([r["baseline_rate"] for r in case.rounds]),
                    "median_candidate_rate": median([r["candidate_rate"] for r in case.rounds]),
                    "passed": median([r["ratio"] for r in case.rounds]) >= case.target,
                    "server": case.server,
                    "rounds": case.rounds,
                }
                for case in cases
            },
        },
    )
    print(f"results: {path}")
    return 0 if all(v.startswith("PASS") for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
