"""One line per task run saying what it did: what Flower shows as the task's result.

A tick that found nothing to do says exactly ``idle``; every other summary names batches,
requests or webhooks, so Flower's search ``result:batch OR result:request OR result:webhook``
lists only the runs that did something.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from worker.packing import PackedBatch
from worker.reconciler import ReconcileReport
from worker.webhook_sender import SendReport

IDLE = "idle"
_SHOWN = 5  # ids named in one summary; the rest are counted


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 'es' if noun.endswith('h') else 's'}"


def _ids(ids: Sequence[str]) -> str:
    shown = ", ".join(ids[:_SHOWN])
    return shown + (f" and {len(ids) - _SHOWN} more" if len(ids) > _SHOWN else "")


def packed(batches: Sequence[PackedBatch]) -> str:
    """``packed 2 batches (m-a 10000, m-b 421)``."""
    if not batches:
        return IDLE
    per_model: Counter[str] = Counter()
    for batch in batches:
        per_model[batch.model] += batch.request_count
    parts = ", ".join(f"{model} {count}" for model, count in per_model.items())
    return f"packed {_plural(len(batches), 'batch')} ({parts})"


def batches_did(verb: str, batch_ids: Sequence[str]) -> str:
    """``submitted 1 batch: b_…`` (or idle)."""
    if not batch_ids:
        return IDLE
    return f"{verb} {_plural(len(batch_ids), 'batch')}: {_ids(batch_ids)}"


def reaped(requests: int) -> str:
    """``reaped: 3 requests back to their buffers`` (or idle)."""
    return IDLE if not requests else f"reaped: {_plural(requests, 'request')} back to buffers"


def reconciled(report: ReconcileReport) -> str:
    """What a reconcile pass repaired (or idle)."""
    if not report.repairs:
        return IDLE
    parts = {
        "restored": report.restored,
        "requeued": report.requeued,
        "lost": report.lost,
        "reclaimed": report.reclaimed,
        "orphans requeued": report.orphans,
    }
    shown = ", ".join(f"{name} {n}" for name, n in parts.items() if n)
    return f"reconciled {_plural(report.repairs, 'request')}: {shown}"


def webhooks_sent(report: SendReport) -> str:
    """``webhooks: 40 delivered, 2 retrying, 0 dead`` (or idle)."""
    if not (report.settled or report.retried or report.capped):
        return IDLE
    parts = [f"{report.delivered} delivered", f"{report.retried} retrying", f"{report.dead} dead"]
    if report.capped:
        parts.append(f"{report.capped} waiting for their endpoint's concurrency cap")
    return "webhooks: " + ", ".join(parts)


def local_redispatched(count: int) -> str:
    """``re-dispatched 1 local batch`` (or idle)."""
    return IDLE if not count else f"re-dispatched {_plural(count, 'local batch')}"
