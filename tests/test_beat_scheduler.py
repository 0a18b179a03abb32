"""Beat sleeps until its next entry is due, instead of spinning through the last 10 ms."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from celery import Celery
from celery.beat import Service
from celery.utils.imports import symbol_by_name

from shared.settings import Settings
from worker.app import celery_config
from worker.beat_scheduler import SleepUntilDueScheduler

PERIOD = 0.1
RUN_FOR = 1.0


def test_the_worker_runs_beat_with_the_scheduler_that_sleeps() -> None:
    # Given batchbridge's Celery configuration
    config = celery_config(Settings.load(), "redis://127.0.0.1:1/0")
    # Then beat (embedded with -B, or on its own) loads our scheduler
    assert symbol_by_name(config["beat_scheduler"]) is SleepUntilDueScheduler


def test_beat_ticks_about_twice_per_wake_up_not_thousands(tmp_path: Path) -> None:
    # Given a real beat service, scheduled as the worker's is, with one entry every 0.1 s
    # on an in-memory broker
    app = Celery("beat-test", broker="memory://")
    app.conf.beat_schedule = {"wake": {"task": "beat-test.wake", "schedule": PERIOD}}
    scheduler_path = celery_config(Settings.load(), "memory://")["beat_scheduler"]
    service = Service(
        app, schedule_filename=str(tmp_path / "schedule"), scheduler_cls=scheduler_path
    )
    scheduler = service.scheduler
    calls = {"tick": 0, "apply_entry": 0}
    for name in calls:
        setattr(scheduler, name, _counting(getattr(scheduler, name), calls, name))
    # When it runs for a second
    stopper = threading.Timer(RUN_FOR, service.stop)
    stopper.start()
    try:
        service.start()
    finally:
        stopper.cancel()
    # Then the entry was sent on time, and beat ticked about twice per sending (the sending
    # tick, then one that sleeps until the next is due); Celery's own scheduler spins through
    # the last 10 ms before each, thousands of ticks a second
    runs, ticks = calls["apply_entry"], calls["tick"]
    assert runs >= RUN_FOR / PERIOD / 2, f"the entry ran {runs} times in {RUN_FOR} s"
    assert ticks <= 3 * runs + 5, f"{ticks} ticks for {runs} runs"


def _counting(method: Any, calls: dict[str, int], name: str) -> Any:
    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[name] += 1
        return method(*args, **kwargs)

    return counted
