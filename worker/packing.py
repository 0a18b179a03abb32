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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy.exc import IntegrityError

from shared.db import upsert_requests
from shared.models import Batch, BatchState, RequestState, utcnow
from shared.redis_layout import split_buffer_name, text
from worker.context import WorkerContext

log = logging.getLogger(__name__)
_READ_CHUNK = 1000


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
    rows = write_batch_file(ctx, batch_id, buf, claimed, path)
    batch = Batch(
        id=batch_id,
        provider=provider,
        model=model,
        state=BatchState.PACKED.value,
        request_count=len(rows),
        bytes=path.stat().st_size,
        flush_reason=reason,
        file_path=str(path),
        next_poll_at=utcnow(),
    )
    try:
        with ctx.session() as session:
            session.add(batch)
            session.flush()
            upsert_requests(session, rows)
            session.commit()
    except IntegrityError:
        # The reaper gave up on this claim first and returned its requests to the buffer.
        log.warning("batch %s was reaped before it was recorded; discarding its file", batch_id)
        path.unlink(missing_ok=True)
        return None
    release_claim(ctx, batch_id)
    log.info("packed batch %s: %d requests, %d bytes (%s)", batch_id, count, size, reason)
    return PackedBatch(batch_id, provider, model, len(rows), batch.bytes, reason, path)


def write_batch_file(
    ctx: WorkerContext, batch_id: str, buf: str, claimed: list[Any], path: Path
) -> list[dict[str, Any]]:
    """Stream the claimed requests into ``path`` as Together JSONL; return their SQL rows.

    ``claimed`` is the claim script's flat list of (id, enq, cbq, attempts) per request.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".jsonl.tmp")
    rows: list[dict[str, Any]] = []
    step = 4 * _READ_CHUNK
    with open(tmp, "wb", buffering=1 << 20) as out:
        for start in range(0, len(claimed), step):
            chunk = claimed[start : start + step]
            bodies = ctx.redis.hmget(ctx.keys.bodies(buf), chunk[::4])
            rows.extend(_write_chunk(batch_id, chunk, bodies, out))  # type: ignore[arg-type]
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    return rows


def _write_chunk(
    batch_id: str, chunk: list[Any], bodies: list[bytes | None], out: BinaryIO
) -> list[dict[str, Any]]:
    rows = []
    lines = []
    for i, body in enumerate(bodies):
        request_id, enq, cbq, attempts = chunk[4 * i : 4 * i + 4]
        if body is None:
            # Only a Redis that lost data gets here; the collector reports it as not executed.
            log.error("request %s has no body; left out of batch %s", request_id, batch_id)
            continue
        lines.append(b'{"custom_id":"' + request_id + b'","body":' + body + b"}\n")
        rows.append(
            {
                "id": request_id.decode(),
                "batch_id": batch_id,
                "state": RequestState.BATCHED.value,
                "attempts": int(attempts) + 1,
                "callback_queue": cbq.decode(),
                "enqueued_at_ms": int(enq),
            }
        )
    out.write(b"".join(lines))
    return rows


def release_claim(ctx: WorkerContext, batch_id: str) -> None:
    """Forget a claim whose batch is recorded in SQL."""
    pipe = ctx.redis.pipeline(transaction=True)
    pipe.delete(ctx.keys.claim_ids(batch_id), ctx.keys.claim(batch_id))
    pipe.zrem(ctx.keys.claims, batch_id)
    pipe.execute()
