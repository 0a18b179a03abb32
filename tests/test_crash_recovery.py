"""Chaos: SIGKILL the whole worker mid-pipeline; a fresh worker finishes with nothing lost
or delivered twice (Celery messages are only wake-ups, so none of them carries state)."""

from __future__ import annotations

import collections
import os
import signal
import time
from pathlib import Path

from producer import CallbackQueue, Producer
from tests.conftest import WorkerFactory, make_settings

CHAOS = {
    "max_batch_requests": 300,
    "max_wait_seconds": 0.5,
    "poll_interval_seconds": 0.3,
    "aggregate_interval_seconds": 0.3,
    "submit_interval_seconds": 0.3,
    # Short, so the dead worker's leases (no longer renewed) expire quickly.
    "lease_seconds": 3,
}


def test_killing_the_worker_mid_pipeline_loses_and_duplicates_nothing(
    redis_url: str, tmp_path: Path, start_worker: WorkerFactory
) -> None:
    # Given 2,400 requests and a worker whose batches run slowly (10 ms a line, 3 s a batch)
    settings = make_settings(redis_url, tmp_path / "data", **CHAOS)
    producer = Producer(settings=settings)
    handles = producer.submit_many(
        [
            {
                "model": ("m-1", "m-2")[i % 2],
                "messages": [{"role": "user", "content": f"req-{i} please"}],
                "callback_queue": "svc",
            }
            for i in range(2400)
        ]
    )
    ids = {h.id for h in handles}
    first = start_worker(settings, BATCHBRIDGE_LOCAL_LINE_DELAY="0.01")
    queue = CallbackQueue("svc", settings=settings)
    deliveries: collections.Counter[str] = collections.Counter()

    def take(until: float, stop_at: int) -> None:
        while time.monotonic() < until and len(deliveries) < stop_at:
            delivery = queue.get(timeout=0.5)
            if delivery is not None:
                deliveries[delivery.result.request_id] += 1
                assert delivery.result.status == "completed", delivery.result
                delivery.ack()

    # When some results are out and the worker (main process, pool and beat) is SIGKILLed
    take(time.monotonic() + 90, stop_at=300)
    assert first.process is not None
    os.killpg(first.process.pid, signal.SIGKILL)
    first.process.wait()
    pipe = producer.redis.pipeline(transaction=False)
    for request_id in ids:
        pipe.hget(producer.keys.request(request_id), "state")
    done_at_kill = sum(state == b"done" for state in pipe.execute())
    assert 300 <= done_at_kill < len(ids), f"the kill should land mid-pipeline ({done_at_kill})"

    # And a fresh worker takes over
    start_worker(settings, BATCHBRIDGE_LOCAL_LINE_DELAY="0.01")
    take(time.monotonic() + 150, stop_at=len(ids))
    time.sleep(2)
    take(time.monotonic() + 1, stop_at=len(ids) + 1)  # anything more would be a duplicate

    # Then every request got exactly one result
    assert set(deliveries) == ids, f"lost {len(ids - set(deliveries))}"
    assert set(deliveries.values()) == {1}
    queue.close()
    producer.close()
