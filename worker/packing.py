"""The aggregator: claim due buffers and pack each claim into a batch file plus its SQL record.

The order of steps is what makes a crash harmless:

1. ``claim.lua`` moves up to N requests from the buffer into a claim, atomically;
2. the JSONL file is streamed to a temporary name, fsynced and renamed;
3. one SQL transaction inserts the batch row and the request rows (the commit point);
4. the claim keys are dropped.

A crash before 3 leaves a claim that the reaper returns to the buffer (it first inserts an
``abandoned`` row under the same id, so a slow packer's commit then fails instead of racing
it); a crash after 3 leaves only claim keys, which the reaper drops.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError

from shared.db import upsert_requests
from shared.models import Batch, BatchState, RequestState, utcnow
from shared.redis_layout import split_buffer_name, text
from worker.context import WorkerContext

log = logging.getLogger(__name__)
_READ_CHUNK = 5000  # requests per HMGET of bodies: ~5 MB, few round trips


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


def pack_due_buffers(ctx: WorkerContext, *, force: bool = False) -> list[PackedBatch]:
    """Pack every buffer that has reached a threshold (all non-empty ones if ``force``)."""
    packed: list[PackedBatch] = []
    bufs: list[Any] = ctx.redis.hkeys(ctx.keys.buffers)
    for raw in bufs:
        buf = text(raw)
        while True:
            batch = pack_buffer(ctx, buf, force=force)
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
        [
            ctx.keys.pending(buf),
            ctx.keys.buffers,
            ctx.keys.claim_ids(batch_id),
            ctx.keys.claim(batch_id),
            ctx.keys.claims,
        ],
        [
            ctx.keys.base,
            buf,
            batch_id,
            s.max_batch_requests,
            s.max_batch_bytes,
            int(s.max_wait_seconds * 1000),
            int(time.time() * 1000),
            "1" if force else "0",
        ],
    )
    if not count:
        return None
    reason = text(raw_reason)
    provider, model = split_buffer_name(buf)
    path = ctx.batch_dir / provider / f"{batch_id}.jsonl"
    batch = Batch(
        id=batch_id,
        provider=provider,
        model=model,
        state=BatchState.PACKED.value,
        request_count=int(count),
        bytes=int(size),  # the sum of the claimed lines' sizes: exactly the file's length
        flush_reason=reason,
        file_path=str(path),
        next_poll_at=utcnow(),
    )
    rows = request_rows(batch_id, claimed)
    # The SQL rows depend only on the claim, so they are written while the file is; the
    # transaction commits only once the file is durable, which keeps the commit point.
    file_done = threading.Event()
    file_failed = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as pool:
        recording = pool.submit(_record, ctx, batch, rows, file_done, file_failed)
        try:
            write_batch_file(ctx, batch_id, buf, claimed, path)
        except BaseException:
            file_failed.set()
            raise
        finally:
            file_done.set()
        try:
            recording.result()
        except IntegrityError:
            # The reaper gave up on this claim first and returned its requests to the buffer.
            log.warning("batch %s was reaped before it was recorded; discarding it", batch_id)
            path.unlink(missing_ok=True)
            return None
    release_claim(ctx, batch_id)
    log.info("packed batch %s: %d requests, %d bytes (%s)", batch_id, count, size, reason)
    return PackedBatch(batch_id, provider, model, int(count), int(size), reason, path)


def _record(
    ctx: WorkerContext,
    batch: Batch,
    rows: list[dict[str, Any]],
    file_done: threading.Event,
    file_failed: threading.Event,
) -> None:
    with ctx.session() as session:
        session.add(batch)
        session.flush()  # a reaper's tombstone under this id fails here, before any more work
        upsert_requests(session, rows)
        file_done.wait()
        if file_failed.is_set():
            session.rollback()
            return
        session.commit()


def request_rows(batch_id: str, claimed: list[Any]) -> list[dict[str, Any]]:
    """SQL rows for the claim script's flat (id, enq, cbq, attempts) list."""
    return [
        {
            "id": text(claimed[i]),
            "batch_id": batch_id,
            "state": RequestState.BATCHED.value,
            "attempts": int(claimed[i + 3]) + 1,
            "callback_queue": text(claimed[i + 2]),
            "enqueued_at_ms": int(claimed[i + 1]),
        }
        for i in range(0, len(claimed), 4)
    ]


def write_batch_file(
    ctx: WorkerContext, batch_id: str, buf: str, claimed: list[Any], path: Path
) -> None:
    """Stream the claimed requests into ``path`` as Together JSONL, fsynced and renamed.

    ``claimed`` is the claim script's flat list of (id, enq, cbq, attempts) per request.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    ids = claimed[::4]
    with open(tmp, "wb", buffering=1 << 20) as out:
        for start in range(0, len(ids), _READ_CHUNK):
            chunk = ids[start : start + _READ_CHUNK]
            bodies: list[Any] = ctx.redis.hmget(ctx.keys.bodies(buf), chunk)
            lines = []
            for request_id, body in zip(chunk, bodies, strict=True):
                if body is None:
                    # Only a Redis that lost data gets here; the collector then reports the
                    # request as not executed and it goes round again until out of attempts.
                    log.error("request %s has no body; left out of batch %s", request_id, batch_id)
                    continue
                lines.append(b'{"custom_id":"' + request_id + b'","body":' + body + b"}\n")
            out.write(b"".join(lines))
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def release_claim(ctx: WorkerContext, batch_id: str) -> None:
    """Forget a claim whose batch is recorded in SQL."""
    pipe = ctx.redis.pipeline(transaction=True)
    pipe.delete(ctx.keys.claim_ids(batch_id), ctx.keys.claim(batch_id))
    pipe.zrem(ctx.keys.claims, batch_id)
    pipe.execute()
