"""Soak: 100,000 requests over 30 minutes, with a random kill every 60 s (a pool child, the
worker, the beat, or Redis), then the ledger and the worker's memory over time.

Run by ``make soak`` (``BATCHBRIDGE_TEST_SOAK_MINUTES`` shortens it); not part of
``make test`` or ``make chaos``.
"""

from __future__ import annotations

import os
import time

import psutil
import pytest

from tests.conftest import RedisFactory
from tests.reliability.conftest import ScenarioFactory
from tests.reliability.harness import Background, Scenario

MINUTES = float(os.environ.get("BATCHBRIDGE_TEST_SOAK_MINUTES", "30"))
REQUESTS = int(100_000 * MINUTES / 30)

pytestmark = [pytest.mark.soak, pytest.mark.timeout(int(MINUTES * 60) + 900)]


def worker_rss_mb(run: Scenario) -> float:
    """Resident memory of the running workers and their pools, in MB."""
    total = 0
    for worker in run.workers:
        if worker.process is None or worker.process.poll() is not None:
            continue
        try:
            main = psutil.Process(worker.process.pid)
            total += sum(p.memory_info().rss for p in [main, *main.children(recursive=True)])
        except psutil.NoSuchProcess:
            continue
    return total / 1e6


def test_soak_with_a_random_kill_every_minute(
    scenario: ScenarioFactory, own_redis: RedisFactory
) -> None:
    # Given a worker, a beat and a producer on a Redis with an append-only file
    server = own_redis("soak-redis")
    run = scenario("soak", redis=server.url, api_args=("--line-delay", "0.0002"))
    run.start_worker(concurrency=2)
    beat = run.start_beat()
    run.supervise()
    chunks = REQUESTS // 100
    arrivals = Background(
        run.submit,
        REQUESTS,
        chunk=100,
        pause=max(MINUTES * 60 / chunks - 0.02, 0.0),
        label="soak",
        retry_for=60.0,
    )
    rss: list[tuple[int, float]] = []
    kills: list[str] = []
    started = time.monotonic()

    # When, every minute, one of the parts is killed at random and brought back
    while arrivals.is_alive():
        time.sleep(60 if not rss or time.monotonic() - started > 5 else 5)
        rss.append((int(time.monotonic() - started), round(worker_rss_mb(run), 1)))
        what = run.rng.choice(["child", "worker", "beat", "redis"])
        kills.append(what)
        if what == "child":
            run.kill_random_child()
        elif what == "worker":
            run.replace_worker(run.workers[0])
        elif what == "beat":
            beat.kill()
            beat = run.start_beat()
        else:
            server.kill()
            time.sleep(1.0)
            server.start()
    arrivals.join()

    # Then the ledger is clean, and the worker's memory did not grow
    print(f"RSS (s since start, MB): {rss}", flush=True)
    sizes = [mb for _, mb in rss if mb > 0]
    run.finish(
        600,
        kills=len(kills),
        kinds=",".join(kills),
        worker_rss_mb=f"{min(sizes, default=0):.0f}-{max(sizes, default=0):.0f}",
    )
    steady = [mb for _, mb in rss[1:] if mb > 0]
    if len(steady) >= 6:
        third = len(steady) // 3
        first, last = steady[:third], steady[-third:]
        assert sum(last) / len(last) < 1.3 * sum(first) / len(first) + 20, rss
