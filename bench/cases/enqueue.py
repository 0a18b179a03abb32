"""Enqueue: the producer against the cheapest way to put the same bytes in Redis.

Targets: ``submit`` in a loop >= 0.6x a redis-py ``RPUSH`` loop, ``submit_many(1000)`` >= 0.5x
1,000 pipelined ``RPUSH``, at 0.4 KB and 2 KB bodies. Both sides push exactly the body bytes the
producer stores. On a small shared VM one measurement means little, so baseline and candidate
alternate in short rounds (which goes first alternates too), each round gives the ratio of two
back-to-back measurements, and the verdict is the median ratio. Client CPU and Redis-side time
(INFO commandstats) per request say whether a gap is Python's or the Lua script's.

The usual Celery ways are measured on the same payload for reference: one ``send_task`` per
request, and celery-batches buffering into JSONL (the step the aggregator does).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis import Redis

from bench._common import body_bytes, median, quartiles, sized_request
from bench.harness import Bench
from bench.report import CaseResult
from producer import Producer
from shared.redis_layout import buffer_name
from shared.schemas import DEFAULT_PROVIDER

BASELINE_KEY = "bench:rpush"
SIZES = (400, 2048)
CHUNK = 1000


@dataclass
class Pair:
    """A candidate and its baseline, each doing ``ops`` requests per round."""

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
    """Wall and client-CPU seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def alternate(pair: Pair, client: Redis, pending_key: str, rounds: int) -> None:
    """Run baseline and candidate back to back ``rounds`` times, after one untimed warm-up."""
    for i in range(rounds + 1):
        client.flushdb()
        # The collector would otherwise run inside whichever side allocates the next garbage.
        gc.collect()
        if i % 2:
            cand_s, cand_cpu = timed(pair.candidate)
            base_s, base_cpu = timed(pair.baseline)
        else:
            base_s, base_cpu = timed(pair.baseline)
            cand_s, cand_cpu = timed(pair.candidate)
        # A benchmark that lost its writes would look fast: check both sides did the work.
        pushed, enqueued = client.llen(BASELINE_KEY), client.llen(pending_key)
        if pushed != pair.ops or enqueued != pair.ops:
            raise RuntimeError(f"{pair.name}: expected {pair.ops} writes, got {pushed}/{enqueued}")
        if i == 0:
            # Scripts are loaded and connections open now; count server time from here.
            client.config_resetstat()
            continue
        pair.rounds.append(
            {
                "baseline_rate": pair.ops / base_s,
                "candidate_rate": pair.ops / cand_s,
                "ratio": base_s / cand_s,
                "baseline_cpu_us": base_cpu / pair.ops * 1e6,
                "candidate_cpu_us": cand_cpu / pair.ops * 1e6,
            }
        )
    stats: dict[str, Any] = client.info("commandstats")

    def usec(command: str) -> float:
        return float(stats.get(f"cmdstat_{command}", {}).get("usec", 0)) / (pair.ops * rounds)

    # Commands a script runs are also counted under their own names; EVALSHA's total already
    # includes them, so only it is charged to the candidate.
    pair.server = {"baseline_us": usec("rpush"), "candidate_us": usec("evalsha") + usec("eval")}
    client.flushdb()


def pairs(client: Redis, producer: Producer, size: int, loop_ops: int, chunks: int) -> list[Pair]:
    """The loop pair and the pipelined pair for one body size."""
    # Distinct requests of one size, as a service sends them; the baseline pushes exactly
    # their bodies, encoded beforehand (RPUSH is given bytes, the producer encodes them).
    requests = [sized_request(size, n) for n in range(CHUNK)]
    payloads = [body_bytes(r) for r in requests]
    calls = [(r["model"], r["messages"], r["max_tokens"]) for r in requests]
    submit, submit_many, rpush = producer.submit, producer.submit_many, client.rpush

    def rpush_loop() -> None:
        for i in range(loop_ops):
            rpush(BASELINE_KEY, payloads[i % CHUNK])

    def submit_loop() -> None:
        for i in range(loop_ops):
            model, messages, max_tokens = calls[i % CHUNK]
            submit(model, messages, max_tokens=max_tokens)

    def rpush_pipelined() -> None:
        for _ in range(chunks):
            pipe = client.pipeline(transaction=False)
            for payload in payloads:
                pipe.rpush(BASELINE_KEY, payload)
            pipe.execute()

    def submit_chunks() -> None:
        for _ in range(chunks):
            submit_many(requests)

    kb = f"{size / 1000:.1f} KB"
    return [
        Pair(f"submit loop, {kb}", "RPUSH loop", "submit", loop_ops, rpush_loop, submit_loop, 0.6),
        Pair(
            f"submit_many({CHUNK}), {kb}",
            f"pipelined RPUSH x{CHUNK}",
            f"submit_many({CHUNK})",
            chunks * CHUNK,
            rpush_pipelined,
            submit_chunks,
            0.5,
        ),
    ]


