"""Leases keep periodic work single-flight, survive long work, and free up after a crash."""

from __future__ import annotations

import time

from worker.context import WorkerContext


def test_a_held_lease_is_renewed_and_excludes_others(worker_context: WorkerContext) -> None:
    with worker_context.lease("job", seconds=2) as mine:
        assert mine
        time.sleep(4.2)  # longer than its time to live: only renewal keeps it
        with worker_context.lease("job", seconds=2) as theirs:
            assert not theirs
    with worker_context.lease("job", seconds=1) as again:
        assert again  # released on exit


def test_a_dead_holders_lease_expires(worker_context: WorkerContext) -> None:
    # A holder that died (nobody renews) is simulated by setting the key directly
    key = worker_context.keys.lock("job")
    worker_context.redis.set(key, b"dead-worker", px=300)
    with worker_context.lease("job", seconds=1) as mine:
        assert not mine
    time.sleep(0.35)
    with worker_context.lease("job", seconds=1) as mine:
        assert mine
