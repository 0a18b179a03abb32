"""The Celery app: configuration for at-least-once delivery, and the beat schedule.

``celery -A worker.app worker -B`` runs a worker with its beat; ``batchbridge up`` does the
same with an embedded Redis when none is configured.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, signals

from shared import task_names
from shared.embedded_redis import resolve_redis_url
from shared.settings import Settings
from worker.beat_scheduler import PATH as BEAT_SCHEDULER
from worker.broker import TRANSPORT_PATH
from worker.log_format import adapt_handlers
from worker.wakeups import WakeupStep


class BatchbridgeCelery(Celery):  # type: ignore[misc]  # Celery ships no types
    """The Celery app, holding its settings outside ``conf``.

    ``celery inspect conf`` and Flower's worker page show ``conf``; settings kept there would
    show the Redis and database URLs (passwords included) in clear.
    """

    def __init__(self, settings: Settings) -> None:
        super().__init__("batchbridge", include=["worker.tasks"])
        self.batchbridge_settings = settings


class UnsafeCeleryConfig(RuntimeError):
    """The Celery configuration would lose or duplicate work."""


def celery_config(settings: Settings, broker_url: str) -> dict[str, Any]:
    """The Celery settings batchbridge runs with, derived from one settings object."""
    vt = settings.visibility_timeout_seconds
    transport = {"visibility_timeout": vt}
    return {
        "broker_url": broker_url,
        # kombu's Redis transport, patched so a Redis restart does not kill the worker.
        "broker_transport": TRANSPORT_PATH,
        "broker_transport_options": dict(transport),
        "result_backend_transport_options": dict(transport),
        "visibility_timeout": vt,
        "broker_connection_retry_on_startup": True,
        "task_default_queue": task_names.QUEUE,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": settings.worker_concurrency,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "task_time_limit": settings.task_time_limit_seconds,
        "task_soft_time_limit": int(settings.task_time_limit_seconds * 0.9),
        "task_ignore_result": True,
        "task_publish_retry": True,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "beat_schedule": beat_schedule(settings),
        "beat_max_loop_interval": 5,
        "beat_scheduler": BEAT_SCHEDULER,
        # Under the data directory (created at worker start), not the current directory.
        "beat_schedule_filename": str(settings.data_dir / "celerybeat-schedule"),
        "timezone": "UTC",
    }


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    """Periodic wake-ups; each expires quickly so a backlog of stale ticks never builds up."""
    poll_tick = max(0.5, min(settings.poll_interval_seconds / 2, 5.0))

    def entry(task: str, every: float) -> dict[str, Any]:
        return {"task": task, "schedule": every, "options": {"expires": max(every * 2, 5.0)}}

    return {
        "aggregate": entry(task_names.AGGREGATE, settings.aggregate_interval_seconds),
        "submit": entry(task_names.SUBMIT, settings.submit_interval_seconds),
        "poll": entry(task_names.POLL, poll_tick),
        "collect": entry(task_names.COLLECT, max(poll_tick, 2.0)),
        "reap": entry(task_names.REAP, settings.reap_interval_seconds),
        "reconcile": entry(task_names.RECONCILE, settings.reap_interval_seconds),
        "local-sweep": entry(task_names.LOCAL_SWEEP, 30.0),
        "webhooks": entry(task_names.WEBHOOKS, settings.webhook_interval_seconds),
    }


def check_delivery_invariants(conf: Any, settings: Settings) -> None:
    """Refuse to start with a configuration that would lose or duplicate work."""
    vt = settings.visibility_timeout_seconds
    problems = []
    if not conf.task_acks_late:
        problems.append("task_acks_late must be True (a crash would lose the task)")
    if not conf.task_reject_on_worker_lost:
        problems.append("task_reject_on_worker_lost must be True")
    if conf.worker_prefetch_multiplier != 1:
        problems.append("worker_prefetch_multiplier must be 1")
    seen = {
        "broker_transport_options": conf.broker_transport_options.get("visibility_timeout"),
        "result_backend_transport_options": conf.result_backend_transport_options.get(
            "visibility_timeout"
        ),
        "visibility_timeout": conf.get("visibility_timeout"),
    }
    for where, value in seen.items():
        if value != vt:
            problems.append(f"{where} visibility timeout is {value}, expected {vt}")
    if conf.task_time_limit * 2 > vt:
        problems.append(f"task_time_limit {conf.task_time_limit}s must be at most half of {vt}s")
    if problems:
        raise UnsafeCeleryConfig("; ".join(problems))


def create_app(settings: Settings | None = None) -> BatchbridgeCelery:
    """Build the Celery app for ``settings`` (read from the environment when omitted)."""
    settings = settings or Settings.load()
    app = BatchbridgeCelery(settings)
    app.conf.update(celery_config(settings, resolve_redis_url(settings)))
    check_delivery_invariants(app.conf, settings)
    app.steps["worker"].add(WakeupStep)
    return app


def _adapt_logging(logger: Any, **_: object) -> None:
    # Celery has configured its handlers: make them quiet while idle, and JSON off a TTY.
    adapt_handlers(logger)


signals.after_setup_logger.connect(_adapt_logging, weak=False)
signals.after_setup_task_logger.connect(_adapt_logging, weak=False)


_app: BatchbridgeCelery | None = None


def __getattr__(name: str) -> BatchbridgeCelery:
    # `celery -A worker.app` and the task module need a module-level `app`; building it on
    # first use keeps importing this module (for its config functions) free of side effects.
    global _app
    if name != "app":
        raise AttributeError(name)
    if _app is None:
        _app = create_app()
    return _app
