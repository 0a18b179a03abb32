"""Collecting a finished batch: stream its result files and fan each result out once.

Lines are matched to requests by ``custom_id`` (our request id), never by position. Every
step is safe to repeat: ``finish.lua`` skips requests that already have an outcome or have
moved on to another batch, ``requeue.lua`` skips requests already requeued, and the SQL
updates are conditional on the request still belonging to this batch.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import func, or_
from sqlmodel import select

from shared.db import finish_requests, transition, update_batch
from shared.models import Batch, BatchState, Request, RequestState, utcnow
from shared.providers.base import ProviderError
from shared.schemas import ErrorInfo, Result
from worker.context import WorkerContext
from worker.lifecycle import backoff

log = logging.getLogger(__name__)
_CHUNK = 500
# Per-line error codes worth another attempt in a later batch.
RETRYABLE_CODES = frozenset(
    {
        "rate_limit",
        "rate_limit_exceeded",
        "timeout",
        "server_error",
        "internal_error",
        "overloaded",
        "service_unavailable",
        "expired",
        "batch_expired",
        "missing_result",
        "batch_lost",
        "batch_unsent",
        "http_408",
        "http_429",
    }
)


@dataclass(frozen=True, slots=True)
class LineOutcome:
    """What one result line (or its absence) says about one request."""

    request_id: str
    status: str  # completed | failed | cancelled
    response: dict[str, Any] | None = None
    error: ErrorInfo | None = None

    @property
    def retryable(self) -> bool:
        """Whether a failure could succeed in a later batch."""
        if self.error is None:
            return False
        code = self.error.code
        return code in RETRYABLE_CODES or (code.startswith("http_5") and len(code) == 8)


def collect_ready_batches(ctx: WorkerContext) -> list[str]:
    """Collect every batch the provider has finished (or that could not be submitted)."""
    with ctx.session() as session:
        stmt = (
            select(Batch.id, Batch.collect_failures)
            .where(
                Batch.state.in_([BatchState.COLLECTING.value, BatchState.FAILED.value])  # type: ignore[attr-defined]
            )
            .where(or_(Batch.next_poll_at.is_(None), Batch.next_poll_at <= utcnow()))  # type: ignore[union-attr,operator,arg-type]
        )
        due = list(session.exec(stmt))
    done = []
    for batch_id, failures in due:
        with ctx.lease(f"batch:{batch_id}") as mine:
            if not mine:
                continue
            try:
                if collect_batch(ctx, batch_id):
                    done.append(batch_id)
            except SoftTimeLimitExceeded:
                raise  # the task is out of time: stop, the next beat carries on
            except Exception as exc:  # one bad batch must not stall the rest
                log.exception("collecting batch %s failed", batch_id)
                with ctx.session() as session:
                    update_batch(
                        session,
                        batch_id,
                        error=f"collect failed, retrying: {exc!r}",
                        collect_failures=failures + 1,
                        next_poll_at=utcnow() + backoff(failures + 1),
                    )
                    session.commit()
    return done


def collect_batch(ctx: WorkerContext, batch_id: str) -> bool:
    """Fan out one batch's results; True once the batch is FINISHED."""
    with ctx.session() as session:
        batch = session.get(Batch, batch_id)
        if batch is None or batch.state not in (BatchState.COLLECTING, BatchState.FAILED):
            return False
        rows = session.exec(
            select(Request.id, Request.attempts).where(Request.batch_id == batch_id)
        )
        attempts = {request_id: n for request_id, n in rows}
    workdir = ctx.results_dir / batch_id
    workdir.mkdir(parents=True, exist_ok=True)
    fan_out = _FanOut(ctx, batch, attempts)
    for file_id, name in ((batch.output_file_id, "output"), (batch.error_file_id, "errors")):
        if not file_id:
            continue
        path = workdir / f"{name}.jsonl"
        try:
            ctx.provider(batch.provider).download_file(file_id, path)
        except ProviderError as exc:
            if exc.status_code not in (404, 410):
                raise  # retried with backoff; only a missing file means its results are gone
            # The file is gone for good: its requests count as not executed (and go round again).
            log.error("batch %s: %s file %s cannot be fetched: %s", batch_id, name, file_id, exc)
            continue
        for outcome in read_result_lines(path):
            fan_out.add(outcome)
    fan_out.flush()
    for request_id in attempts.keys() - fan_out.seen:
        fan_out.add(_missing_outcome(request_id, batch))
    fan_out.flush()
    _finish_batch(ctx, batch)
    shutil.rmtree(workdir, ignore_errors=True)
    if batch.file_path:
        Path(batch.file_path).unlink(missing_ok=True)
    return True


def read_result_lines(path: Path) -> Iterator[LineOutcome]:
    """Parse an output or error file line by line (Together's formats; OpenAI's too)."""
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                line = orjson.loads(raw)
                custom_id = str(line["custom_id"])
            except (orjson.JSONDecodeError, KeyError, TypeError):
                log.error("%s line %d is not a result line; skipped", path.name, number)
                continue
            yield parse_result_line(custom_id, line)


