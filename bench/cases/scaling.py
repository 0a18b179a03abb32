"""Scaling: throughput with 1, 2 and 4 worker processes, and cost per request by batch size.

Worker processes are separate Celery workers of one pool process each (as on separate
machines), sharing the Redis and the record; beat runs in the first. On this 2-core machine
the producers, the consumer and Redis share the cores with them, so the curve shows where
the machine, not the design, stops it: compare the CPU per request columns.
"""

from __future__ import annotations

from bench.cases.pipeline import Pipeline, run_pipeline
from bench.harness import Bench
from bench.report import CaseResult


def run(bench: Bench) -> CaseResult:
    """The worker-count curve, then the batch-size curve."""
    result = CaseResult("scaling")
    n = bench.size(50_000, 4_000)
    for workers in (1, 2, 4):
        r = run_pipeline(bench, Pipeline(n, workers=workers, concurrency=1), f"w{workers}")
        result.measure(
            f"{workers} worker process{'es' if workers > 1 else ''}, {n:,} requests",
            r["rate"],
            "req/s",
            detail=f"{r['seconds']:.1f} s; worker CPU {r['worker_cpu_s'] / n * 1e6:.0f} us/req,"
            f" Redis CPU {r['redis_cpu_s'] / n * 1e6:.0f} us/req",
        )
        result.data[f"workers_{workers}"] = r
    sizes = (1_000, 5_000, 10_000, 50_000) if not bench.smoke else (500, 2_000)
    for size in sizes:
        r = run_pipeline(bench, Pipeline(n, max_batch=size), f"b{size}")
        result.measure(
            f"batches of {size:,}, {n:,} requests",
            r["worker_cpu_s"] / n * 1e6,
            "us CPU/req",
            better="lower",
            detail=f"{r['rate']:,.0f} req/s, {r['batches']} batches, Redis CPU "
            f"{r['redis_cpu_s'] / n * 1e6:.0f} us/req, overhead p50 {r['overhead_p50']:.2f} s",
        )
        result.data[f"batch_{size}"] = r
    small, large = sizes[0], sizes[-1]
    cpu = {k: result.data[f"batch_{k}"]["worker_cpu_s"] / n for k in (small, large)}
    # cost per request = fixed per batch / batch size + per request: two sizes give both
    fixed = (cpu[small] - cpu[large]) / (1 / small - 1 / large)
    per_request = cpu[large] - fixed / large
    result.notes.append(
        f"worker CPU per request is about {per_request * 1e6:.0f} us plus {fixed * 1e3:.0f} ms "
        "per batch (its tasks, polls, file handling and SQL round trips), so the curve bends "
        f"where a batch's fixed share falls below a tenth of the rest: past about "
        f"{fixed / (per_request * 0.1):,.0f} requests per batch. More worker processes add "
        "little on this machine: every process of the run shares its 2 cores."
    )
    return result
