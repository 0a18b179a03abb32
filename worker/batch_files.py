"""Batch files: written by the packer, rebuilt byte for byte by any worker that lacks them.

Workers share Redis and the database, not a disk. The packer writes a batch's JSONL to its
own data directory as scratch; whichever worker takes the submit uploads it. A worker that
does not have the file rebuilds it from what is still in Redis: the request ids are the
batch's rows in the record, in the line order each row records, and each body stays in its
buffer's ``{p}:bodies:{buf}`` hash until the request's outcome is known. The rebuilt file
is checked against the length and SHA-256 the packer recorded, so only the very bytes the
packer wrote are ever uploaded.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sqlmodel import col, select

from shared.models import Batch, Request
from worker.context import WorkerContext

log = logging.getLogger(__name__)
# Bodies are read a chunk at a time, sized so a chunk holds about _READ_BYTES: the first
# chunk is small, and the next ones are sized by the mean body seen so far (5,000 ~1 KB bodies,
# or 180 of 44 KB: a 100 MB batch never sits in memory whole).
_READ_BYTES = 8 << 20
_FIRST_CHUNK = 256
_MAX_CHUNK = 5000


@dataclass(frozen=True, slots=True)
class WrittenFile:
    """What was written: the file's length and its SHA-256 (hex)."""

    bytes: int
    sha256: str


def write_lines(
    ctx: WorkerContext, batch_id: str, buf: str, ids: list[bytes], path: Path
) -> WrittenFile:
    """Stream ``ids``' requests into ``path`` as Together JSONL, fsynced, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".jsonl.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    written = 0
    try:
        with open(tmp, "wb", buffering=1 << 20) as out:
            start, size = 0, _FIRST_CHUNK
            while start < len(ids):
                chunk = ids[start : start + size]
                written += _write_chunk(ctx, batch_id, buf, chunk, out, digest)
                start += len(chunk)
                mean = max(written, 1) / start
                size = int(min(_MAX_CHUNK, max(1, _READ_BYTES // mean)))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except Exception:  # a crash leaves the temporary file to the reaper (worker/leftovers.py)
        tmp.unlink(missing_ok=True)
        raise
    return WrittenFile(written, digest.hexdigest())


def _write_chunk(
    ctx: WorkerContext, batch_id: str, buf: str, chunk: list[bytes], out: IO[bytes], digest: Any
) -> int:
    bodies: list[Any] = ctx.redis.hmget(ctx.keys.bodies(buf), chunk)
    written = 0
    for request_id, body in zip(chunk, bodies, strict=True):
        if body is None:
            # Only a Redis that lost data gets here; the collector then reports the request
            # as not executed and it goes round again until out of attempts.
            log.error("request %s has no body; left out of batch %s", request_id, batch_id)
            continue
        # Line by line: the chunk's bodies are the only copy held, not a joined second one.
        line = b'{"custom_id":"' + request_id + b'","body":' + body + b"}\n"
        digest.update(line)
        written += out.write(line)
    return written


def local_path(ctx: WorkerContext, batch: Batch) -> Path:
    """Where this worker keeps (or would rebuild) the batch's file."""
    return ctx.batch_dir / batch.provider / f"{batch.id}.jsonl"


def batch_file(ctx: WorkerContext, batch: Batch) -> Path | str:
    """The batch's file on this worker (rebuilt from Redis if need be), or why there is none."""
    for candidate in (Path(batch.file_path), local_path(ctx, batch)):
        if candidate.is_file() and _matches(candidate, batch):
            return candidate
    if not batch.buffer or batch.file_sha256 is None:
        return "it was packed by a version that cannot rebuild it (no buffer or digest recorded)"
    with ctx.session() as session:
        ids = session.exec(
            select(Request.id).where(Request.batch_id == batch.id).order_by(col(Request.line))
        ).all()
    path = local_path(ctx, batch)
    rebuilt = write_lines(ctx, batch.id, batch.buffer, [i.encode() for i in ids], path)
    if (rebuilt.bytes, rebuilt.sha256) != (batch.bytes, batch.file_sha256):
        path.unlink(missing_ok=True)
        return (
            f"rebuilt from Redis it is {rebuilt.bytes} bytes (sha256 {rebuilt.sha256[:12]}) but "
            f"the packer wrote {batch.bytes} (sha256 {batch.file_sha256[:12]}): bodies are gone"
        )
    log.info("batch %s: rebuilt its file from Redis (%d bytes)", batch.id, rebuilt.bytes)
    return path


def _matches(path: Path, batch: Batch) -> bool:
    # A file of the right length is the packer's (files are renamed into place whole); the
    # digest is only checked when rebuilding, where bodies may have gone.
    try:
        return path.stat().st_size == batch.bytes
    except OSError:
        return False