def check_same_payload(client: Redis, producer: Producer, size: int) -> None:
    """The comparison is only fair if the producer stores exactly the baseline's bytes."""
    requests = [sized_request(size, n) for n in (0, CHUNK - 1)]
    handles = producer.submit_many(requests)
    buf = buffer_name(DEFAULT_PROVIDER, requests[0]["model"])
    for request, handle in zip(requests, handles, strict=True):
        stored = client.hget(producer.keys.bodies(buf), handle.id)
        if stored != body_bytes(request):
            raise RuntimeError(f"producer stored {stored!r:.80}, the baseline pushes the body")
    client.flushdb()


def run(bench: Bench) -> CaseResult:
    """Every pair at both sizes, then the Celery references."""
    result = CaseResult("enqueue")
    rounds = bench.size(21, 3)
    settings = bench.settings(bench.data_dir("enqueue"))
    client = bench.client()
    producer = Producer(settings=settings)
    try:
        for size in SIZES:
            check_same_payload(client, producer, size)
            model = sized_request(size)["model"]
            pending = producer.keys.pending(buffer_name(DEFAULT_PROVIDER, model))
            for pair in pairs(client, producer, size, bench.size(500, 200), bench.size(5, 1)):
                alternate(pair, client, pending, rounds)
                ratios = [r["ratio"] for r in pair.rounds]
                ratio = median(ratios)
                q1, q3 = quartiles(ratios) if len(ratios) > 1 else (ratio, ratio)
                cpu = [
                    median([r[f"{s}_cpu_us"] for r in pair.rounds])
                    for s in ("baseline", "candidate")
                ]
                result.measure(
                    pair.name,
                    median([r["candidate_rate"] for r in pair.rounds]),
                    "req/s",
                    baseline=pair.baseline_label,
                    baseline_value=median([r["baseline_rate"] for r in pair.rounds]),
                    round_ratio=ratio,
                    detail=f"median of per-round ratios; IQR {q1:.2f}-{q3:.2f} over "
                    f"{len(ratios)} rounds; client CPU "
                    f"{cpu[0]:.0f}/{cpu[1]:.0f} us, Redis {pair.server['baseline_us']:.1f}/"
                    f"{pair.server['candidate_us']:.1f} us per request (baseline/ours)",
                )
                result.target(
                    f"{pair.name} vs {pair.baseline_label}", ratio, pair.target, "min", "x"
                )
                result.data[pair.name] = {"rounds": pair.rounds, "server": pair.server}
        celery_references(bench, result, producer)
    finally:
        producer.close()
        client.close()
    return result


def celery_references(bench: Bench, result: CaseResult, producer: Producer) -> None:
    """One Celery message per request, and celery-batches, on the 0.4 KB body."""
    from bench.cases import celery_baselines

    n = bench.size(20_000, 2_000)
    requests = [sized_request(SIZES[0], i) for i in range(CHUNK)]
    bench.flush()
    started = time.perf_counter()
    for _ in range(0, n, CHUNK):
        producer.submit_many(requests)
    ours = n / (time.perf_counter() - started)
    bench.flush()
    sent = celery_baselines.send_task_rate(bench.redis_url, requests, n)
    result.measure(
        "submit_many vs one Celery send_task per request, 0.4 KB",
        ours,
        "req/s",
        baseline="send_task loop",
        baseline_value=sent["rate"],
        detail=f"{n:,} requests each",
    )
    bench.flush()
    batched = celery_baselines.celery_batches_rate(
        bench.redis_url, n, requests, bench.data_dir("celery-batches")
    )
    result.measure(
        "celery-batches: enqueue + pack to JSONL, 0.4 KB",
        batched["rate"],
        "req/s",
        detail=f"{n:,} requests, one worker; the end_to_end case compares it with the pipeline",
    )
    result.data["celery"] = {"ours_rate": ours, "send_task": sent, "celery_batches": batched}
