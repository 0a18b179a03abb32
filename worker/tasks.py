"""Celery tasks: thin, idempotent shells that wake the plain functions up.

No task carries state: each re-reads Redis and SQL and does whatever is due, so a lost,
late or repeated message only costs latency.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
import time
from datetime import datetime, timedelta

from celery import Task, signals

from shared import task_names
from shared.db import poll_now
from shared.embedded_redis import resolve_redis_url
from shared.models import utcnow
from shared.providers.base import ProviderBatchStatus
from shared.providers.local import LocalProvider, get_engine, run_job
from shared.providers.local.faults import Faults
from shared.redis_layout import upgrade_buffers
from shared.settings import Settings
from shared.startup_checks import (
    SetupError,
    check_all,
    sqlite_beside_remote_redis,
)
from worker import task_summaries as summaries
from worker.app import app
from worker.collection import collect_ready_batches
from worker.context import WorkerContext
from worker.leftovers import remove_leftovers_at_startup
from worker.lifecycle import submit_ready_batches
from worker.packing import pack_due_buffers
from worker.polling import poll_due_batches
from worker.reaper import reaper_pass
from worker.reconciler import RECENT, last_activity
from worker.reconciler import reconcile as reconcile_with_record
from worker.redis_checks import (
    UnsafeRedisConfig,
    accept_epoch,
    check_epoch,
    check_eviction_policy,
)
from worker.webhook_sender import deliver_due

log = logging.getLogger(__name__)
_contexts: dict[int, WorkerContext] = {}


def context() -> WorkerContext:
    """This process's context; rebuilt after a fork, since connections cannot be shared."""
    pid = os.getpid()
    ctx = _contexts.get(pid)
    if ctx is None:
        settings: Settings = app.batchbridge_settings
        ctx = WorkerContext.create(settings, dispatch_local=_dispatch_local)
        _contexts.clear()
        _contexts[pid] = ctx
    return ctx


@signals.worker_process_init.connect
def _freeze_startup_objects(**_: object) -> None:
    # What a pool process holds once started (modules, the app, settings) lives as long as the
    # process: out of the collector's sight, full collections no longer walk it each time a
    # batch's worth of results has been built.
    gc.freeze()


@signals.worker_init.connect
def _check_and_prepare(**_: object) -> None:
    # Once in the parent, before the pool forks: fail fast on bad settings, and create the
    # tables here so pool children never race to create them.
    settings: Settings = app.batchbridge_settings
    try:
        # One line naming the variable to fix, rather than a traceback or endless retries;
        # this also creates the data directory, where the beat keeps its schedule.
        redis_url = resolve_redis_url(settings)
        check_all(settings, redis_url)
        Faults.from_env()
    except (SetupError, ValueError) as exc:
        raise SystemExit(f"batchbridge worker cannot start: {exc}") from None
    _check_redis(settings)
    remove_leftovers_at_startup(settings)
    log.warning("batchbridge worker starting; default provider: %s", settings.default_provider)
    warning = sqlite_beside_remote_redis(settings, redis_url)
    if warning:
        log.error("%s", warning)
    if settings.default_provider == "together" and not (
        settings.together_api_key or os.environ.get("TOGETHER_API_KEY")
    ):
        log.error("BATCHBRIDGE_PROVIDER is together but TOGETHER_API_KEY is not set")


def _check_redis(settings: Settings) -> None:
    # A Redis that evicts keys loses requests silently: refuse to start on one (SystemExit,
    # since Celery logs and ignores an Exception from a signal handler). Then ask for a
    # reconcile pass over what the record changed just before this start (a crash, maybe).
    ctx = WorkerContext.create(settings)
    try:
        check_eviction_policy(ctx.redis)
        check_epoch(ctx)
        if moved := upgrade_buffers(ctx.redis, ctx.scripts, ctx.keys):
            log.warning("moved %d pending request ids to the current buffer layout", moved)
        latest = last_activity(ctx)
    except UnsafeRedisConfig as exc:
        log.critical("%s", exc)
        raise SystemExit(f"batchbridge worker refuses to start: {exc}") from None
    finally:
        ctx.close()
    since = (latest or utcnow()) - RECENT
    wake(task_names.RECONCILE, since=since.isoformat(), scan_orphans=True)


def wake(task: str, **kwargs: object) -> None:
    """Send a wake-up for ``task`` now rather than at its next beat."""
    app.send_task(task, kwargs=kwargs, queue=task_names.QUEUE, expires=60)


def _dispatch_local(job_id: str) -> None:
    app.send_task(task_names.LOCAL_RUN, args=[job_id], queue=task_names.QUEUE)


@app.task(name=task_names.AGGREGATE)
def aggregate(force: bool = False) -> str:
    """Pack every due buffer into batch files; says what was packed."""
    ctx = context()
    with ctx.lease("aggregate") as mine:
        if not mine:
            return summaries.IDLE
        packed = pack_due_buffers(ctx, force=force)
    if packed:
        wake(task_names.SUBMIT)
    return summaries.packed(packed)


