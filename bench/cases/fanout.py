"""Fan-out: collecting a finished 50,000-request batch (5% error lines) onto callback streams.

Set-up, untimed: the parent submits N requests spread over four callback queues; a child
packs them (after a small warm-up batch), another child uploads both batches to the local
provider, runs their jobs with a 5% failing-line rate and polls them to COLLECTING, so the
output and error files exist. Timed, in a fresh child: ``collect_ready_batches``, what the
collect task runs: download both files, read every line, deliver each result with
``finish.lua`` and record it in SQL. The parent then checks the streams: exactly N entries,
one per submitted request, as many failures as the error file has lines.

The child helpers (pack, run the jobs, collect, trace the memory peak) are also used by the
memory case.
"""

from __future__ import annotations

import contextlib
import cProfile
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from bench._common import chat_request
from bench.harness import (
    Bench,
    current_rss_mb,
    peak_rss_mb,
    redis_cpu_seconds,
    run_child,
    time_phases,
)
from bench.profiling import PeakTracer, profile_report, time_scripts
from bench.report import CaseResult

FULL, SMOKE = 50_000, 2_000
FILL_CHUNK = 5_000  # submit_many calls of this size keep the filler's own memory small
LINE_ERROR_RATE = 0.05
FAULT_SEED = 20_240_601  # the same lines fail in every run
QUEUES = tuple(f"fanout-{i}" for i in range(4))  # several services' queues, as in production
WARM_MODEL = "warm-up"
WARM_QUEUE = "warm-up"
TARGET_SECONDS = 2.0
TARGET_RSS_MB = 250.0


def run(bench: Bench) -> CaseResult:
    """Collect one N-request batch (95% output lines, 5% error lines) onto callback queues."""
    result = CaseResult("fanout")
    n = bench.size(FULL, SMOKE)
    bench.flush()
    data_dir = bench.data_dir("fanout")
    # The injected line errors are retryable (rate_limit): with attempts left the collector
    # would send them round again instead of delivering them. One attempt makes every error
    # line a delivered failure, which is the fan-out being measured.
    overrides = bench.settings_overrides(data_dir, max_attempts=1)
    ids = fill(bench, overrides, fanout_requests(n))
    packed = run_child("bench.cases.fanout:pack_child", {"settings": overrides})
    jobs = run_child(
        "bench.cases.fanout:run_jobs_child",
        {"settings": overrides, "line_error_rate": LINE_ERROR_RATE, "seed": FAULT_SEED},
    )
    main_id = packed["batches"][0]["id"]
    files = jobs["batches"][main_id]
    collected = run_child(
        "bench.cases.fanout:collect_child",
        {
            "settings": overrides,
            "batch_id": main_id,
            "warm_batch_id": packed["warm_batch_id"],
            "profile": bool(os.environ.get("BATCHBRIDGE_BENCH_PROFILE")),
        },
    )
    counts = verify_streams(bench, overrides, QUEUES, ids)
    check_batch(data_dir, main_id, completed=counts["completed"], failed=counts["failed"])
    if counts["failed"] != files["error_lines"] or counts["completed"] != files["output_lines"]:
        raise AssertionError(f"streams hold {dict(counts)}, the provider's files {files}")
    failed_share = counts["failed"] / n
    if not 0.03 <= failed_share <= 0.07:
        raise AssertionError(f"{failed_share:.1%} of the results failed, expected about 5%")

    seconds, peak = collected["seconds"], collected["peak_rss_mb"]
    per_s = n / seconds if seconds else 0.0
    label = f"fan-out {n // 1000}k"
    result.measure(
        label,
        seconds,
        "s",
        better="lower",
        detail=f"{n:,} results ({failed_share:.1%} failed) onto {len(QUEUES)} queues, "
        f"{per_s:,.0f}/s; {describe_phases(collected)}",
    )
    result.measure(
        "collector peak RSS",
        peak,
        "MB",
        better="lower",
        detail=f"{collected['rss_before_mb']:.0f} MB before collecting",
    )
    result.measure(
        "Redis CPU while collecting",
        collected["redis_cpu_seconds"],
        "s",
        better="lower",
        detail="INFO cpu of the bench Redis (shared with nothing else during the step)",
    )
    result.target(label, seconds, TARGET_SECONDS, "max", "s")
    result.target("fan-out collector peak RSS", peak, TARGET_RSS_MB, "max", "MB")
    result.notes.append(
        f"output file {files['output_bytes'] / 1e6:.1f} MB ({files['output_lines']:,} lines), "
        f"error file {files['error_bytes'] / 1e6:.2f} MB ({files['error_lines']:,} lines); "
        "max_attempts=1 so the injected (retryable) line errors are delivered, not requeued"
    )
    result.data = {"requests": n, "packed": packed, "jobs": jobs, "collect": collected}
    bench.flush()
    return result


