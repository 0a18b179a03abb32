"""Fanning a batch's outcomes out: each result delivered once in Redis, then recorded in SQL.

``FanOut`` takes the outcomes ``worker.collection`` reads from the result files and applies
them in chunks. For each chunk it reads what the results need of their requests (metadata and
cancel marks), encodes the results, delivers them with ``finish.lua`` (the one atomic step
that gives a request its outcome and puts the result on its callback stream), sends the
retryable failures round again, and records the chunk in SQL. Redis, the Python side and the
database work at once: a chunk's delivery runs in Redis while the next one is parsed, and its
SQL UPDATE runs on a thread of its own while the next one is delivered.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from shared.db import finish_requests
from shared.models import Batch, RequestState
from shared.redis_layout import SentScript, request_fields_args, request_fields_within
from shared.schemas import ErrorInfo, Result
from worker.batch_cancel import REQUEUED
from worker.cancellation import (
    CANCELLED_IN_BATCH,
    cancelled_pairs,
    cancelled_result,
    cancelled_row,
    requeue_or_cancel,
)
from worker.context import WorkerContext
from worker.result_lines import LineOutcome, LineProblems, reread_result_lines

log = logging.getLogger(__name__)
# Outcomes are applied this many at a time (one script call, one SQL commit per chunk), or
# sooner once their lines add up to CHUNK_BYTES: the bound on what a chunk holds in memory
# when responses (or metadata) are large. Up to four chunks are in memory at once (one being
# read, one applied and held back, one being delivered, one being recorded); 2,000 results
# with 16 KB of metadata each peaked at 246 MB with 8 MB chunks, 204 MB with 4 MB.
CHUNK_RESULTS = 2000
CHUNK_BYTES = 4 << 20
REQUEST_FIELDS = ("meta", "cx")  # what a result needs of its request's hash
# An outcome to deliver: the line's outcome, the Result's JSON and the provider's usage.
_Final = tuple[LineOutcome, bytes, object]
# Token counts are recorded in 32-bit integer columns; no real request comes near this.
MAX_TOKENS = 2**31 - 1


class FanOut:
    """Buffers outcomes and applies them in chunks: Redis (the delivery) first, then SQL.

    A request's first success line is applied as soon as it is read. Its failure lines are
    held back (as file offsets, not in memory) until every line of its bucket has been read
    (``worker.result_buckets``: a request's lines share one bucket), because a
    success line further on, even in the other file, must win; the first of them is then
    applied only if no success came.
    """

    def __init__(
        self, ctx: WorkerContext, batch: Batch, attempts: dict[str, int], problems: LineProblems
    ) -> None:
        self.ctx = ctx
        self.batch = batch
        self.batch_id = batch.id  # read once per result: an ORM attribute costs a lookup
        self.attempts = attempts
        self.problems = problems
        self.dry_run = False  # an echo engine answered: its tokens cost nothing
        self.seen: set[str] = set()
        self._held_back: dict[str, tuple[Path, int]] = {}
        self._pending: list[LineOutcome] = []
        self._pending_bytes = 0
        # Each chunk is recorded in SQL by a thread of its own while the next chunk is
        # encoded and delivered (the database driver waits without holding the GIL): at most
        # one chunk behind, and always after its own delivery.
        self._recorder = ThreadPoolExecutor(1, thread_name_prefix="fanout-record")
        self._recording: Future[None] | None = None
        # The chunk whose delivery (finish.lua) Redis is running while later lines are read
        # and parsed: the two processes work at once instead of taking turns.
        # (and when it was sent: the outcomes' finished_at, see _record)
        self._delivering: (
            tuple[SentScript | None, list[_Final], list[LineOutcome], datetime] | None
        ) = None
        # The chunk applied last, its delivery not sent yet: it goes after the next chunk's
        # metadata read (flush), so that read is not queued behind it in Redis.
        self._held: tuple[list[Any], list[_Final], list[LineOutcome]] | None = None

    def add(self, outcome: LineOutcome, source: tuple[Path, int] | None = None) -> None:
        """Take one outcome; one read from ``source`` (file, offset) may be held back."""
        request_id = outcome.request_id
        if request_id not in self.attempts:
            self.problems.note("custom_ids not in this batch", repr(request_id), logging.WARNING)
            return
        if request_id in self.seen:
            return  # a second line for a request already decided: the first success wins
        if outcome.status != "completed" and source is not None:
            self._held_back.setdefault(request_id, source)  # the first failure line, if any
            return
        self._held_back.pop(request_id, None)
        self.seen.add(request_id)
        self._pending.append(outcome)
        self._pending_bytes += outcome.size
        if len(self._pending) >= CHUNK_RESULTS or self._pending_bytes >= CHUNK_BYTES:
            self.flush()

    def add_held_back_failures(self) -> None:
        """Apply the failure lines of requests that had no success line in any file."""
        by_file: defaultdict[Path, list[int]] = defaultdict(list)
        for path, offset in self._held_back.values():
            by_file[path].append(offset)
        expected = set(self._held_back)
        self._held_back.clear()
        for path, offsets in by_file.items():
            for outcome in reread_result_lines(path, offsets, self.problems):
                if outcome.request_id in expected:
                    self.add(outcome)

    def flush(self) -> None:
        """Deliver and record the buffered outcomes."""
        chunk, self._pending, self._pending_bytes = self._pending, [], 0
        if not chunk:
            return
        ctx, ids = self.ctx, [o.request_id for o in chunk]
        # Metadata is read in parts of about CHUNK_BYTES, so results carrying large metadata
        # are applied fewer at a time: what a part holds stays bounded whatever it carries.
        # The read is sent before the previous chunk's delivery: Redis runs one script at a
        # time, and behind a whole chunk of finish.lua the read used to wait.
        args = request_fields_args(ctx.keys.base, ids, REQUEST_FIELDS, CHUNK_BYTES)
        first = SentScript(ctx.scripts, ctx.redis, "request_fields", [], args)
        try:
            self._send_held()
        except BaseException:
            first.discard()
            raise
        parts = request_fields_within(
            ctx.scripts, ctx.keys.base, ids, REQUEST_FIELDS, CHUNK_BYTES, first=first
        )
        for start, fields in parts:
            self._apply(chunk[start : start + len(fields)], fields)

    def _apply(self, chunk: list[LineOutcome], fields: list[tuple[Any, ...]]) -> None:
        ctx, keys = self.ctx, self.ctx.keys
        max_attempts = ctx.settings.max_attempts
        # Nor does a batch the operator cancelled to send its requests round again.
        unsent = self.batch.outcome in ("unsent", REQUEUED)
        retry: list[LineOutcome] = []
        ready: list[tuple[LineOutcome, bytes | None, bool]] = []
        for o, (meta, cancel_mark) in zip(chunk, fields, strict=True):
            if cancel_mark:
                ready.append((o, meta, True))  # cancelled while batched: never sent round
            elif o.retryable and (unsent or self.attempts[o.request_id] < max_attempts):
                retry.append(o)
            else:
                ready.append((o, meta, False))
        args: list[Any] = [keys.base, ctx.settings.result_ttl_seconds, self.batch_id]
        final: list[_Final] = []
        for o, meta, cancelled in ready:
            # A request failed for its encoding still used (and cost) the provider's tokens.
            usage = (o.response or {}).get("usage")
            if cancelled:
                o, result = self._cancelled(o, meta, usage)
            else:
                o, result = self._encoded(o, meta)
            final.append((o, result, usage))
            args += [o.request_id, o.status, result]
        if retry:
            # A batch that never reached the provider costs its requests no attempt.
            _, gone = requeue_or_cancel(
                ctx, self.batch_id, [o.request_id for o in retry], counts=not unsent
            )
            retry = [o for o in retry if o.request_id not in gone]
        self._send_held()  # an earlier part of this chunk (large metadata) goes first
        self._held = (args, final, retry)

    def _send_held(self) -> None:
        """Send the delivery held back (``finish.lua``), once the one before it is done."""
        held, self._held = self._held, None
        if held is None:
            return
        args, final, retry = held
        self._complete_delivery()
        ctx = self.ctx
        finish = [ctx.keys.buffers]
        sent_at = ctx.now()
        sent = SentScript(ctx.scripts, ctx.redis, "finish", finish, args) if final else None
        self._delivering = (sent, final, retry, sent_at)

    def _complete_delivery(self) -> None:
        """Read the reply of the chunk delivered last, then hand that chunk to the recorder."""
        delivering, self._delivering = self._delivering, None
        if delivering is None:
            return
        sent, final, retry, sent_at = delivering
        # A cancel that lands between reading the marks and the script is applied by the
        # script, which then reports the result it delivered instead.
        instead = cancelled_pairs(sent.reply()) if sent is not None else {}
        self.ctx.crash_point("after_fanout_delivery")
        self.wait_recorded()
        self._recording = self._recorder.submit(self._record_chunk, final, retry, instead, sent_at)

    def drain(self) -> None:
        """Until every chunk applied so far is delivered and recorded."""
        self._send_held()
        self._complete_delivery()
        self.wait_recorded()

    def wait_recorded(self) -> None:
        """Until the chunk being recorded is (raising what recording it raised)."""
        recording, self._recording = self._recording, None
        if recording is not None:
            recording.result()

    def close(self) -> None:
        """Stop the recording thread (after waiting for what it is doing)."""
        if self._delivering is not None and self._delivering[0] is not None:
            self._delivering[0].discard()  # collection failed: a later attempt delivers again
        self._delivering = self._held = None
        self._recorder.shutdown(wait=True)

    def _record_chunk(
        self,
        final: list[_Final],
        retry: list[LineOutcome],
        instead: dict[str, str],
        sent_at: datetime,
    ) -> None:
        self._record(final, retry, instead, sent_at)
        self.ctx.crash_point("after_fanout_chunk")

    def _cancelled(
        self, o: LineOutcome, meta: bytes | None, usage: object
    ) -> tuple[LineOutcome, bytes]:
        error = ErrorInfo(code="cancelled", message=CANCELLED_IN_BATCH)
        outcome = LineOutcome(o.request_id, "cancelled", error=error)
        try:
            metadata = orjson.loads(meta) if meta else None
        except orjson.JSONDecodeError:
            metadata = None
        result = cancelled_result(
            o.request_id,
            batch_id=self.batch_id,
            attempts=self.attempts[o.request_id],
            metadata=metadata,
            # What the provider reports it used: it may bill this request all the same.
            usage=usage if isinstance(usage, dict) else None,
        )
        return outcome, result.to_json()

    def _encoded(self, o: LineOutcome, meta: bytes | None) -> tuple[LineOutcome, bytes]:
        # Anything about one result that cannot be encoded (metadata or a response nested
        # deeper than the encoders go, metadata that is not a JSON object) fails that request
        # alone.
        try:
            return o, self._encode(o, meta)
        except Exception as exc:
            log.error(
                "batch %s: result of %s cannot be encoded: %s", self.batch_id, o.request_id, exc
            )
            reason = f"the result could not be encoded: {exc}"
            failed = LineOutcome(
                o.request_id, "failed", error=ErrorInfo(code="result_encoding", message=reason)
            )
        try:
            return failed, self._encode(failed, meta)
        except Exception:  # the metadata itself is what cannot be encoded
            return failed, self._encode(failed, None)

    def _dry_run(self, response: dict[str, Any] | None) -> bool:
        # Noted for the whole batch too: its token counters say whether a model ran.
        dry = Result.is_dry_run(response)
        self.dry_run = self.dry_run or dry
        return dry

    def _encode(self, o: LineOutcome, meta: bytes | None) -> bytes:
        usage = o.response.get("usage") if o.response else None
        return Result.encode(
            request_id=o.request_id,
            status=o.status,  # type: ignore[arg-type]
            response=o.response,
            error=o.error,
            usage=usage if isinstance(usage, dict) else None,
            batch_id=self.batch_id,
            attempts=self.attempts[o.request_id],
            metadata=orjson.loads(meta) if meta else None,
            # Said in the Result itself, so a consumer never takes echo text for an answer.
            dry_run=self._dry_run(o.response),
        )

    def _record(
        self,
        final: list[_Final],
        retry: list[LineOutcome],
        instead: dict[str, str],
        now: datetime,
    ) -> None:
        # ``now`` is when the chunk's finish.lua was sent, not this later moment: each
        # result's time to live in Redis runs from its finish, and the reconciler takes a
        # result as expired (not lost) by finished_at + that TTL, so finished_at must not
        # come after the finish. Recorded later, a result that had expired looked lost
        # for as long as the recording lagged, and was delivered again.
        rows = []
        for o, result, usage in final:
            if o.request_id in instead:
                rows.append(cancelled_row(o.request_id, instead[o.request_id], now))
                continue
            rows.append(
                {
                    "id": o.request_id,
                    "state": o.status,
                    "error_code": o.error.code if o.error else None,
                    "error_message": o.error.message[:2000] if o.error else None,
                    "prompt_tokens": token_count(usage, "prompt_tokens"),
                    "completion_tokens": token_count(usage, "completion_tokens"),
                    "finished_at": now,
                    # Exactly the bytes on the callback stream, so they can be sent again.
                    "result": result.decode(),
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
                "result": None,
            }
            for o in retry
        ]
        with self.ctx.session() as session:
            finish_requests(session, self.batch_id, rows)
            session.commit()


def token_count(usage: object, key: str) -> int:
    """A usage count fit for the record: 0 unless a number, at most ``MAX_TOKENS``."""
    # The result still carries the provider's usage as it came; only the record is guarded.
    value = usage.get(key) if isinstance(usage, dict) else None
    if type(value) is int and 0 <= value <= MAX_TOKENS:
        return value  # the usual count, decided without the checks below (twice per result)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    if isinstance(value, float) and not math.isfinite(value):
        return 0
    return int(min(max(value, 0), MAX_TOKENS))
