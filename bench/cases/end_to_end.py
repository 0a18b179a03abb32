"""End to end: 100,000 requests from 4 producer processes until a consumer has acked each.

One Celery worker (two pool processes and beat) runs the whole pipeline against the local
provider's echo engine, whose jobs complete as soon as they have run. Targets, in the same run:
>= 0.2x pipelined ``RPUSH`` of the same payload (the rate Redis accepts the bytes at all), and
>= 20x celery-batches' enqueue + pack to JSONL (the usual Celery buffering, which stops long
before a result comes back). Latency is reported as overhead beyond the flush wait: from the
later of submit and the batch being packed, until the consumer acked the result.

Three rounds (one in smoke runs), each the pipeline then both baselines back to back; a
target's verdict is the median of the per-round ratios, and the latencies and CPU accounting
are the round of the median rate.
"""

from __future__ import annotations

import os
import time
from typing import Any

from bench._common import body_bytes, median, sized_request
from bench.cases.pipeline import Pipeline, run_pipeline
from bench.harness import Bench
from bench.report import CaseResult

SIZE = 400
RPUSH_PASSES = 5
# Rounds of the pipeline and its baselines: one run has swung by a fifth between sessions.
ROUNDS = 3


def rpush_rate(bench: Bench, n: int, passes: int = RPUSH_PASSES) -> float:
    """The baseline: pipelined RPUSH of the same body, 1,000 per round trip (median of passes).

    One pass takes about a second, and two single passes minutes apart in one run have
    differed by 1.6x (148k/s against 231k/s): the median keeps one slow or fast second from
    deciding a target.
    """
    payload = body_bytes(sized_request(SIZE))
    rates = []
    with bench.client() as client:
        for _ in range(passes):
            bench.flush()
            started = time.perf_counter()
            for _ in range(n // 1000):
                pipe = client.pipeline(transaction=False)
                for _ in range(1000):
                    pipe.rpush("bench:rpush", payload)
                pipe.execute()
            seconds = time.perf_counter() - started
            if client.llen("bench:rpush") != n // 1000 * 1000:
                raise AssertionError("the RPUSH baseline lost writes")
            rates.append(n / seconds)
    bench.flush()
    return median(rates)


def run(bench: Bench) -> CaseResult:
    """Rounds of the pipeline and both baselines on the same workload; medians of ratios."""
    result = CaseResult("end_to_end")
    n = bench.size(100_000, 4_000)
    rounds = [run_round(bench, n, k) for k in range(bench.size(ROUNDS, 1))]
    # The round of the median rate gives the latencies and the CPU accounting: one run's
    # figures that belong together, rather than medians taken from different runs.
    ordered = sorted(rounds, key=lambda r: float(r["ours"]["rate"]))
    ours = ordered[len(ordered) // 2]["ours"]
    rates = [float(r["ours"]["rate"]) for r in rounds]
    rpush = median([float(r["rpush_rate"]) for r in rounds])
    batched_rate = median([float(r["celery_batches"]["rate"]) for r in rounds])
    vs_rpush = median([float(r["ours"]["rate"]) / float(r["rpush_rate"]) for r in rounds])
    vs_batched = median(
        [float(r["ours"]["rate"]) / float(r["celery_batches"]["rate"]) for r in rounds]
    )
    label = f"{n:,} x {SIZE / 1000:.1f} KB, 4 producers, submit to ack"
    result.measure(
        label,
        median(rates),
        "req/s",
        baseline="pipelined RPUSH x1000",
        baseline_value=rpush,
        round_ratio=vs_rpush,
        detail=f"{_rounds(rates, [r['rpush_rate'] for r in rounds])}; "
        f"the median round: {ours['seconds']:.1f} s, "
        f"submitting took {ours['submit_seconds']:.1f} s, {ours['batches']} batches, "
        f"worker CPU {ours['worker_cpu_s'] / n * 1e6:.0f} us/req, "
        f"Redis CPU {ours['redis_cpu_s'] / n * 1e6:.0f} us/req",
    )
    result.measure(
        f"{label}, vs celery-batches",
        median(rates),
        "req/s",
        baseline="celery-batches enqueue + pack (one worker)",
        baseline_value=batched_rate,
        round_ratio=vs_batched,
        detail=f"{_rounds(rates, [r['celery_batches']['rate'] for r in rounds])}; "
        "celery-batches returns no results",
    )
    for stat in ("overhead_p50", "overhead_p99", "latency_p50", "latency_p99"):
        kind, pct = stat.split("_")
        name = "overhead beyond the flush wait" if kind == "overhead" else "submit to ack"
        result.measure(f"latency {pct}: {name}", ours[stat], "s", better="lower")
    cpus = os.cpu_count() or 1
    spent = {k: ours[f"{k}_cpu_s"] / n * 1e6 for k in ("worker", "redis", "producer", "consumer")}
    total = sum(spent.values())
    result.measure(
        "CPU per request, every process of the run",
        total,
        "us",
        better="lower",
        detail=", ".join(f"{k} {v:.0f}" for k, v in spent.items())
        + f"; {cpus} cores allow at most {cpus / total * 1e6:,.0f} req/s at this cost",
    )
    result.notes.append(
        f"0.2x pipelined RPUSH is {0.2 * rpush:,.0f} req/s: {cpus} cores would have to carry a "
        f"request through every step (submit, claim, pack, upload, the provider's echo run, "
        f"poll, download, fan-out, consume, ack) in {cpus / (0.2 * rpush) * 1e6:.0f} us of CPU "
        f"in all; the run spent {total:.0f} us."
    )
    result.target("end to end vs pipelined RPUSH", vs_rpush, 0.2, "min", "x")
    result.target("end to end vs celery-batches", vs_batched, 20, "min", "x")
    result.data = {
        "ours": ours,
        "rpush_rate": rpush,
        "celery_batches": {"rate": batched_rate},
        "rounds": rounds,
    }
    return result


def run_round(bench: Bench, n: int, k: int) -> dict[str, Any]:
    """One round: the pipeline, then pipelined RPUSH, then celery-batches, back to back."""
    from bench.cases import celery_baselines

    ours = run_pipeline(bench, Pipeline(n, producers=4, size=SIZE), f"end-to-end-{k}")
    rpush = rpush_rate(bench, n)
    bench.flush()
    batched = celery_baselines.celery_batches_rate(
        bench.redis_url,
        n,
        [sized_request(SIZE, i) for i in range(1000)],
        bench.data_dir(f"e2e-celery-batches-{k}"),
    )
    return {"ours": ours, "rpush_rate": rpush, "celery_batches": batched}


def _rounds(ours: list[float], baseline: list[float]) -> str:
    """Each round's rate and the baseline's, for the table's notes."""
    if len(ours) == 1:
        return "one round"
    pairs = ", ".join(f"{o:,.0f}/{float(b):,.0f}" for o, b in zip(ours, baseline, strict=True))
    return (
        f"median of the ratios of {len(ours)} rounds (each: the pipeline, then the "
        f"baseline; req/s ours/baseline {pairs})"
    )