@app.task(name=task_names.SUBMIT)
def submit() -> str:
    """Upload and create provider jobs for packed batches."""
    return summaries.batches_did("submitted", submit_ready_batches(context()))


@app.task(name=task_names.POLL)
def poll() -> str:
    """Poll submitted batches that are due; wake the collector for finished ones."""
    finished = poll_due_batches(context())
    if finished:
        wake(task_names.COLLECT)
    return summaries.batches_did("found finished", finished)


@app.task(name=task_names.COLLECT)
def collect() -> str:
    """Fan out the results of batches the provider has finished."""
    collected = collect_ready_batches(context())
    if collected:
        # Requests sent round again, and webhooks, should not wait for a full beat.
        wake(task_names.AGGREGATE)
        wake(task_names.WEBHOOKS)
    return summaries.batches_did("collected", collected)


@app.task(name=task_names.WEBHOOKS)
def deliver_webhooks() -> str:
    """Send the webhook deliveries that are due, for a bounded time; says how it went."""
    ctx = context()
    # One sender at a time: it sends many deliveries at once itself, and a second would only
    # take a pool slot from the pipeline's own tasks.
    with ctx.lease("webhooks") as mine:
        if not mine:
            return summaries.IDLE
        budget = min(30.0, ctx.settings.task_time_limit_seconds / 4)
        report = asyncio.run(deliver_due(ctx, budget_seconds=budget))
    return summaries.webhooks_sent(report)


@app.task(name=task_names.REAP)
def reap() -> str:
    """Return abandoned claims to their buffers and remove crashed work's files."""
    ctx = context()
    with ctx.lease("reap") as mine:
        if not mine:
            return summaries.IDLE
        return summaries.reaped(reaper_pass(ctx))


@app.task(name=task_names.RECONCILE, bind=True, max_retries=30)
def reconcile(self: Task, since: str | None = None, scan_orphans: bool = False) -> str:
    """Repair, from the record, what a Redis that lost writes left behind; says what."""
    ctx = context()
    with ctx.lease("reconcile") as mine:
        if not mine:
            if since is None:
                return summaries.IDLE  # a periodic pass: the one running covers it
            raise self.retry(countdown=ctx.settings.lease_seconds)  # the start-up pass must run
        check = check_epoch(ctx)
        if check.replaced:
            # Wiped or replaced: everything whose result could still be in Redis.
            start = ctx.now() - timedelta(seconds=ctx.settings.result_ttl_seconds)
            scan_orphans = True
        else:
            start = datetime.fromisoformat(since) if since else ctx.now() - RECENT
        report = reconcile_with_record(ctx, since=start, scan_orphans=scan_orphans)
        if check.replaced:
            accept_epoch(ctx, check)
    if report.requeued or report.orphans or report.given_back:
        wake(task_names.AGGREGATE)
        wake(task_names.COLLECT)
    return summaries.reconciled(report)


# Local jobs run beside the pool's tasks, a few at a time per process: run as tasks, slow
# jobs would occupy every pool slot and hold up aggregation, polling and collection.
_LOCAL_JOBS_PER_PROCESS = 2
_local_slots = threading.BoundedSemaphore(_LOCAL_JOBS_PER_PROCESS)


@app.task(name=task_names.LOCAL_RUN)
def local_run(job_id: str) -> str:
    """Start one local-provider batch job in the background of this worker process."""
    ctx = context()
    threading.Thread(
        target=_run_local_job, args=(ctx, job_id), daemon=True, name=f"local job {job_id}"
    ).start()
    return f"started local batch {job_id}"


def _run_local_job(ctx: WorkerContext, job_id: str) -> None:
    provider = ctx.provider("local")
    assert isinstance(provider, LocalProvider)
    try:
        with _local_slots, ctx.lease(f"local:{job_id}") as mine:
            if not mine:
                return
            run_job(
                provider.store,
                job_id,
                get_engine(ctx.settings.local_engine),
                faults=provider.faults,
            )
        # Batches are polled on a timer; a local job can say at once that it is done.
        with ctx.session() as session:
            poll_now(session, job_id, ctx.now())
            session.commit()
        wake(task_names.POLL)
    except Exception:  # the sweep re-dispatches an unfinished job once its lease lapses
        log.exception("local job %s failed", job_id)


@app.task(name=task_names.LOCAL_SWEEP)
def local_sweep() -> str:
    """Re-dispatch local jobs whose run message was lost (none running, not finished)."""
    ctx = context()
    provider = ctx.provider("local")
    assert isinstance(provider, LocalProvider)
    redispatched = 0
    now = time.time()
    for job in provider.list_batches():
        if job.status.is_terminal or job.status == ProviderBatchStatus.UNKNOWN:
            continue
        if job.created_at is not None and now - job.created_at.timestamp() < 30:
            continue
        if ctx.redis.exists(ctx.keys.lock(f"local:{job.id}")):
            continue
        _dispatch_local(job.id)
        redispatched += 1
    return summaries.local_redispatched(redispatched)