def fanout_requests(n: int) -> Iterator[dict[str, Any]]:
    """N ~0.5 KB chat requests with a callback queue each and a little metadata."""
    for i in range(n):
        yield {**chat_request(i), "callback_queue": QUEUES[i % len(QUEUES)], "metadata": {"n": i}}


def fill(bench: Bench, overrides: dict[str, Any], requests: Iterator[dict[str, Any]]) -> set[str]:
    """Submit ``requests`` with submit_many, a chunk at a time; return their ids."""
    from producer import Producer
    from shared.settings import Settings

    ids: set[str] = set()
    with bench.client() as client:
        producer = Producer(settings=Settings.load(**overrides), client=client)
        chunk: list[dict[str, Any]] = []
        for request in requests:
            chunk.append(request)
            if len(chunk) == FILL_CHUNK:
                ids.update(h.id for h in producer.submit_many(chunk))
                chunk = []
        if chunk:
            ids.update(h.id for h in producer.submit_many(chunk))
    return ids


def verify_streams(
    bench: Bench, overrides: dict[str, Any], queues: tuple[str, ...], ids: set[str]
) -> Counter[str]:
    """Check the queues hold exactly one result per id (by XLEN too); count them by status."""
    from shared.redis_layout import Keys
    from shared.settings import Settings

    keys = Keys(Settings.load(**overrides).key_prefix)
    statuses: Counter[str] = Counter()
    seen: set[str] = set()
    with bench.client() as client:
        total = sum(int(client.xlen(keys.callback(q))) for q in queues)
        if total != len(ids):
            raise AssertionError(f"XLEN: {total} entries on {queues}, {len(ids)} requests")
        for queue in queues:
            # Read in pages, so 50,000 results never sit in the parent's memory at once.
            start = "-"
            while entries := client.xrange(keys.callback(queue), start, "+", count=5_000):
                for _entry_id, fields in entries:
                    result = orjson.loads(fields[b"result"])
                    request_id = result["request_id"]
                    if request_id not in ids or request_id in seen:
                        raise AssertionError(f"unexpected or repeated result for {request_id}")
                    seen.add(request_id)
                    statuses[result["status"]] += 1
                start = "(" + entries[-1][0].decode()
    if seen != ids:
        raise AssertionError(f"{len(ids) - len(seen)} requests have no result on the streams")
    return statuses


def check_batch(data_dir: Path, batch_id: str, *, completed: int, failed: int) -> None:
    """The record says the batch FINISHED with these counts."""
    with contextlib.closing(sqlite3.connect(data_dir / "batchbridge.sqlite3")) as db:
        row = db.execute(
            "SELECT state, completed_count, failed_count FROM batches WHERE id = ?", (batch_id,)
        ).fetchone()
    if row != ("finished", completed, failed):
        raise AssertionError(f"batch {batch_id} is {row}, expected finished/{completed}/{failed}")


RECORDER = "recorder thread, beside them: "


def describe_phases(collected: dict[str, Any]) -> str:
    """Where the collection time went (steps of 5 ms or more), for the table's notes column."""
    phases = {k: v for k, v in collected["phases"].items() if v >= 0.005}
    own = sorted(
        ((k, v) for k, v in phases.items() if not k.startswith(RECORDER)),
        key=lambda item: item[1],
        reverse=True,
    )
    beside = [(k.removeprefix(RECORDER), v) for k, v in phases.items() if k.startswith(RECORDER)]
    text = "; ".join(f"{name} {seconds:.2f} s" for name, seconds in own)
    if beside:
        text += "; " + RECORDER + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in beside)
    return text


