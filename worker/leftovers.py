"""Removing what crashed packs and collections leave on disk, and nothing that is still in use.

A packer writes ``batches/<provider>/<batch>.jsonl.tmp`` only while its claim is listed in
``{p}:claims``, and renames it before the claim ends; so a ``.tmp`` whose batch has no claim
(looked up after the directory was listed) or whose claim is past the claim timeout (the
reaper takes it back) is dead. A ``.jsonl`` whose batch the record says is finished or
abandoned is dead too (a crash between those steps and the unlink). A collect attempt works in
``results/<batch>/<attempt>/`` and cannot outlive the hard task time limit, so an attempt
directory (with its ``.part`` downloads) older than that is dead.

Every rule also waits ``MIN_AGE_SECONDS``, so that a data directory shared by deployments with
other key prefixes, or a Redis that lost its claims, never costs a packer its file.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from pathlib import Path

from sqlmodel import select

from shared.models import Batch, BatchState
from shared.redis_layout import text
from shared.settings import Settings
from worker.context import WorkerContext

log = logging.getLogger(__name__)
MIN_AGE_SECONDS = 120.0
# A hard-killed task's files are dead once its limit is over; the margin covers clock jitter.
_TASK_MARGIN_SECONDS = 60.0
_DEAD_BATCH_STATES = (BatchState.FINISHED.value, BatchState.ABANDONED.value)


def remove_leftovers(ctx: WorkerContext, now: float | None = None) -> int:
    """Remove dead packing and collecting files under the data directory; how many went."""
    now = time.time() if now is None else now
    removed = _remove_batch_files(ctx, now) + _remove_collect_attempts(ctx, now)
    if removed:
        log.warning("removed %d leftover files or directories of crashed work", removed)
    return removed


def remove_leftovers_at_startup(settings: Settings) -> None:
    """:func:`remove_leftovers` for a worker starting up; never stops the start-up."""
    try:
        ctx = WorkerContext.create(settings)
        try:
            remove_leftovers(ctx)
        finally:
            ctx.close()
    except Exception:  # the reaper tries again on every pass
        log.warning("could not remove leftover files at start-up", exc_info=True)


def _remove_batch_files(ctx: WorkerContext, now: float) -> int:
    tmps: list[Path] = []
    files: list[Path] = []
    for path in _old_files(ctx.batch_dir, now, MIN_AGE_SECONDS):
        if path.name.endswith(".tmp"):
            tmps.append(path)
        elif path.name.endswith(".jsonl"):
            files.append(path)
    if not tmps and not files:
        return 0
    # Read after listing: a claim that is gone now was gone, or doomed, when its file was seen.
    cutoff = now - ctx.settings.claim_timeout_seconds
    claims: list[tuple[bytes, float]] = ctx.redis.zrange(ctx.keys.claims, 0, -1, withscores=True)  # type: ignore[assignment]
    live = {text(member): score / 1000 for member, score in claims}
    dead = [p for p in tmps if (claimed := live.get(_batch_id(p))) is None or claimed < cutoff]
    candidates = {_batch_id(p): p for p in files if _batch_id(p) not in live}
    if candidates:
        with ctx.session() as session:
            done = session.exec(
                select(Batch.id)
                .where(Batch.id.in_(list(candidates)))  # type: ignore[attr-defined]
                .where(Batch.state.in_(_DEAD_BATCH_STATES))  # type: ignore[attr-defined]
            )
            dead += [candidates[batch_id] for batch_id in done]
    for path in dead:
        path.unlink(missing_ok=True)
    return len(dead)


def _remove_collect_attempts(ctx: WorkerContext, now: float) -> int:
    if not ctx.results_dir.is_dir():
        return 0
    max_age = max(ctx.settings.task_time_limit_seconds + _TASK_MARGIN_SECONDS, MIN_AGE_SECONDS)
    removed = 0
    for batch_dir in ctx.results_dir.iterdir():
        try:
            entries = list(batch_dir.iterdir()) if batch_dir.is_dir() else []
        except FileNotFoundError:  # its last collector just removed it
            continue
        for entry in entries:
            # An attempt directory's mtime is at least its creation time: old means dead.
            if now - _mtime(entry, now) <= max_age:
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:  # a file of the layout before attempt directories
                entry.unlink(missing_ok=True)
            removed += 1
        # Only if empty; a collector creating its directory at this moment retries the parent.
        with contextlib.suppress(OSError):
            batch_dir.rmdir()
    return removed


def _old_files(root: Path, now: float, min_age: float) -> list[Path]:
    if not root.is_dir():
        return []
    return [p for p in root.rglob("*") if p.is_file() and now - _mtime(p, now) > min_age]


def _mtime(path: Path, now: float) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # removed meanwhile by its owner: not ours to count
        return now


def _batch_id(path: Path) -> str:
    return path.name.partition(".")[0]
