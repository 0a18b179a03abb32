"""Cancelling a whole batch (``batchbridge batches cancel``), in whatever state it is.

The operator's command only records the wish (``cancel_requested_at``, ``cancel_mode``) and
makes the batch due; the workers carry it out, so it follows the same leases and state
machine as everything else:

* not yet at the provider, and no create that may have made a job: the batch fails with
  outcome ``cancelled`` (its requests are reported cancelled) or, with ``--requeue``,
  ``unsent`` (they go round again, costing no attempt);
* a create may have made a job: the submitter adopts it if it exists, and never creates one;
* submitted: each poll asks the provider to cancel until the job is final. Lines it finished
  are delivered as usual; the rest are cancelled or, with ``--requeue``, sent round again
  (outcome ``requeued``).
"""

from __future__ import annotations

import logging
from typing import Literal

from shared.db import transition, update_batch
from shared.models import Batch, BatchState
from worker.context import WorkerContext

log = logging.getLogger(__name__)
CancelMode = Literal["cancel", "requeue"]
# The batch outcome of a provider job cancelled with --requeue: missing lines go round.
REQUEUED = "requeued"
_OPEN = (BatchState.PACKED, BatchState.UPLOADED, BatchState.SUBMITTED)


class NotCancellable(ValueError):
    """The batch is unknown, or past the point where cancelling changes anything."""


def request_batch_cancel(ctx: WorkerContext, batch_id: str, *, requeue: bool = False) -> str:
    """Ask for a batch to be cancelled; says what happened (or raises NotCancellable)."""
    mode: CancelMode = "requeue" if requeue else "cancel"
    with ctx.lease(f"batch:{batch_id}") as mine:
        if not mine:
            raise NotCancellable(f"batch {batch_id} is being worked on right now; try again")
        with ctx.session() as session:
            batch = session.get(Batch, batch_id)
        if batch is None:
            raise NotCancellable(f"no batch {batch_id!r}")
        if batch.state not in _OPEN:
            raise NotCancellable(
                f"batch {batch_id} is {batch.state}: its requests already have (or are getting) "
                "their outcomes; cancel single requests with `batchbridge cancel REQUEST_ID`"
            )
        now = ctx.now()
        with ctx.session() as session:
            update_batch(
                session, batch_id, cancel_requested_at=now, cancel_mode=mode, next_poll_at=now
            )
            session.commit()
        batch.cancel_requested_at, batch.cancel_mode = now, mode
        if batch.state != BatchState.SUBMITTED and batch.create_started_at is None:
            if cancel_unsent(ctx, batch):
                return f"batch {batch_id} cancelled before it reached the provider"
            raise NotCancellable(f"batch {batch_id} changed state meanwhile; look again")
    if batch.state == BatchState.SUBMITTED:
        return (
            f"batch {batch_id}: cancel requested; the worker cancels provider job "
            f"{batch.provider_batch_id} on its next poll (finished lines are still delivered)"
        )
    return (
        f"batch {batch_id}: cancel requested; a create may have reached the provider, so the "
        "worker adopts (and cancels) that job if it exists, and creates none"
    )


def cancel_unsent(ctx: WorkerContext, batch: Batch) -> bool:
    """End a batch the provider never saw, as its cancel asked; False if it moved meanwhile."""
    requeue = batch.cancel_mode == "requeue"
    with ctx.session() as session:
        moved = transition(
            session,
            batch.id,
            BatchState.FAILED,
            expect=[BatchState(batch.state)],
            outcome="unsent" if requeue else "cancelled",
            error="cancelled by the operator before submission"
            + ("; its requests go round again" if requeue else ""),
        )
        session.commit()
    if moved:
        log.warning("batch %s cancelled by the operator before submission", batch.id)
    return moved


def cancelled_outcome(batch: Batch, provider_outcome: str) -> str:
    """The batch outcome for a provider job that ended ``provider_outcome``."""
    if provider_outcome == "cancelled" and batch.cancel_mode == "requeue":
        return REQUEUED
    return provider_outcome
