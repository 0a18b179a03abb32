"""A task for tests only (loaded with ``celery worker -I tests.worker_probe``): it holds a
pool slot for a while, so its message stays unacknowledged (acks late) while a test breaks
the broker connection."""

from __future__ import annotations

import time

from worker.app import app

PROBE = "tests.probe.hold"


@app.task(name=PROBE)
def hold(seconds: float, started_key: str) -> None:
    """Say it started (in Redis), then sleep."""
    from worker.tasks import context

    context().redis.set(started_key, b"1")
    time.sleep(seconds)
