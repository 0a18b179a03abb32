"""Ending a claim: released once its batch is recorded, or abandoned back to its buffer."""

from __future__ import annotations

import logging

from sqlalchemy.exc import IntegrityError

from shared.models import Batch, BatchState
from shared.redis_layout import split_buffer_name
from worker.context import WorkerContext

log = logging.getLogger(__name__)


def release_claim(ctx: WorkerContext, batch_id: str) -> None:
    """Forget a claim whose batch is recorded in SQL."""
    pipe = ctx.redis.pipeline(transaction=True)
    pipe.delete(ctx.keys.claim_ids(batch_id), ctx.keys.claim(batch_id))
    pipe.zrem(ctx.keys.claims, batch_id)
    pipe.execute()


def abandon_claim(ctx: WorkerContext, batch_id: str) -> int:
    """Give an unrecorded claim's requests back to their buffer; how many went back.

    An ``abandoned`` tombstone is inserted first under the batch's id, so the SQL primary key
    decides the race with a packer that is still about to commit: if its batch row is already
    there, the claim is merely released. Safe to repeat, and to finish a repeat that died.
    """
    claim: dict[bytes, bytes] = ctx.redis.hgetall(ctx.keys.claim(batch_id))  # type: ignore[assignment]
    buf = claim.get(b"buf", b"").decode()
    provider, model = split_buffer_name(buf) if buf else ("", "")
    tombstone = Batch(
        id=batch_id,
        provider=provider,
        model=model,
        state=BatchState.ABANDONED.value,
        request_count=_count(claim.get(b"count")),
        bytes=_count(claim.get(b"bytes")),
    )
    try:
        with ctx.session() as session:
            session.add(tombstone)
            session.commit()
    except IntegrityError:
        with ctx.session() as session:
            existing = session.get(Batch, batch_id)
        if existing is None:
            # Not a primary-key clash (a constraint or trigger refused the row): releasing
            # now would strand the claim's requests, so leave the claim for the next pass.
            raise
        if existing.state != BatchState.ABANDONED:
            release_claim(ctx, batch_id)  # the packer committed; only its cleanup was lost
            return 0
        # Our own tombstone from an abandon that died before unclaiming: finish it.
    returned = ctx.scripts.run(
        "unclaim",
        [ctx.keys.claim_ids(batch_id), ctx.keys.claim(batch_id), ctx.keys.claims, ctx.keys.buffers],
        [ctx.keys.base, batch_id, ctx.settings.result_ttl_seconds],
    )
    log.warning("abandoned claim %s: %d requests back to %s", batch_id, returned, buf)
    return int(returned)


def _count(raw: bytes | None) -> int:
    # The tombstone's counts only describe the claim: a damaged one must not keep its requests
    # from going back.
    try:
        return int(raw or 0)
    except ValueError:
        return 0
