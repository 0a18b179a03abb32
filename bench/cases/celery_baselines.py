"""Baselines a user would pick instead: one Celery message per request, and celery-batches.

* :func:`send_task_rate`: a producer enqueuing one ``send_task`` message per request;
* :func:`celery_batches_rate`: the same messages consumed by a real worker whose
  ``celery_batches.Batches`` task writes each flushed batch as Batch API JSONL (enqueue + pack).

Both run on the bench Redis, in a database of their own (``broker_db``, 1 by default) so a
FLUSHDB of the bench database cannot pull the broker's keys away mid-run; every key they create
there is deleted afterwards.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import orjson
from celery import Celery
from redis import Redis

from bench._common import chat_request, sized_request
from bench.harness import ROOT, redis_cpu_seconds
from shared.parent_death import die_with_parent

TASK_NAME = "bench.llm_request"
APP_MODULE = "bench.cases.celery_batches_app"

# What celery_batches_rate hands the worker subprocess (read by APP_MODULE at import).
ENV_BROKER_URL = "BENCH_CELERY_BROKER_URL"
ENV_QUEUE = "BENCH_CELERY_QUEUE"
ENV_OUT_DIR = "BENCH_CELERY_OUT_DIR"
ENV_READY_FILE = "BENCH_CELERY_READY_FILE"
ENV_FLUSH_EVERY = "BENCH_CELERY_FLUSH_EVERY"
ENV_FLUSH_INTERVAL = "BENCH_CELERY_FLUSH_INTERVAL"
READY_FILE_NAME = "worker.ready"

# A chat request given as its dict, its body JSON, or a size in KB (a sized_request).
RequestLike = dict[str, Any] | bytes | float
Pool = Literal["solo", "prefork"]

_POLL_S = 0.01  # how often the clock looks for new JSONL files: 10 ms against a run of seconds
_READY_TIMEOUT_S = 60.0


def batch_file_name(pid: int, seq: int) -> str:
    """The name of the worker's ``seq``-th JSONL file (the measuring side globs ``*.jsonl``)."""
    return f"batch-{pid}-{seq:06d}.jsonl"


def request_of_kb(kb: float) -> dict[str, Any]:
    """A chat request whose body JSON is about ``kb`` KB (1 KB = 1,000 bytes, as the cases)."""
    return sized_request(round(kb * 1000))


def as_request(request: RequestLike | None) -> dict[str, Any]:
    """The request dict of a :data:`RequestLike` (``None`` is ``chat_request(0)``)."""
    if request is None:
        return chat_request(0)
    if isinstance(request, bytes):
        # Decoded before the clock: a Celery producer is handed the dict, as ours is.
        decoded: dict[str, Any] = orjson.loads(request)
        return decoded
    if isinstance(request, int | float):
        return request_of_kb(float(request))
    return request


def broker_url(redis_url: str, db: int | None) -> str:
    """``redis_url`` pointed at database ``db`` (unchanged when ``db`` is None)."""
    if db is None:
        return redis_url
    parts = urlsplit(redis_url)
    return urlunsplit(parts._replace(path=f"/{db}"))


def producer_app(broker: str, queue: str) -> Celery:
    """The Celery app a producer would build: only a broker, messages routed to ``queue``."""
    app = Celery("bench-producer", broker=broker)
    app.conf.update(
        task_default_queue=queue,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
    )
    return app


@contextlib.contextmanager
def removing_new_keys(client: Redis) -> Iterator[None]:
    """Delete, on the way out, every key of ``client``'s database that was not there before."""
    before = set(client.scan_iter(count=1000))
    try:
        yield
    finally:
        # Only what this run created: the database may hold someone else's broker keys.
        created = [key for key in client.scan_iter(count=1000) if key not in before]
        for i in range(0, len(created), 1000):
            client.delete(*created[i : i + 1000])


def _bodies(payload: RequestLike | Sequence[RequestLike] | None, n: int) -> list[dict[str, Any]]:
    """``n`` request dicts: one payload repeated, or a sequence of them cycled."""
    if payload is None or isinstance(payload, dict | bytes | int | float):
        # The same dict n times is fine: Celery serializes it anew for every message.
        return [as_request(payload)] * n
    distinct = [as_request(p) for p in payload]
    if not distinct:
        raise ValueError("no payloads")
    return [distinct[i % len(distinct)] for i in range(n)]


