"""Pack: a full buffer into one batch file, timed in a fresh worker process.

Target: 50,000 requests of ~1 KB in <= 1.5 s, the packer's peak RSS <= 250 MB. Also measured:
10k and 50k requests of 0.5 KB and 2 KB (time, peak RSS, Redis CPU time per request).

The buffer is filled with ``submit_many`` (not timed). A fresh child runs the aggregator's
whole step, ``pack_due_buffers(ctx, force=True)``: the atomic claim, streaming the JSONL file
(fsynced, renamed) and recording the batch and its request rows in SQLite. Afterwards the
parent checks the file (exactly the submitted ids, each once), the SQL rows and that the buffer
is empty and the claim released.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path
from typing import Any

import orjson

from bench._common import median, sized_request
from bench.harness import (
    Bench,
    current_rss_mb,
    peak_rss_mb,
    redis_cpu_seconds,
    run_child,
    time_phases,
)
from bench.report import CaseResult

FILL_CHUNK = 5_000  # submit_many calls of this size keep the filler's own memory small
TARGET_SECONDS = 1.5
TARGET_RSS_MB = 250.0


def warm_up(ctx: Any, settings: Any) -> None:
    """Pack a 10-request batch of another model first, as a long-running worker already has.

    The first batch of a process also pays one-off costs (loading scripts, compiling SQL
    statements, opening the database) that are not packing's.
    """
    from producer import Producer
    from shared.redis_layout import buffer_name
    from shared.schemas import DEFAULT_PROVIDER
    from worker import packing

    producer = Producer(settings=settings, client=ctx.redis)
    producer.submit_many([{**sized_request(500), "model": "warm-up"}] * 10)
    packing.pack_buffer(ctx, buffer_name(DEFAULT_PROVIDER, "warm-up"), force=True)


def pack_in_child(config: dict[str, Any]) -> dict[str, Any]:
    """Pack the buffer in this fresh process and describe what came out (runs in the child)."""
    from shared.settings import Settings
    from worker import packing
    from worker.context import WorkerContext

    settings = Settings.load(**config["settings"])
    ctx = WorkerContext.create(settings)
    try:
        warm_up(ctx, settings)
        rss_before = current_rss_mb()
        phases: dict[str, float] = {}
        time_phases(phases, packing, ("write_batch_file", "upsert_requests"))
        redis_before = redis_cpu_seconds(ctx.redis)
        started, cpu = time.perf_counter(), time.process_time()
        packed = packing.pack_due_buffers(ctx, force=True)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        return {
            "seconds": seconds,
            "cpu_seconds": cpu,
            "redis_cpu_seconds": redis_cpu_seconds(ctx.redis) - redis_before,
            "file_seconds": phases.get("write_batch_file"),
            "sql_rows_seconds": phases.get("upsert_requests"),
            "rss_before_mb": rss_before,
            "peak_rss_mb": peak_rss_mb(),
            "batches": [
                {"id": b.id, "count": b.request_count, "bytes": b.bytes, "path": str(b.path)}
                for b in packed
            ],
        }
    finally:
        ctx.close()


def fill(bench: Bench, overrides: dict[str, Any], n: int, size: int) -> set[str]:
    """Submit ``n`` distinct requests of ``size`` bytes into one buffer; return their ids."""
    from producer import Producer
    from shared.settings import Settings

    ids: set[str] = set()
    with Producer(settings=Settings.load(**overrides)) as producer:
        for start in range(0, n, FILL_CHUNK):
            chunk = [sized_request(size, i) for i in range(start, min(n, start + FILL_CHUNK))]
            ids.update(h.id for h in producer.submit_many(chunk))
    return ids


def verify(bench: Bench, report: dict[str, Any], ids: set[str], data_dir: Path) -> None:
    """Check the file, the SQL record and Redis against what was submitted."""
    from shared.redis_layout import Keys, buffer_name
    from shared.schemas import DEFAULT_PROVIDER

    # 50,000 x 2 KB is more than the 100 MB a batch may hold: the packer splits it.
    batches = report["batches"]
    if sum(b["count"] for b in batches) != len(ids):
        raise AssertionError(f"expected batches of {len(ids)} requests in all, got {batches}")
    seen: set[str] = set()
    for batch in batches:
        path = Path(batch["path"])
        if path.stat().st_size != batch["bytes"]:
            raise AssertionError(f"{path}: {path.stat().st_size} bytes, recorded {batch['bytes']}")
        with path.open("rb") as file:
            for number, raw in enumerate(file, start=1):
                custom_id = orjson.loads(raw)["custom_id"]
                if custom_id not in ids or custom_id in seen:
                    raise AssertionError(f"line {number}: unexpected or repeated id {custom_id!r}")
                seen.add(custom_id)
        path.unlink()
    if seen != ids:
        raise AssertionError(f"the files have {len(seen)} ids for {len(ids)} submitted requests")
    with contextlib.closing(sqlite3.connect(data_dir / "batchbridge.sqlite3")) as db:
        marks = ",".join("?" * len(batches))
        query = f"SELECT COUNT(*) FROM requests WHERE batch_id IN ({marks})"
        (rows,) = db.execute(query, [b["id"] for b in batches])
    if rows[0] != len(ids):
        raise AssertionError(f"SQL has {rows[0]} request rows for {len(ids)} requests")
    keys = Keys(bench.settings(data_dir).key_prefix)
    model = sized_request(500)["model"]
    with bench.client() as client:
        left = client.llen(keys.pending(buffer_name(DEFAULT_PROVIDER, model)))
        claims = client.zcard(keys.claims)
    if left or claims:
        raise AssertionError(f"after packing: {left} requests still pending, {claims} claims")


def pack_once(bench: Bench, n: int, size: int, run: int) -> dict[str, Any]:
    """Fill, pack in a child, verify; the child's report."""
    bench.flush()
    data_dir = bench.data_dir(f"pack-{n}-{size}-{run}")
    overrides = bench.settings_overrides(data_dir)
    ids = fill(bench, overrides, n, size)
    report = run_child("bench.cases.pack:pack_in_child", {"settings": overrides})
    verify(bench, report, ids, data_dir)
    return report