# --- what runs in the child processes ------------------------------------------------------


def _context(config: dict[str, Any]) -> Any:
    from shared.settings import Settings
    from worker.context import WorkerContext

    return WorkerContext.create(Settings.load(**config["settings"]))


def pack_child(config: dict[str, Any]) -> dict[str, Any]:
    """Pack a warm-up batch, then measure packing every buffer (``trace``: with tracemalloc)."""
    from producer import Producer
    from shared.redis_layout import buffer_name
    from shared.schemas import DEFAULT_PROVIDER
    from worker import packing

    ctx = _context(config)
    try:
        # A worker packs many batches in one process; the first also pays one-off costs
        # (script loading, SQL statement compilation, opening the database) that are not
        # packing's, so a 10-request batch of another model goes first.
        producer = Producer(settings=ctx.settings, client=ctx.redis)
        producer.submit_many(
            [
                {**chat_request(i), "model": WARM_MODEL, "callback_queue": WARM_QUEUE}
                for i in range(10)
            ]
        )
        warm = packing.pack_buffer(ctx, buffer_name(DEFAULT_PROVIDER, WARM_MODEL), force=True)
        assert warm is not None
        rss_before = current_rss_mb()
        tracer = PeakTracer() if config.get("trace") else None
        started = time.perf_counter()
        with tracer or contextlib.nullcontext():
            packed = packing.pack_due_buffers(ctx, force=True)
        seconds = time.perf_counter() - started
        return {
            "seconds": seconds,
            "rss_before_mb": rss_before,
            "peak_rss_mb": peak_rss_mb(),
            "warm_batch_id": warm.id,
            "batches": [
                {"id": b.id, "count": b.request_count, "bytes": b.bytes, "path": str(b.path)}
                for b in packed
            ],
            "trace": tracer.report() if tracer else None,
        }
    finally:
        ctx.close()


def run_jobs_child(config: dict[str, Any]) -> dict[str, Any]:
    """Upload the packed batches, run their local jobs with failing lines, poll them done."""
    from sqlmodel import select

    from shared.db import poll_now
    from shared.models import Batch
    from shared.providers.local import LocalProvider, get_engine, run_job
    from shared.providers.local.faults import Faults
    from worker.lifecycle import submit_ready_batches
    from worker.polling import poll_due_batches

    ctx = _context(config)
    try:
        submitted = submit_ready_batches(ctx)
        provider = ctx.provider("local")
        assert isinstance(provider, LocalProvider)
        faults = Faults(line_error_rate=config["line_error_rate"], seed=config["seed"])
        started, cpu = time.perf_counter(), time.process_time()
        for job in provider.store.list_jobs():
            if not job.is_terminal:
                # What the worker's local-run task does, called directly: no Celery here.
                run_job(
                    provider.store, job.id, get_engine(ctx.settings.local_engine), faults=faults
                )
                with ctx.session() as session:
                    poll_now(session, job.id, ctx.now())
                    session.commit()
        run_seconds, run_cpu = time.perf_counter() - started, time.process_time() - cpu
        finished = poll_due_batches(ctx)
        if sorted(finished) != sorted(submitted):
            raise AssertionError(f"submitted {submitted}, the provider finished {finished}")
        batches: dict[str, Any] = {}
        with ctx.session() as session:
            for batch in session.exec(select(Batch)):
                if batch.id not in finished:
                    continue
                out = provider.store.file_path(batch.output_file_id or "")
                err = provider.store.file_path(batch.error_file_id or "")
                batches[batch.id] = {
                    "state": batch.state,
                    "output_bytes": out.stat().st_size,
                    "error_bytes": err.stat().st_size,
                    "output_lines": _count_lines(out),
                    "error_lines": _count_lines(err),
                }
        lines = sum(b["output_lines"] + b["error_lines"] for b in batches.values())
        return {
            "run_seconds": run_seconds,
            # The provider's share of a request: what the echo engine's jobs cost per line.
            "run_cpu_seconds": run_cpu,
            "lines": lines,
            "batches": batches,
        }
    finally:
        ctx.close()