def _message_args(raw: bytes) -> list[Any]:
    """The task args inside one kombu Redis message (JSON envelope, base64 JSON body)."""
    envelope = orjson.loads(raw)
    body = base64.b64decode(envelope["body"])
    args, _kwargs, _embed = orjson.loads(body)
    result: list[Any] = args
    return result


def send_task_rate(
    redis_url: str,
    payload: RequestLike | Sequence[RequestLike] | None,
    n: int,
    *,
    broker_db: int | None = 1,
) -> dict[str, Any]:
    """Requests/s of a producer sending one ``send_task`` message per request to a Redis broker."""
    bodies = _bodies(payload, n)
    broker = broker_url(redis_url, broker_db)
    queue = f"bench.send_task.{uuid.uuid4().hex[:8]}"
    client = Redis.from_url(broker)
    app = producer_app(broker, queue)
    try:
        with removing_new_keys(client):
            # Untimed warm-up: the connection, the producer pool and the queue binding.
            app.send_task(TASK_NAME, args=[bodies[0]])
            client.delete(queue)
            gc.collect()
            cpu = time.process_time()
            started = time.perf_counter()
            for body in bodies:
                app.send_task(TASK_NAME, args=[body])
            seconds = time.perf_counter() - started
            cpu = time.process_time() - cpu
            # A producer that lost messages would look fast: count them, and read one back.
            queued = client.llen(queue)
            if queued != n:
                raise RuntimeError(f"send_task: {queued} messages in {queue}, expected {n}")
            newest = client.lindex(queue, 0)  # LPUSH: the last message sent is at the head
            if newest is None or _message_args(newest) != [bodies[-1]]:
                raise RuntimeError("send_task: the last message does not hold the request")
    finally:
        app.close()
        client.close()
    return {"rate": n / seconds, "seconds": seconds, "n": n, "producer_cpu_s": cpu}


def _proc_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc); None elsewhere."""
    try:
        # The command name (field 2) may hold spaces; the fields after its ")" do not.
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (fields 14 and 15)


def _log_tail(path: Path, chars: int = 3000) -> str:
    """The end of the worker's log, for an error message."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def _start_worker(
    broker: str, queue: str, workdir: Path, flush_every: int, flush_interval: float, pool: Pool
) -> tuple[subprocess.Popen[bytes], Path]:
    """Start the celery-batches worker; return it once it consumes, and the directory it fills."""
    out_dir = workdir / "batches"
    out_dir.mkdir(parents=True, exist_ok=True)
    ready = workdir / READY_FILE_NAME
    ready.unlink(missing_ok=True)
    log_path = workdir / "worker.log"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        ENV_BROKER_URL: broker,
        ENV_QUEUE: queue,
        ENV_OUT_DIR: str(out_dir),
        ENV_READY_FILE: str(ready),
        ENV_FLUSH_EVERY: str(flush_every),
        ENV_FLUSH_INTERVAL: str(flush_interval),
    }
    command = [
        *(sys.executable, "-m", "celery", "-A", APP_MODULE, "worker"),
        *("-P", pool, "-c", "1", "-Q", queue, "-n", f"{queue}@%h", "-l", "warning"),
        # 0 = no prefetch limit (celery-batches' advice); the CLI treats 0 as unset, so the
        # app's worker_prefetch_multiplier=0 is what actually applies it.
        "--prefetch-multiplier=0",
        # No cluster chatter: one worker, nothing to sync with, and a faster start.
        *("--without-gossip", "--without-mingle", "--without-heartbeat"),
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            # A group of its own, so stopping it also reaches prefork's pool processes.
            start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGTERM),
        )
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop_worker(proc)
            raise RuntimeError(f"celery-batches worker did not start:\n{_log_tail(log_path)}")
        time.sleep(0.05)
    return proc, out_dir


