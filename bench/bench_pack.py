"""How long the aggregator takes to pack a full buffer, and how much memory it needs to do it.

Target: packing 50,000 requests of ~1 KB into one batch file takes <= 1.5 s, with the worker's
peak RSS <= 250 MB.

The buffer is filled with ``Producer.submit_many`` (not timed). A fresh child process then runs
the aggregator's whole step, ``pack_due_buffers(ctx, force=True)``: the atomic claim, streaming
the JSONL file (fsynced and renamed) and recording the batch and its 50,000 request rows in
SQLite. Running it in a child makes the peak RSS the packer's own rather than the filler's.
Afterwards the parent checks the output: one file of 50,000 valid JSON lines whose custom_ids are
exactly the submitted request ids, 50,000 rows in SQL, an empty buffer and a released claim.
This runs three times (refilling the buffer); the verdict uses the medians.

Run it with ``make bench`` (or ``.venv/bin/python bench/bench_pack.py``). It starts a private
redis-server unless ``BATCHBRIDGE_BENCH_REDIS_URL`` is set, in which case that database is
FLUSHDB-ed. Numbers go to ``bench/results/pack.json``; the exit code is 1 when a target is
missed. ``--profile`` prints the child's cProfile of the packing step instead of judging it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from _common import (
    MODEL,
    bench_redis,
    chat_request,
    environment,
    flush_stdout,
    median,
    table,
    verdict,
    write_results,
)

REQUESTS = 50_000
FILL_CHUNK = 5_000  # submit_many calls of this size keep the filler's own memory small
TARGET_SECONDS = 1.5
TARGET_RSS_MB = 250.0


def settings_overrides(redis_url: str, data_dir: str) -> dict[str, Any]:
    """The settings both processes use: one 50,000-request batch fits the byte limit."""
    return {
        "redis_url": redis_url,
        "data_dir": data_dir,
        # Explicit, so a BATCHBRIDGE_DATABASE_URL in the environment cannot redirect the run.
        "database_url": f"sqlite:///{Path(data_dir) / 'batchbridge.sqlite3'}",
        "max_batch_requests": REQUESTS,
        "max_batch_bytes": 100_000_000,
        "provider": "local",
    }


def proc_status_mb(field: str) -> float | None:
    """A memory figure (``VmRSS``, ``VmHWM``) of this process from /proc, in MB; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak resident set since it started, in MB.

    VmHWM belongs to the current address space, whereas ru_maxrss can carry over the
    parent's high-water mark from before exec.
    """
    peak = proc_status_mb("VmHWM")
    if peak is not None:
        return peak
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / (1024 * 1024) if sys.platform == "darwin" else maxrss / 1024


def current_rss_mb() -> float:
    """This process's resident set now, in MB (the peak so far where /proc is missing)."""
    rss = proc_status_mb("VmRSS")
    return peak_rss_mb() if rss is None else rss