def run(bench: Bench) -> CaseResult:
    """The target configuration three times, then the size matrix once each."""
    result = CaseResult("pack")
    big, small = bench.size(50_000, 2_000), bench.size(10_000, 500)
    runs = [pack_once(bench, big, 1000, i) for i in range(bench.size(3, 1))]
    seconds = median([r["seconds"] for r in runs])
    peak = median([r["peak_rss_mb"] for r in runs])
    label = f"{big:,} x 1 KB"
    result.target(f"pack {label}", seconds, TARGET_SECONDS, "max", "s")
    result.target(f"packer peak RSS, {label}", peak, TARGET_RSS_MB, "max", "MB")
    result.data["target_runs"] = runs
    for n in (small, big):
        for size in (500, 2000):
            r = pack_once(bench, n, size, 0)
            result.measure(
                f"pack {n:,} x {size / 1000:.1f} KB",
                r["seconds"],
                "s",
                better="lower",
                detail=f"{n / r['seconds']:,.0f} req/s, {len(r['batches'])} batch file(s); "
                f"file {r['file_seconds']:.2f} s, SQL rows "
                f"{r['sql_rows_seconds']:.2f} s; peak RSS {r['peak_rss_mb']:.0f} MB; Redis CPU "
                f"{r['redis_cpu_seconds'] / n * 1e6:.1f} us/req",
            )
            result.data[f"{n}x{size}"] = r
    result.measure(
        f"pack {label} (median of {len(runs)})",
        seconds,
        "s",
        better="lower",
        detail=f"peak RSS {peak:.0f} MB; Redis CPU "
        f"{median([r['redis_cpu_seconds'] for r in runs]) / big * 1e6:.1f} us/req",
    )
    return result