def _stop_worker(proc: subprocess.Popen[bytes]) -> None:
    """Stop the worker's process group: SIGTERM (warm shutdown), SIGKILL after 10 s."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # The pool processes of prefork may outlive the main one by a moment.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _wait_for_lines(
    out_dir: Path, n: int, proc: subprocess.Popen[bytes], deadline: float, log_path: Path
) -> int:
    """Block until the worker's JSONL files hold ``n`` lines; return how many they hold."""
    seen: set[str] = set()
    lines = 0
    while lines < n:
        # Files appear by rename and are never appended to: count each one once.
        for path in out_dir.glob("*.jsonl"):
            if path.name not in seen:
                seen.add(path.name)
                lines += path.read_bytes().count(b"\n")
        if lines >= n:
            break
        if proc.poll() is not None:
            raise RuntimeError(f"celery-batches worker died at {lines}/{n}:\n{_log_tail(log_path)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"celery-batches: {lines}/{n} lines before the timeout")
        time.sleep(_POLL_S)
    return lines


def _check_output(out_dir: Path, ids: list[str], bodies: list[dict[str, Any]]) -> tuple[int, int]:
    """Check the JSONL holds each sent request exactly once; return (lines, files)."""
    body_of = dict(zip(ids, bodies, strict=True))
    files = sorted(out_dir.glob("*.jsonl"))
    custom_ids: set[str] = set()
    lines = 0
    for path in files:
        for raw in path.read_bytes().splitlines():
            line = orjson.loads(raw)
            lines += 1
            custom_id = line["custom_id"]
            if custom_id in custom_ids:
                raise RuntimeError(f"celery-batches: custom_id {custom_id} written twice")
            custom_ids.add(custom_id)
            if body_of.get(custom_id) != line["body"] or line["url"] != "/v1/chat/completions":
                raise RuntimeError(f"celery-batches: line {custom_id} is not the request sent")
    if lines != len(ids) or custom_ids != body_of.keys():
        raise RuntimeError(f"celery-batches: {lines} lines for {len(ids)} requests")
    return lines, len(files)


def celery_batches_rate(
    redis_url: str,
    n: int,
    request: RequestLike | Sequence[RequestLike] | None,
    workdir: Path,
    *,
    flush_every: int = 1000,
    flush_interval: float = 1.0,
    pool: Pool = "solo",
    broker_db: int | None = 1,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Requests/s of celery-batches enqueue + pack: ``n`` sends until the JSONL holds n lines."""
    bodies = _bodies(request, n)
    broker = broker_url(redis_url, broker_db)
    queue = f"bench.celery_batches.{uuid.uuid4().hex[:8]}"
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "worker.log"
    client = Redis.from_url(broker)
    app = producer_app(broker, queue)
    proc: subprocess.Popen[bytes] | None = None
    try:
        with removing_new_keys(client):
            try:
                # Started and consuming before the clock: start-up is not part of the rate.
                proc, out_dir = _start_worker(
                    broker, queue, workdir, flush_every, flush_interval, pool
                )
                # Untimed warm-up of the producer's pooled connection, on a queue of its own
                # (a message on the measured queue would become a line the clock counts).
                app.send_task(TASK_NAME, args=[bodies[0]], queue=f"{queue}.warmup")
                client.delete(f"{queue}.warmup")
                gc.collect()
                worker_cpu = _proc_cpu_seconds(proc.pid)
                redis_cpu = redis_cpu_seconds(client)
                cpu = time.process_time()
                started = time.perf_counter()
                ids = [app.send_task(TASK_NAME, args=[body]).id for body in bodies]
                send_seconds = time.perf_counter() - started
                # From the last send: the sending itself is bounded by the producer's speed.
                deadline = time.monotonic() + (timeout or 60 + n / 100)
                _wait_for_lines(out_dir, n, proc, deadline, log_path)
                seconds = time.perf_counter() - started
                cpu = time.process_time() - cpu
                redis_cpu = redis_cpu_seconds(client) - redis_cpu
                worker_end = _proc_cpu_seconds(proc.pid)
                if worker_cpu is not None and worker_end is not None:
                    worker_cpu = worker_end - worker_cpu
                # Untimed: one more flush interval, so a late duplicate batch would be caught.
                time.sleep(flush_interval + 0.5)
                lines, files = _check_output(out_dir, ids, bodies)
                left = client.llen(queue)
                if left:
                    raise RuntimeError(f"celery-batches: {left} messages left in {queue}")
            finally:
                # Before the keys go: a live worker would re-declare them.
                if proc is not None:
                    _stop_worker(proc)
    finally:
        app.close()
        client.close()
    return {
        "rate": n / seconds,
        "seconds": seconds,
        "n": n,
        "lines": lines,
        "files": files,
        "send_seconds": send_seconds,
        "send_rate": n / send_seconds,
        "producer_cpu_s": cpu,
        "worker_cpu_s": worker_cpu,
        "redis_cpu_s": redis_cpu,
        "flush_every": flush_every,
        "flush_interval": flush_interval,
        "pool": pool,
    }
