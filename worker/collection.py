"""Collecting a finished batch: stream its result files and fan each result out once.

Lines are matched to requests by ``custom_id`` (our request id), never by position. Every
step is safe to repeat: ``finish.lua`` skips requests that already have an outcome or have
moved on to another batch, ``requeue.lua`` skips requests already requeued, and the SQL
updates are conditional on the request still belonging to this batch.

One bad line or request never costs the others: unreadable lines are counted on the batch
(``worker.result_lines``), a result that cannot be encoded fails only its request, and when a
request has several lines a success wins over an error whatever their order.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, or_
from sqlmodel import select

from shared.db import transition, update_batch
from shared.gc_pause import gc_paused
from shared.models import Batch, BatchState, Request, RequestState
from shared.providers.base import ProviderError
from shared.schemas import ErrorInfo
from worker.backoff import backoff
from worker.batch_cancel import REQUEUED
from worker.batch_loop import each_batch
from worker.context import WorkerContext
from worker.fan_out import FanOut
from worker.provider_files import delete_provider_files
from worker.result_buckets import LineBuckets
from worker.result_lines import (
    REQUEUED_CODE,
    RETRYABLE_CODES,
    LineOutcome,
    LineProblems,
    parse_result_line,
    read_result_lines,
)

__all__ = [
    "RETRYABLE_CODES",
    "LineOutcome",
    "collect_batch",
    "collect_ready_batches",
    "parse_result_line",
]
log = logging.getLogger(__name__)


def collect_ready_batches(ctx: WorkerContext) -> list[str]:
    """Collect every batch the provider has finished (or that could not be submitted)."""
    with ctx.session() as session:
        stmt = (
            select(Batch.id, Batch.collect_failures)
            .where(
                Batch.state.in_([BatchState.COLLECTING.value, BatchState.FAILED.value])  # type: ignore[attr-defined]
            )
            .where(or_(Batch.next_poll_at.is_(None), Batch.next_poll_at <= ctx.now()))  # type: ignore[union-attr,operator,arg-type]
        )
        due = list(session.exec(stmt))

    def record(item: tuple[str, int], exc: Exception) -> None:
        batch_id, failures = item
        with ctx.session() as session:
            update_batch(
                session,
                batch_id,
                error=f"collect failed, retrying: {exc!r}",
                collect_failures=failures + 1,
                next_poll_at=ctx.now() + backoff(failures + 1),
            )
            session.commit()

    return each_batch(
        ctx,
        due,
        lambda item: item[0],
        lambda item: collect_batch(ctx, item[0]),
        record,
        doing="collecting",
    )


def collect_batch(ctx: WorkerContext, batch_id: str) -> bool:
    """Fan out one batch's results; True once the batch is FINISHED."""
    with ctx.session() as session:
        batch = session.get(Batch, batch_id)
        if batch is None or batch.state not in (BatchState.COLLECTING, BatchState.FAILED):
            return False
        rows = session.exec(
            select(Request.id, Request.attempts, Request.line).where(Request.batch_id == batch_id)
        )
        attempts: dict[str, int] = {}
        lines: dict[str, int | None] = {}
        for request_id, n, line in rows:
            attempts[request_id], lines[request_id] = n, line
    # Each attempt downloads into a directory of its own, so two collectors (a lease lost
    # mid-collection) never read each other's half-written files.
    workdir = ctx.results_dir / batch_id / uuid.uuid4().hex
    workdir.mkdir(parents=True)
    problems = LineProblems(batch_id)
    buckets = LineBuckets(workdir, lines, problems)
    fan_out = FanOut(ctx, batch, attempts, problems)
    try:
        for file_id, name in ((batch.output_file_id, "output"), (batch.error_file_id, "errors")):
            if not file_id:
                continue
            path = workdir / f"{name}.jsonl"
            try:
                ctx.provider(batch.provider).download_file(file_id, path)
            except ProviderError as exc:
                if exc.status_code not in (404, 410):
                    raise  # retried with backoff; only a missing file means its results are gone
                _file_gone_for_good(ctx, batch, name, file_id, exc)
                continue
            ctx.crash_point("after_download")
            with gc_paused():
                buckets.add_file(path)
            path.unlink()
        # Parsing and applying, not the downloads above: the collector is paused only while
        # results are built. A bucket holds every line of its requests, so each is decided
        # bucket by bucket.
        with gc_paused():
            for path in buckets.paths():
                for offset, outcome in read_result_lines(path, problems):
                    fan_out.add(outcome, (path, offset))
                fan_out.add_held_back_failures()
                fan_out.flush()
            for request_id in attempts.keys() - fan_out.seen:
                fan_out.add(_missing_outcome(request_id, batch))
            fan_out.flush()
            fan_out.drain()
    finally:
        fan_out.close()
        buckets.close()
        shutil.rmtree(workdir, ignore_errors=True)
        with contextlib.suppress(OSError):  # another attempt may still be using it
            workdir.parent.rmdir()
    _finish_batch(ctx, batch, problems, dry_run=fan_out.dry_run)
    if batch.file_path:
        Path(batch.file_path).unlink(missing_ok=True)
    # After FINISHED is recorded: a crash before this leaves files at the provider, never a
    # batch whose results were deleted before they were read.
    delete_provider_files(ctx, batch)
    return True