def _count_lines(path: Path) -> int:
    count = 0
    with path.open("rb") as file:
        while block := file.read(1 << 20):
            count += block.count(b"\n")
    return count


def collect_child(config: dict[str, Any]) -> dict[str, Any]:
    """Collect a warm-up batch, then measure ``collect_ready_batches`` on the real one."""
    from worker import collection, fan_out

    ctx = _context(config)
    try:
        # Loads the scripts, compiles the SQL and opens the database, as a worker that has
        # collected before already has; its results go to a queue of their own.
        if not collection.collect_batch(ctx, config["warm_batch_id"]):
            raise AssertionError("the warm-up batch could not be collected")
        raw: dict[str, float] = {}
        provider = ctx.provider(ctx.settings.default_provider)
        time_phases(raw, provider, ("download_file",), "download")
        time_phases(raw, fan_out.FanOut, ("flush",), "flush")
        time_phases(raw, fan_out.FanOut, ("_encoded",), "encode")
        time_phases(raw, fan_out.FanOut, ("_record",), "record")
        time_phases(raw, fan_out, ("finish_requests",), "sql update")
        time_phases(raw, collection, ("_finish_batch",), "finish batch")
        time_phases(raw, collection, ("delete_provider_files",), "delete files")
        time_scripts(raw, ctx.scripts)
        rss_before = current_rss_mb()
        tracer = PeakTracer() if config.get("trace") else None
        profiler = cProfile.Profile() if config.get("profile") else None
        redis_cpu = redis_cpu_seconds(ctx.redis)
        started, cpu = time.perf_counter(), time.process_time()
        with tracer or contextlib.nullcontext(), profiler or contextlib.nullcontext():
            collected = collection.collect_ready_batches(ctx)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        redis_cpu = redis_cpu_seconds(ctx.redis) - redis_cpu
        if collected != [config["batch_id"]]:
            raise AssertionError(f"collected {collected}, expected [{config['batch_id']}]")
        return {
            "seconds": seconds,
            "cpu_seconds": cpu,
            "redis_cpu_seconds": redis_cpu,
            "phases": collect_phases(raw, seconds),
            "raw_phases": raw,
            "rss_before_mb": rss_before,
            "peak_rss_mb": peak_rss_mb(),
            "trace": tracer.report() if tracer else None,
            "profile": profile_report(profiler) if profiler else None,
        }
    finally:
        ctx.close()


def collect_phases(raw: dict[str, float], seconds: float) -> dict[str, float]:
    """The collector's own steps, which add up to ``seconds``, then the recorder thread's."""
    # Each chunk of results is one ``flush``: reading meta/cx of its requests, encoding the
    # results, sending ``finish.lua`` and reading the previous chunk's reply, and waiting
    # for the recorder thread to be done with that chunk, whose SQL UPDATE and commit
    # (``_record``) run beside the next chunk's reading. Whatever is outside the flushes and
    # the file calls is reading and parsing the result lines.
    flush, record, sql = raw.get("flush", 0.0), raw.get("record", 0.0), raw.get("sql update", 0.0)
    fields, encode = raw.get("script:request_fields", 0.0), raw.get("encode", 0.0)
    outside = sum(raw.get(k, 0.0) for k in ("download", "finish batch", "delete files"))
    return {
        "read + parse lines": seconds - flush - outside,
        "read meta/cx": fields,
        "encode results": encode,
        "deliver (finish.lua) + wait for the recorder": flush - fields - encode,
        "download": raw.get("download", 0.0),
        "finish batch + delete files": raw.get("finish batch", 0.0) + raw.get("delete files", 0.0),
        RECORDER + "SQL UPDATE": sql,
        RECORDER + "SQL commit": record - sql,
    }
