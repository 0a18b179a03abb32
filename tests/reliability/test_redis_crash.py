"""Redis crashes: SIGKILL Redis during a run and restart it on the same append-only file;
and the OS-crash variant, which also cuts the AOF's last second (what ``appendfsync
everysec`` may not have synced) before the restart, right after a batch commit or a collect.

A SIGKILLed redis-server loses nothing it answered (its writes were in the OS), so the
ledger must be clean outright. Cutting the tail rolls Redis back up to a second behind the
SQL record: the reconciler must repair Redis from the record (claims of committed batches,
outcomes already recorded) without losing, repeating or double-billing anything. Submits
acknowledged inside the cut second are gone, as the durability contract says, and the
producer resubmits them with the same idempotency keys, as the contract tells it to.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import text

from shared.embedded_redis import EmbeddedRedis
from tests.conftest import RedisFactory
from tests.reliability.conftest import ScenarioFactory
from tests.reliability.harness import Background, Scenario


class AofTail:
    """Samples the AOF's length, so a crash can cut what the last second appended."""

    def __init__(self, server: EmbeddedRedis) -> None:
        self.path = server.aof_path
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            try:
                size = self.path.stat().st_size
            except FileNotFoundError:
                continue
            self.samples.append((time.monotonic(), size))
            del self.samples[:-100]

    def cut(self, seconds: float = 1.0) -> int:
        """Truncate the AOF to its length ``seconds`` ago; how many bytes went."""
        before = time.monotonic() - seconds
        synced = max((size for at, size in self.samples if at <= before), default=0)
        size = self.path.stat().st_size
        if synced < size:
            with self.path.open("r+b") as aof:
                aof.truncate(synced)
        self.samples.clear()
        return size - synced

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join(5)


def batch_count(run: Scenario, state: str | None = None) -> int:
    """Batches in the record (in ``state``, if given)."""
    assert run.source.engine is not None
    query = "SELECT count(*) FROM batches" + (" WHERE state = :state" if state else "")
    try:
        with run.source.engine.connect() as conn:
            return int(conn.execute(text(query), {"state": state}).scalar_one())
    except Exception:  # the worker has not created the schema yet
        return 0


def right_after(event: Callable[[], int], timeout: float) -> None:
    """Return as soon as ``event()`` grows (a commit happened), or after ``timeout``."""
    start = event()
    deadline = time.monotonic() + timeout
    while event() == start and time.monotonic() < deadline:
        time.sleep(0.02)


def crash_run(
    scenario: ScenarioFactory,
    own_redis: RedisFactory,
    name: str,
    *,
    crashes: int,
    cut: bool,
    requests: int,
) -> None:
    """``crashes`` Redis crashes while ``requests`` flow; with ``cut``, OS-crash style."""
    server = own_redis("redis-aof")
    run = scenario(name, redis=server.url, api_args=("--line-delay", "0.001"))
    tail = AofTail(server)
    run.start_worker(concurrency=2)
    run.start_beat()
    arrivals = Background(
        run.submit, requests, **{"chunk": 100, "pause": 0.15, "label": "crash", "retry_for": 60.0}
    )
    lost_bytes = renewed = 0
    moments = [
        lambda: right_after(lambda: batch_count(run), 20),
        lambda: right_after(lambda: batch_count(run, "finished"), 20),
        lambda: time.sleep(run.rng.uniform(0.5, 3.0)),
    ]
    try:
        for n in range(crashes):
            # When Redis dies: right after a batch commit, after a collect, or at random
            moments[n % len(moments)]()
            server.kill()
            if cut:
                lost_bytes += tail.cut(1.0)
            time.sleep(run.rng.uniform(0.2, 1.5))
            server.start()
            if cut:
                renewed += resubmit_recent(run, within=2.5)
            time.sleep(run.rng.uniform(2.0, 4.0))
        arrivals.join()
        # Then everything is answered once and billed once
        run.finish(240, redis_crashes=crashes, aof_bytes_cut=lost_bytes, resubmitted_anew=renewed)
    finally:
        tail.stop()


def resubmit_recent(run: Scenario, within: float) -> int:
    """Resubmit (same idempotency keys) what was acknowledged in the last ``within`` s;
    how many came back under a new id."""
    # The durability contract: a submit acknowledged in the lost second may be gone, and
    # the same idempotency key makes resubmitting it safe. A key Redis still has answers
    # with the same id; one it lost makes the request anew, under a new id, and the old id
    # is forgotten (a result for it would be counted as unexpected).
    since = time.monotonic() - within
    recent = [r for r, at in run.acked_at.items() if at >= since]
    renewed = 0
    for start in range(0, len(recent), 100):
        old = recent[start : start + 100]
        again = run.submit_bodies([run.sent[r] for r in old], retry_for=30.0)
        for old_id, handle in zip(old, again, strict=True):
            if handle.id != old_id:
                renewed += 1
                run.expected.forget(old_id)
                run.expected.add(handle.id, "svc")
                run.sent[handle.id] = run.sent[old_id]
            run.acked_at[handle.id] = time.monotonic()
    return renewed


@pytest.mark.chaos
@pytest.mark.timeout(400)
def test_redis_sigkilled_three_times_loses_and_repeats_nothing(
    scenario: ScenarioFactory, own_redis: RedisFactory
) -> None:
    # Given a worker, a beat and a producer on a Redis with an append-only file
    crash_run(scenario, own_redis, "redis-sigkill", crashes=3, cut=False, requests=6000)


@pytest.mark.timeout(200)
def test_redis_sigkilled_once_loses_and_repeats_nothing(
    scenario: ScenarioFactory, own_redis: RedisFactory, tmp_path: Path
) -> None:
    crash_run(scenario, own_redis, "redis-sigkill-fast", crashes=1, cut=False, requests=2000)


@pytest.mark.chaos
@pytest.mark.timeout(400)
def test_redis_os_crash_cutting_the_unsynced_second_loses_and_repeats_nothing(
    scenario: ScenarioFactory, own_redis: RedisFactory
) -> None:
    # Given the same, and crashes that also cut the AOF's last second (an OS crash under
    # appendfsync everysec), right after a batch commit, after a collect and at random
    crash_run(scenario, own_redis, "redis-os-crash", crashes=3, cut=True, requests=6000)
