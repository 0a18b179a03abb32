"""Requests batched under a batch that no claim and no committed row knows (reconciler (d)).

claim.lua writes a request's "batched" and its claim's entry in one script, and the claim
keys are dropped only after the batch row is committed, so such a request means the claim
list itself was lost (or an abandon died between its tombstone and its unclaim). Scanning
every request hash is costly, so this runs only in the start-up and replaced-Redis passes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from shared.models import Batch, BatchState
from shared.redis_layout import text
from worker.cancellation import requeue_or_cancel
from worker.context import WorkerContext

log = logging.getLogger(__name__)
_CHUNK = 1000


def return_orphans(ctx: WorkerContext, limit: int = 100_000) -> int:
    """Return requests batched under no live claim and no committed batch to their buffer."""
    returned = 0
    seen = 0
    by_batch: dict[str, list[str]] = {}
    pattern = f"{ctx.keys.base}req:*"
    for keys in _chunked(ctx.redis.scan_iter(match=pattern, count=_CHUNK), _CHUNK):
        seen += len(keys)
        pipe = ctx.redis.pipeline(transaction=False)
        for key in keys:
            pipe.hmget(key, ["state", "batch"])
        for key, (state, batch_id) in zip(keys, pipe.execute(), strict=True):
            if state == b"batched" and batch_id:
                request_id = text(key)[len(ctx.keys.base) + 4 :]
                by_batch.setdefault(text(batch_id), []).append(request_id)
        if seen >= limit:
            break
    for batch_id, ids in by_batch.items():
        if ctx.redis.zscore(ctx.keys.claims, batch_id) is not None:
            continue  # a live claim: the packer or the reaper deals with it
        with ctx.session() as session:
            batch = session.get(Batch, batch_id)
        if batch is not None and batch.state != BatchState.ABANDONED:
            continue  # committed: (a) to (c) deal with it
        # No batch records these: a request cancelled meanwhile is queued for the record.
        moved, _ = requeue_or_cancel(ctx, batch_id, ids, counts=False, recorded=False)
        if moved:
            log.error("%d requests of unknown batch %s back to their buffer", moved, batch_id)
        returned += moved
    return returned


def _chunked(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
