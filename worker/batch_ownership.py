"""Whether a committed batch still owns its requests in Redis, and taking them back if not.

A batch is packed by ``claim.lua``, which marks each request ``batched`` under it. A Redis
that lost writes (``worker/reconciler.py`` lists how) can have forgotten that claim: the
requests are pending in their buffer again and would be packed, and billed, a second time.
Before a provider job is created, and in the reconciler's passes, the record's rows of the
batch are compared with Redis: pending requests are taken back (``reclaim_batch.lua``), and a
batch some of whose requests another batch holds by now is given back unsent, so that no
request is sent twice. The claim's intact mark (``{p}:intact:{batch}``) spares the comparison
for a batch no request has left since its claim.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from sqlmodel import select

from shared.db import transition
from shared.models import Batch, BatchState, Request
from shared.redis_layout import text
from worker.context import WorkerContext

log = logging.getLogger(__name__)
ROWS_CHUNK = 5000  # record rows read, and requests taken back, per step
# How long a claim's intact mark lives. A batch still unsent after that (the provider refusing
# creates for a week) is checked request by request instead.
INTACT_MARK_SECONDS = 7 * 24 * 3600


@dataclass(frozen=True, slots=True)
class Ownership:
    """Which of a batch's requests Redis still has batched under it."""

    owned: list[str]
    pending: list[str]  # back in their buffer: the claim was lost
    missing: list[str]  # no hash at all (nobody else can take them)
    elsewhere: list[str]  # finished, or claimed by another batch
    moved: int  # rows packed into this batch that the record now files under another

    @property
    def intact(self) -> bool:
        """Creating a provider job over the batch file bills no request twice."""
        return not self.pending and not self.elsewhere and not self.moved


def batch_ownership(ctx: WorkerContext, batch: Batch) -> Ownership:
    """Compare the record's requests of ``batch`` with what Redis has batched under it."""
    owned: list[str] = []
    pending: list[str] = []
    missing: list[str] = []
    elsewhere: list[str] = []
    rows = 0
    for chunk in request_rows(ctx, batch.id):
        rows += len(chunk)
        ids = [r[0] for r in chunk]
        strays = _strays(ctx, batch.id, ids)
        if not strays:
            owned += ids  # the usual case: Redis holds every one under this batch
            continue
        for i, request_id in enumerate(ids):
            if i not in strays:
                owned.append(request_id)
            elif strays[i] == "pending":
                pending.append(request_id)
            elif strays[i] is None:
                missing.append(request_id)
            else:
                elsewhere.append(request_id)
    return Ownership(owned, pending, missing, elsewhere, moved=max(batch.request_count - rows, 0))


def batch_still_owns_requests(ctx: WorkerContext, batch_id: str) -> bool:
    """Whether creating a provider job for this packed/uploaded batch bills no request twice.

    Call it right before the create, holding the batch's lease. Requests found pending again
    (their claim was lost) are taken back first. If another batch holds some of the requests
    by now, the batch is given back unsent (FAILED, outcome ``unsent``: the collector sends
    the requests it still owns round again, costing them no attempt) and False is returned:
    do not create. Requests Redis has no trace of ride along (nobody else can take them;
    their outcome is delivered from the record, see (a)).
    """
    with ctx.session() as session:
        batch = session.get(Batch, batch_id)
    if batch is None or batch.state not in (BatchState.PACKED, BatchState.UPLOADED):
        return False
    # The claim set the mark in the same script, and every script that takes a request out
    # of a batch drops it: while it exists, no request was lost or moved, so the record's
    # rows need not be read and each request's hash asked. On a 10,000-request batch that
    # cost 6.5-20 us of CPU a request (this process and Redis), 0.2 with the mark. A Redis
    # that lost the claim has lost the mark with it.
    if ctx.redis.exists(ctx.keys.intact(batch_id)):
        return True
    ownership, _ = take_back(ctx, batch)
    if ownership.intact:
        return True
    give_back(ctx, batch, ownership)
    return False


def take_back(ctx: WorkerContext, batch: Batch) -> tuple[Ownership, int]:
    """Reclaim the batch's requests found pending again; its ownership after, and how many."""
    ownership = batch_ownership(ctx, batch)
    if not ownership.pending:
        return ownership, 0
    moved = 0
    for start in range(0, len(ownership.pending), ROWS_CHUNK):
        chunk = ownership.pending[start : start + ROWS_CHUNK]
        args = [ctx.keys.base, batch.id, *chunk]
        moved += len(ctx.scripts.run("reclaim_batch", [ctx.keys.buffers], args))
    log.error(
        "batch %s: Redis had lost its claim; %d of %d requests taken back from their buffer",
        batch.id,
        moved,
        len(ownership.pending),
    )
    return batch_ownership(ctx, batch), moved


def give_back(ctx: WorkerContext, batch: Batch, ownership: Ownership) -> bool:
    """Fail a packed/uploaded batch that lost requests as ``unsent``; True if this call did."""
    if batch.state not in (BatchState.PACKED, BatchState.UPLOADED):
        # The provider job exists (or may): nothing saves the double charge now, but each
        # request is still delivered once (finish.lua follows whichever batch Redis names).
        log.error(
            "batch %s (%s): %d of its requests are held by another batch since Redis lost "
            "writes; they may be billed twice",
            batch.id,
            batch.state,
            len(ownership.elsewhere) + ownership.moved,
        )
        return False
    reason = (
        f"Redis lost writes: {len(ownership.elsewhere) + ownership.moved} of its "
        f"{batch.request_count} requests now belong to another batch; not sent, so none is "
        "billed twice"
    )
    with ctx.session() as session:
        moved = transition(
            session,
            batch.id,
            BatchState.FAILED,
            expect=[BatchState.PACKED, BatchState.UPLOADED],
            outcome="unsent",
            error=reason,
            next_poll_at=ctx.now(),
        )
        session.commit()
    if moved:
        log.error("batch %s given back: %s", batch.id, reason)
    return moved


def request_rows(ctx: WorkerContext, batch_id: str) -> Iterator[list[tuple[str, str, str]]]:
    """The record's (id, state, callback queue) of one batch's requests, in id order, chunked."""
    after = ""
    while True:
        with ctx.session() as session:
            rows = list(
                session.exec(
                    select(Request.id, Request.state, Request.callback_queue)
                    .where(Request.batch_id == batch_id)
                    .where(Request.id > after)
                    .order_by(Request.id)
                    .limit(ROWS_CHUNK)
                ).all()
            )
        if not rows:
            return
        yield [(r[0], r[1], r[2]) for r in rows]
        after = rows[-1][0]


def _strays(ctx: WorkerContext, batch_id: str, ids: Sequence[str]) -> dict[int, str | None]:
    """Position -> Redis state (None: no hash) of the ids not batched under ``batch_id``."""
    reply = ctx.scripts.run("batch_strays", [], [ctx.keys.base, batch_id, *ids])
    return {
        int(reply[i]) - 1: None if reply[i + 1] is None else text(reply[i + 1])
        for i in range(0, len(reply), 2)
    }