def time_phases(module: Any, names: tuple[str, ...]) -> dict[str, float]:
    """Accumulate the seconds spent in ``module``'s functions ``names`` while it runs.

    The packer calls them by their module-level names, so wrapping them there splits its
    time into phases without touching its code; a renamed function is simply not timed.
    """
    spent: dict[str, float] = {}
    for name in names:
        original = getattr(module, name, None)
        if original is None:
            continue

        def timed(*args: Any, _fn: Any = original, _name: str = name, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return _fn(*args, **kwargs)
            finally:
                spent[_name] = spent.get(_name, 0.0) + time.perf_counter() - started

        setattr(module, name, timed)
    return spent


def warm_up(ctx: Any, settings: Any) -> None:
    """Pack a 10-request batch of another model first, as a long-running worker already has.

    A worker packs many batches in one process; the first one also pays one-off costs (script
    loading, SQL statement compilation, opening the database) that are not packing's.
    """
    from producer import Producer
    from shared.redis_layout import buffer_name
    from shared.schemas import DEFAULT_PROVIDER
    from worker import packing

    producer = Producer(settings=settings, client=ctx.redis)
    producer.submit_many([{**chat_request(), "model": "warm-up"}] * 10)
    packing.pack_buffer(ctx, buffer_name(DEFAULT_PROVIDER, "warm-up"), force=True)


def child(config: dict[str, Any]) -> dict[str, Any]:
    """Pack the buffer in this fresh process and describe what came out."""
    # Imported here, not at the top, so the parent (the filler) does not pay for them.
    from shared.settings import Settings
    from worker import packing
    from worker.context import WorkerContext

    settings = Settings.load(**config["settings"])
    ctx = WorkerContext.create(settings)
    try:
        warm_up(ctx, settings)
        rss_before = current_rss_mb()
        peak_before = peak_rss_mb()
        if config["profile"]:
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            started = time.perf_counter()
            profiler.runcall(packing.pack_due_buffers, ctx, force=True)
            seconds = time.perf_counter() - started
            pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(30)
            pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(20)
            return {"seconds": seconds}
        phases = time_phases(packing, ("write_batch_file", "upsert_requests"))
        started, cpu = time.perf_counter(), time.process_time()
        packed = packing.pack_due_buffers(ctx, force=True)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        return {
            "seconds": seconds,
            "cpu_seconds": cpu,
            "file_seconds": phases.get("write_batch_file"),
            "sql_rows_seconds": phases.get("upsert_requests"),
            "rss_before_mb": rss_before,
            "peak_before_mb": peak_before,
            "peak_rss_mb": peak_rss_mb(),
            "batches": [
                {"id": b.id, "count": b.request_count, "bytes": b.bytes, "path": str(b.path)}
                for b in packed
            ],
        }
    finally:
        ctx.close()


def fill(redis_url: str, data_dir: str) -> set[str]:
    """Submit 50,000 distinct ~1 KB requests into one buffer; return their ids."""
    from producer import Producer
    from shared.settings import Settings

    ids: set[str] = set()
    # The last chunk fills the buffer, so the producer also sends its aggregator wake-up over
    # Celery, as in production; no worker listens here and the next FLUSHDB drops it.
    with Producer(settings=Settings.load(**settings_overrides(redis_url, data_dir))) as producer:
        for start in range(0, REQUESTS, FILL_CHUNK):
            batch = [chat_request(n) for n in range(start, start + FILL_CHUNK)]
            ids.update(h.id for h in producer.submit_many(batch))
    return ids


def run_child(redis_url: str, data_dir: str, profile: bool) -> dict[str, Any]:
    """Run :func:`child` in a new interpreter and return its report."""
    config = {"settings": settings_overrides(redis_url, data_dir), "profile": profile}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child"],
        input=json.dumps(config),
        capture_output=True,
        text=True,
        check=False,
    )
    if profile:
        sys.stdout.write(proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"packing child failed ({proc.returncode}):\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def verify(result: dict[str, Any], ids: set[str], data_dir: str, redis_url: str) -> int:
    """Check the file, the SQL record and Redis; return the number of lines in the file."""
    from redis import Redis

    from shared.redis_layout import Keys, buffer_name
    from shared.schemas import DEFAULT_PROVIDER
    from shared.settings import Settings

    batches = result["batches"]
    if len(batches) != 1 or batches[0]["count"] != REQUESTS:
        raise AssertionError(f"expected one batch of {REQUESTS} requests, got {batches}")
    batch = batches[0]
    path = Path(batch["path"])
    if path.stat().st_size != batch["bytes"]:
        raise AssertionError(f"{path} has {path.stat().st_size} bytes, recorded {batch['bytes']}")
    seen: set[str] = set()
    lines = 0
    with path.open("rb") as file:
        for lines, raw in enumerate(file, start=1):
            line = orjson.loads(raw)
            custom_id = line["custom_id"]
            if custom_id not in ids or custom_id in seen:
                raise AssertionError(f"line {lines}: unexpected or repeated id {custom_id!r}")
            if line["body"]["model"] != MODEL or not line["body"]["messages"]:
                raise AssertionError(f"line {lines}: body is not the submitted request")
            seen.add(custom_id)
    if lines != REQUESTS or seen != ids:
        raise AssertionError(f"{path} has {lines} lines for {len(ids)} submitted requests")

    with contextlib.closing(sqlite3.connect(Path(data_dir) / "batchbridge.sqlite3")) as db:
        (rows,) = db.execute("SELECT COUNT(*) FROM requests WHERE batch_id = ?", (batch["id"],))
        (recorded,) = db.execute("SELECT request_count FROM batches WHERE id = ?", (batch["id"],))
    if rows[0] != REQUESTS or recorded[0] != REQUESTS:
        raise AssertionError(f"SQL has {rows[0]} request rows, batch says {recorded[0]}")

    keys = Keys(Settings.load(**settings_overrides(redis_url, data_dir)).key_prefix)
    client = Redis.from_url(redis_url)
    try:
        left = client.zcard(keys.pending(buffer_name(DEFAULT_PROVIDER, MODEL)))
        claims = client.zcard(keys.claims)
    finally:
        client.close()
    if left or claims:
        raise AssertionError(f"after packing: {left} requests still pending, {claims} claims")
    path.unlink()
    return lines


def rest_seconds(result: dict[str, Any]) -> float | None:
    """Packing time outside the file and the request rows: claim, batch row, commit, release."""
    known = [result["file_seconds"], result["sql_rows_seconds"]]
    return None if None in known else result["seconds"] - sum(known)


def describe(run: dict[str, Any]) -> list[str]:
    """One table row: the phases, then the output and the memory (before -> peak)."""

    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    return [
        seconds(run["seconds"]),
        seconds(run["file_seconds"]),
        seconds(run["sql_rows_seconds"]),
        seconds(run["rest_seconds"]),
        seconds(run["cpu_seconds"]),
        f"{run['file_bytes'] / 1e6:.1f}",
        f"{run['lines']:,.0f}",
        f"{run['rss_before_mb']:.0f} -> {run['peak_rss_mb']:.0f}",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="fill-and-pack repetitions")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of one pack")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.load(sys.stdin))))
        return 0

    from redis import Redis

    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    with bench_redis() as url, tempfile.TemporaryDirectory(prefix="bb-bench-") as data_dir:
        client = Redis.from_url(url)
        env = environment(client)
        for i in range(1 if args.profile else args.runs):
            client.flushdb()
            fill_started = time.perf_counter()
            ids = fill(url, data_dir)
            fill_s = time.perf_counter() - fill_started
            result = run_child(url, data_dir, args.profile)
            if args.profile:
                print(f"packing under the profiler: {result['seconds']:.2f} s")
                return 0
            lines = verify(result, ids, data_dir, url)
            run = {
                "seconds": result["seconds"],
                "cpu_seconds": result["cpu_seconds"],
                "file_seconds": result["file_seconds"],
                "sql_rows_seconds": result["sql_rows_seconds"],
                "rest_seconds": rest_seconds(result),
                "file_bytes": result["batches"][0]["bytes"],
                "lines": lines,
                "rss_before_mb": result["rss_before_mb"],
                "peak_before_mb": result["peak_before_mb"],
                "peak_rss_mb": result["peak_rss_mb"],
                "fill_seconds": fill_s,
            }
            runs.append(run)
            print(f"run {i + 1}: {run['seconds']:.2f} s (fill {fill_s:.1f} s, not timed)")
            flush_stdout()
        client.flushdb()
        client.close()

    seconds = median([r["seconds"] for r in runs])
    peak = median([r["peak_rss_mb"] for r in runs])
    before = median([r["rss_before_mb"] for r in runs])
    rows = [[str(i + 1), *describe(r)] for i, r in enumerate(runs)]
    medians = {k: median([r[k] for r in runs]) for k in runs[0] if runs[0][k] is not None}
    print(
        table(
            ["run", "pack s", "file s", "SQL rows s", "rest s", "CPU s", "MB", "lines", "RSS MB"],
            [*rows, ["median", *describe({**dict.fromkeys(runs[0]), **medians})]],
        )
    )
    print(
        "file: read the claimed requests from Redis, write and fsync the JSONL\n"
        "SQL rows: upsert_requests; rest: claim script, batch row, commit, release"
    )
    verdicts = [
        verdict(
            "pack 50,000 x ~1 KB",
            seconds <= TARGET_SECONDS,
            f"median {seconds:.2f} s (target <= {TARGET_SECONDS} s, {len(runs)} runs)",
        ),
        verdict(
            "packer peak RSS",
            peak <= TARGET_RSS_MB,
            f"median {peak:.0f} MB (target <= {TARGET_RSS_MB:.0f} MB; {before:.0f} MB before)",
        ),
    ]
    print("\n".join(verdicts))
    elapsed = time.perf_counter() - started
    print(f"({elapsed:.1f} s)")
    path = write_results(
        "pack",
        {
            "environment": env,
            "requests": REQUESTS,
            "elapsed_s": elapsed,
            "median_seconds": seconds,
            "median_peak_rss_mb": peak,
            "median_rss_before_mb": before,
            "target_seconds": TARGET_SECONDS,
            "target_rss_mb": TARGET_RSS_MB,
            "passed": all(v.startswith("PASS") for v in verdicts),
            "runs": runs,
        },
    )
    print(f"results: {path}")
    return 0 if all(v.startswith("PASS") for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