class ResultFileMissing(RuntimeError):
    """A result file answers 404, but not yet for long enough to believe it."""


def _file_gone_for_good(
    ctx: WorkerContext, batch: Batch, name: str, file_id: str, exc: ProviderError
) -> None:
    """Raise ResultFileMissing (collect again later) until a 404 has lasted the grace period.

    The provider ran these requests and may bill them: re-running them because of one 404 (a
    file that lags its job's status, a brief outage, a key change) would pay twice. Only once
    the file has been missing for ``MISSING_OUTPUT_GRACE_SECONDS`` do its requests count as
    not executed (and go round again), and the batch says why.
    """
    now = ctx.now()
    since = batch.not_found_since or now
    grace = timedelta(seconds=ctx.settings.missing_output_grace_seconds)
    if now - since < grace:
        if batch.not_found_since is None:
            with ctx.session() as session:
                update_batch(session, batch.id, not_found_since=since)
                session.commit()
        until = (since + grace).isoformat(timespec="seconds")
        raise ResultFileMissing(f"{name} file {file_id} answers 404; trying again until {until}")
    reason = f"{name} file {file_id} could not be fetched for {now - since}: {exc}"
    log.error("batch %s: %s; its requests count as not executed", batch.id, reason)
    batch.error = f"{batch.error}; {reason}" if batch.error else reason
    with ctx.session() as session:
        update_batch(session, batch.id, error=batch.error)
        session.commit()


def _missing_outcome(request_id: str, batch: Batch) -> LineOutcome:
    if batch.outcome == "cancelled":
        error = ErrorInfo(code="batch_cancelled", message="the batch was cancelled")
        return LineOutcome(request_id, "cancelled", error=error)
    if batch.outcome == "unsent":
        error = ErrorInfo(code="batch_unsent", message=batch.error or "the batch was not sent")
        return LineOutcome(request_id, "failed", error=error)
    if batch.outcome == REQUEUED:
        message = "the operator cancelled the batch before this request ran; sent round again"
        return LineOutcome(
            request_id, "failed", error=ErrorInfo(code=REQUEUED_CODE, message=message)
        )
    if batch.outcome == "lost":
        error = ErrorInfo(code="batch_lost", message=batch.error or "the provider lost the batch")
        return LineOutcome(request_id, "failed", error=error)
    if batch.outcome == "no_output":
        message = batch.error or "the provider completed the batch without output files"
        return LineOutcome(
            request_id, "failed", error=ErrorInfo(code="batch_no_output", message=message)
        )
    if batch.outcome == "expired":
        error = ErrorInfo(code="expired", message="the batch expired before this request ran")
        return LineOutcome(request_id, "failed", error=error)
    if batch.outcome == "failed" or batch.state == BatchState.FAILED:
        message = batch.error or "the provider failed the batch"
        return LineOutcome(
            request_id, "failed", error=ErrorInfo(code="batch_failed", message=message)
        )
    error = ErrorInfo(code="missing_result", message="the provider returned no result line")
    return LineOutcome(request_id, "failed", error=error)


def _finish_batch(
    ctx: WorkerContext, batch: Batch, problems: LineProblems, *, dry_run: bool
) -> None:
    table = Request.__table__  # type: ignore[attr-defined]
    with ctx.session() as session:
        counts = {
            state: (n, p or 0, c or 0)
            for state, n, p, c in session.execute(
                select(
                    table.c.state,
                    func.count(),
                    func.sum(table.c.prompt_tokens),
                    func.sum(table.c.completion_tokens),
                )
                .where(table.c.batch_id == batch.id)
                .group_by(table.c.state)
            )
        }
        totals = [sum(v[i] for v in counts.values()) for i in (1, 2)]
        fields: dict[str, Any] = {
            "completed_count": counts.get(RequestState.COMPLETED.value, (0,))[0],
            "failed_count": counts.get(RequestState.FAILED.value, (0,))[0],
            "requeued_count": counts.get(RequestState.REQUEUED.value, (0,))[0],
            "prompt_tokens": totals[0],
            "completion_tokens": totals[1],
            "finished_at": ctx.now(),
        }
        summary = problems.summary()
        if summary:
            log.error("batch %s: %s", batch.id, summary)
            fields["error"] = f"{batch.error}; {summary}" if batch.error else summary
        source = BatchState(batch.state)
        moved = transition(session, batch.id, BatchState.FINISHED, expect=[source], **fields)
        session.commit()
    if moved:  # once per batch: the conditional update lets only one collector through
        ctx.counters.tokens(batch.provider, batch.model, totals[0], totals[1], dry_run=dry_run)
    log.info("batch %s finished: %s", batch.id, {k: v[0] for k, v in counts.items()})