def parse_result_line(custom_id: str, line: dict[str, Any]) -> LineOutcome:
    """One line → the outcome it reports: error set, or a non-200 response, means failure."""
    error = line.get("error")
    response = line.get("response") or {}
    body = response.get("body") if isinstance(response, dict) else None
    if error:
        info = error if isinstance(error, dict) else {"message": str(error)}
        return LineOutcome(
            custom_id,
            "failed",
            error=ErrorInfo(
                code=str(info.get("code") or "provider_error")[:64],
                message=str(info.get("message") or "the provider reported an error"),
            ),
        )
    status_code = response.get("status_code", 200) if isinstance(response, dict) else 0
    if status_code != 200 or not isinstance(body, dict):
        detail = (body or {}).get("error") if isinstance(body, dict) else None
        message = detail.get("message") if isinstance(detail, dict) else None
        return LineOutcome(
            custom_id,
            "failed",
            error=ErrorInfo(
                code=f"http_{status_code}",
                message=str(message or f"the provider answered {status_code}"),
            ),
        )
    return LineOutcome(custom_id, "completed", response=body)


def _missing_outcome(request_id: str, batch: Batch) -> LineOutcome:
    if batch.outcome == "cancelled":
        error = ErrorInfo(code="batch_cancelled", message="the batch was cancelled")
        return LineOutcome(request_id, "cancelled", error=error)
    if batch.outcome == "unsent":
        error = ErrorInfo(code="batch_unsent", message=batch.error or "the batch was not sent")
        return LineOutcome(request_id, "failed", error=error)
    if batch.outcome == "lost":
        error = ErrorInfo(code="batch_lost", message=batch.error or "the provider lost the batch")
        return LineOutcome(request_id, "failed", error=error)
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


class _FanOut:
    """Buffers outcomes and applies them in chunks: Redis (the delivery) first, then SQL."""

    def __init__(self, ctx: WorkerContext, batch: Batch, attempts: dict[str, int]) -> None:
        self.ctx = ctx
        self.batch = batch
        self.attempts = attempts
        self.seen: set[str] = set()
        self._pending: list[LineOutcome] = []

    def add(self, outcome: LineOutcome) -> None:
        if outcome.request_id not in self.attempts or outcome.request_id in self.seen:
            log.warning("batch %s: unexpected custom_id %r", self.batch.id, outcome.request_id)
            return
        self.seen.add(outcome.request_id)
        self._pending.append(outcome)
        if len(self._pending) >= _CHUNK:
            self.flush()

    def flush(self) -> None:
        chunk, self._pending = self._pending, []
        if not chunk:
            return
        ctx, keys = self.ctx, self.ctx.keys
        max_attempts = ctx.settings.max_attempts
        retry: list[LineOutcome] = []
        final: list[LineOutcome] = []
        unsent = self.batch.outcome == "unsent"
        for o in chunk:
            again = o.retryable and (unsent or self.attempts[o.request_id] < max_attempts)
            (retry if again else final).append(o)
        metas = ctx.redis.pipeline(transaction=False)
        for o in final:
            metas.hget(keys.request(o.request_id), "meta")
        args: list[Any] = [keys.base, ctx.settings.result_ttl_seconds, self.batch.id]
        for o, meta in zip(final, metas.execute(), strict=True):
            args += [o.request_id, o.status, self._result(o, meta).to_json()]
        if final:
            ctx.scripts.run("finish", [keys.buffers], args)
        if retry:
            ids = [o.request_id for o in retry]
            # A batch that never reached the provider costs its requests no attempt.
            counts = "0" if self.batch.outcome == "unsent" else "1"
            ctx.scripts.run("requeue", [keys.buffers], [keys.base, self.batch.id, counts, *ids])
        self._record(final, retry)

    def _result(self, o: LineOutcome, meta: bytes | None) -> Result:
        usage = o.response.get("usage") if o.response else None
        return Result(
            request_id=o.request_id,
            status=o.status,  # type: ignore[arg-type]
            response=o.response,
            error=o.error,
            usage=usage if isinstance(usage, dict) else None,
            batch_id=self.batch.id,
            attempts=self.attempts[o.request_id],
            metadata=orjson.loads(meta) if meta else None,
        )

    def _record(self, final: list[LineOutcome], retry: list[LineOutcome]) -> None:
        now = utcnow()
        rows = []
        for o in final:
            usage = (o.response or {}).get("usage") or {}
            rows.append(
                {
                    "id": o.request_id,
                    "state": o.status,
                    "error_code": o.error.code if o.error else None,
                    "error_message": o.error.message[:2000] if o.error else None,
                    "prompt_tokens": int(usage.get("prompt_tokens") or 0),
                    "completion_tokens": int(usage.get("completion_tokens") or 0),
                    "finished_at": now,
                }
            )
        rows += [
            {
                "id": o.request_id,
                "state": RequestState.REQUEUED.value,
                "error_code": o.error.code if o.error else None,
                "error_message": o.error.message[:2000] if o.error else None,
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "finished_at": None,
            }
            for o in retry
        ]
        with self.ctx.session() as session:
            finish_requests(session, self.batch.id, rows)
            session.commit()


def _finish_batch(ctx: WorkerContext, batch: Batch) -> None:
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
            "finished_at": utcnow(),
        }
        source = BatchState(batch.state)
        transition(session, batch.id, BatchState.FINISHED, expect=[source], **fields)
        session.commit()
    log.info("batch %s finished: %s", batch.id, {k: v[0] for k, v in counts.items()})
