"""Working through due batches one at a time, each under its lease, each failure its own."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import TypeVar

from celery.exceptions import SoftTimeLimitExceeded

from shared.db import release_taken
from shared.models import Batch
from worker.context import WorkerContext

log = logging.getLogger(__name__)
T = TypeVar("T")


def hand_back(ctx: WorkerContext, batch: Batch) -> None:
    """Give back a batch taken but passed by (its lease was busy): due again at once."""
    with ctx.session() as session:
        release_taken(session, batch, ctx.now())
        session.commit()


def take_hold(ctx: WorkerContext) -> timedelta:
    """How far a taken batch's deadline moves, so other workers skip it while it is worked on."""
    # As long as a lease lasts: a taker that dies delays its batches no longer than its lease.
    return timedelta(seconds=ctx.settings.lease_seconds)


def each_batch(
    ctx: WorkerContext,
    items: Iterable[T],
    batch_id: Callable[[T], str],
    work: Callable[[T], bool],
    on_error: Callable[[T, Exception], None],
    *,
    doing: str,
    passed_by: Callable[[T], None] | None = None,
) -> list[str]:
    """Run ``work`` on each item whose batch lease we get; the ids for which it returned True.

    An exception from one batch is logged and handed to ``on_error`` (which records it and
    backs the batch off), so one bad batch never stalls the others; running out of task time
    stops the loop, and the next beat carries on. ``passed_by`` gets each item whose lease
    someone else holds (a taken batch is handed back with it).
    """
    done = []
    for item in items:
        name = batch_id(item)
        with ctx.lease(f"batch:{name}") as mine:
            if not mine:
                if passed_by is not None:
                    passed_by(item)
                continue
            try:
                if work(item):
                    done.append(name)
            except SoftTimeLimitExceeded:
                raise
            except Exception as exc:
                log.exception("%s batch %s failed unexpectedly", doing, name)
                on_error(item, exc)
    return done
