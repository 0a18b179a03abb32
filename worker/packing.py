"""The aggregator: claim due buffers and pack each claim into a batch file plus its SQL record.

The order of steps is what makes a crash harmless:

1. ``claim.lua`` moves up to N requests from the buffer into a claim, atomically;
2. the JSONL file is streamed to a temporary name, fsynced and renamed;
3. one SQL transaction inserts the batch row and the request rows (the commit point);
4. the claim keys are dropped.

An error before 3 hands the claim straight back; a crash before 3 leaves a claim that the
reaper returns to the buffer (both first insert an ``abandoned`` row under the same id, so a
slow packer's commit then fails instead of racing it); a crash after 3 leaves only claim
keys, which the reaper drops.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import IntegrityError

from shared.db import held_elsewhere, upsert_requests
from shared.models import Batch, BatchState, RequestState
from shared.redis_layout import split_buffer_name, text
from shared.schemas import DEFAULT_PROVIDER
from shared.settings import Settings
from worker.batch_files import WrittenFile, write_lines
from worker.batch_ownership import INTACT_MARK_SECONDS
from worker.claims import abandon_claim, release_claim
from worker.context import WorkerContext
from worker.reconciler import repair_batch

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PackedBatch:
    """A batch file written and recorded."""

    id: str
    provider: str
    model: str
    request_count: int
    bytes: int
    reason: str
    path: Path


def new_batch_id() -> str:
    """Time-ordered batch id: hex milliseconds then randomness."""
    return f"{int(time.time() * 1000):012x}{os.urandom(8).hex()}"


@dataclass(frozen=True, slots=True)
class FlushDecision:
    """Whether a buffer is due to be packed, by which threshold, or how long until it is."""

    reason: str | None  # "count", "bytes" or "age" when due; None while no threshold is met
    wait_seconds: float  # 0 when due; else until the oldest request reaches the age limit
    max_requests: int
    max_bytes: int
    max_wait_seconds: float


def claim_thresholds(settings: Settings) -> tuple[int, int, int]:
    """The (max requests, max bytes, max wait in ms) that ``claim.lua`` is given."""
    return (
        settings.max_batch_requests,
        settings.max_batch_bytes,
        int(settings.max_wait_seconds * 1000),
    )


def flush_decision(
    settings: Settings, count: int, size: int, oldest_enq_ms: int | None, now_ms: int
) -> FlushDecision:
    """The rule ``claim.lua`` applies to a buffer (count, then bytes, then age), in Python.

    The claim itself must decide inside Redis (atomically with taking the requests); this
    mirror is for saying when and why a buffer will flush, and a test holds the two together.
    """
    max_n, max_bytes, max_wait_ms = claim_thresholds(settings)
    # The script counts a request without an enqueue time as enqueued now.
    age_ms = now_ms - (now_ms if oldest_enq_ms is None else oldest_enq_ms)
    reason: str | None = None
    if count == 0:
        pass
    elif count >= max_n:
        reason = "count"
    elif size >= max_bytes:
        reason = "bytes"
    elif age_ms >= max_wait_ms:
        reason = "age"
    wait_ms = 0 if reason else max_wait_ms - (age_ms if count else 0)
    return FlushDecision(reason, wait_ms / 1000, max_n, max_bytes, max_wait_ms / 1000)


def pack_due_buffers(ctx: WorkerContext, *, force: bool = False) -> list[PackedBatch]:
    """Pack every buffer that has reached a threshold (all non-empty ones if ``force``)."""
    packed: list[PackedBatch] = []
    bufs: list[Any] = ctx.redis.hkeys(ctx.keys.buffers)
    for raw in bufs:
        buf = text(raw)
        while True:
            try:
                batch = pack_buffer(ctx, buf, force=force)
            except SoftTimeLimitExceeded:
                raise
            except Exception:  # one failing buffer must not stop the others
                log.exception("packing buffer %s failed", buf)
                break
            if batch is None:
                break
            packed.append(batch)
    return packed


def pack_buffer(ctx: WorkerContext, buf: str, *, force: bool = False) -> PackedBatch | None:
    """Claim and pack one batch from ``buf`` if it is due; None if it is not."""
    s = ctx.settings
    batch_id = new_batch_id()
    count, size, raw_reason, *claimed = ctx.scripts.run(
        "claim",
        ctx.keys.claim_script_keys(buf, batch_id),
        [
            ctx.keys.base,
            buf,
            batch_id,
            *claim_thresholds(s),
            int(time.time() * 1000),
            "1" if force else "0",
            INTACT_MARK_SECONDS,
        ],
    )
    if not count:
        return None
    ctx.crash_point("after_claim")
    reason = text(raw_reason)
    buffer_provider, model = split_buffer_name(buf)
    provider = batch_provider(s, buffer_provider)
    path = ctx.batch_dir / provider / f"{batch_id}.jsonl"
    batch = Batch(
        id=batch_id,
        provider=provider,
        model=model,
        state=BatchState.PACKED.value,
        request_count=int(count),
        bytes=int(size),
        flush_reason=reason,
        file_path=str(path),
        buffer=buf,
        next_poll_at=ctx.now(),
    )
    try:
        # The claimed size also counts metadata (it travels with every result); the record
        # keeps the file's exact length.
        written = write_batch_file(ctx, batch_id, buf, claimed[::4], path)
        ctx.crash_point("after_file_write")
        batch.bytes, batch.file_sha256 = written.bytes, written.sha256
        rows = request_rows(batch_id, claimed)
        with ctx.session() as session:
            session.add(batch)
            session.flush()  # a reaper's tombstone under this id fails here
            if upsert_requests(session, rows) != len(rows):
                held = held_elsewhere(session, batch_id, [row["id"] for row in rows])
                session.rollback()
                raise _OfferedAgain(held)
            session.commit()
    except _OfferedAgain as again:
        _hand_back_offered_again(ctx, batch_id, path, again.held)
        return None
    except IntegrityError:
        # The reaper gave up on this claim first and returned its requests to the buffer.
        log.warning("batch %s was reaped before it was recorded; discarding it", batch_id)
        path.unlink(missing_ok=True)
        return None
    except Exception:
        # Disk full, database down...: hand the requests straight back rather than leaving
        # them to the reaper, then let the caller log it.
        path.unlink(missing_ok=True)
        with contextlib.suppress(Exception):
            abandon_claim(ctx, batch_id)
        raise
    ctx.crash_point("after_pack_commit")
    release_claim(ctx, batch_id)
    log.info("packed batch %s: %d requests, %d bytes (%s)", batch_id, count, size, reason)
    return PackedBatch(batch_id, provider, model, int(count), batch.bytes, reason, path)


class _OfferedAgain(Exception):
    """Some claimed requests are held by another batch in the record (Redis lost writes)."""

    def __init__(self, held: dict[str, str]) -> None:
        super().__init__(f"{len(held)} requests belong to other batches")
        self.held = held


def _hand_back_offered_again(
    ctx: WorkerContext, batch_id: str, path: Path, held: dict[str, str]
) -> None:
    # Only a Redis that lost writes offers a request the record has in another live (or
    # finished) batch. Packing it again would bill it twice: give the whole claim back and
    # let the batches that own those requests take them back (or finish them) right away;
    # the rest are packed on the next pass.
    path.unlink(missing_ok=True)
    abandon_claim(ctx, batch_id)
    owners = sorted(set(held.values()))
    log.error(
        "batch %s not packed: %d of its requests belong to batch(es) %s in the record (Redis "
        "lost writes); handed back to their owners",
        batch_id,
        len(held),
        ", ".join(owners[:5]),
    )
    for owner in owners:
        repair_batch(ctx, owner)


def batch_provider(settings: Settings, buffer_provider: str) -> str:
    """The provider a buffer's batches go to: ``default`` buffers follow this worker's setting.

    Resolved here, when the batch is recorded, rather than by the producer, so that the
    deployment's default is the worker's configuration (its ``BATCHBRIDGE_PROVIDER`` and
    ``TOGETHER_API_KEY``), never whatever a producer's environment happens to hold.
    """
    return settings.default_provider if buffer_provider == DEFAULT_PROVIDER else buffer_provider


def request_rows(batch_id: str, claimed: list[bytes]) -> list[dict[str, Any]]:
    """SQL rows for the claim script's flat (id, cbq, attempts, webhook URL) list."""
    state = RequestState.BATCHED.value
    # Every column is given (defaults too) so the insert can take the rows as they are.
    return [
        {
            "id": request_id.decode(),
            "batch_id": batch_id,
            "state": state,
            "attempts": int(attempts) + 1,
            "callback_queue": cbq.decode(),
            "webhook_url": webhook_url.decode(),
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "line": line,
        }
        for line, (request_id, cbq, attempts, webhook_url) in enumerate(
            zip(claimed[0::4], claimed[1::4], claimed[2::4], claimed[3::4], strict=True)
        )
    ]


def write_batch_file(
    ctx: WorkerContext, batch_id: str, buf: str, ids: list[bytes], path: Path
) -> WrittenFile:
    """Stream the claimed requests into ``path`` as Together JSONL, oldest first.

    Each request's row records its line, so any worker can rebuild the same bytes from the
    record and Redis (``worker/batch_files.py``).
    """
    return write_lines(ctx, batch_id, buf, ids, path)
