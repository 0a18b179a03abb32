"""Running the whole pipeline for a benchmark: workers, producer processes and a consumer.

Producers and the consumer are processes of their own (``python -m bench.child``), so four
producers really run in parallel and the consumer is a service reading its own queue. The
clock starts at a wall time every producer waits for (their imports are not timed) and stops
at the consumer's last ack. Timestamps are wall-clock (one machine, one clock).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from contextlib import ExitStack, closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench._common import sized_request
from bench.harness import ROOT, Bench, redis_cpu_seconds
from worker.processes import WorkerProcess

QUEUE = "bench-e2e"
CHUNK = 1000
CONSUME_CHUNK = 500


@dataclass
class Pipeline:
    """One end-to-end run's shape."""

    requests: int
    producers: int = 4
    workers: int = 1
    concurrency: int = 2
    size: int = 400
    max_batch: int = 10_000
    max_wait: float = 1.0
    timeout: float = 180.0


def settings_overrides(bench: Bench, data_dir: Path, shape: Pipeline) -> dict[str, Any]:
    """Fast ticks: a full buffer is packed, sent and collected within a fraction of a second."""
    return bench.settings_overrides(
        data_dir,
        max_batch_requests=shape.max_batch,
        max_wait_seconds=shape.max_wait,
        aggregate_interval_seconds=0.2,
        submit_interval_seconds=0.2,
        poll_interval_seconds=0.2,
    )


def environment(overrides: dict[str, Any]) -> dict[str, str]:
    """The environment of every process of the run: the settings as BATCHBRIDGE_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHBRIDGE_")}
    env.update({f"BATCHBRIDGE_{k.upper()}": str(v) for k, v in overrides.items()})
    env["PYTHONPATH"] = str(ROOT)
    return env


def spawn(
    target: str, config: dict[str, Any], env: dict[str, str], log: Path
) -> subprocess.Popen[str]:
    """Start ``bench.child target`` with ``config`` on its stdin."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.child", target],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=out,
            text=True,
            cwd=ROOT,
            env=env,
        )
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(config))
    proc.stdin.close()
    return proc


def collect_output(proc: subprocess.Popen[str], name: str, log: Path, timeout: float) -> Any:
    """Wait for a child and return its JSON result."""
    assert proc.stdout is not None
    out = proc.stdout.read()
    code = proc.wait(timeout)
    if code != 0:
        raise RuntimeError(f"{name} exited {code}:\n{log.read_text()[-3000:]}")
    return json.loads(out.splitlines()[-1])


def wait_ready(worker: WorkerProcess, log: Path, timeout: float = 60.0) -> None:
    """Until Celery logs that the worker is ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not worker.alive():
            raise RuntimeError(f"worker died at start:\n{log.read_text()[-3000:]}")
        if log.exists() and " ready." in log.read_text():
            return
        time.sleep(0.1)
    raise RuntimeError(f"worker not ready after {timeout} s:\n{log.read_text()[-3000:]}")


def produce(config: dict[str, Any]) -> dict[str, Any]:
    """One producer process: wait for the start, submit its share, record when (child)."""
    from producer import Producer
    from shared.settings import Settings

    # Distinct requests, as services send them (built before the clock starts).
    first = config["index"] * CHUNK
    requests = [
        {**sized_request(config["size"], n), "callback_queue": QUEUE}
        for n in range(first, first + CHUNK)
    ]
    ids, times = [], []
    with Producer(settings=Settings.load(**config["settings"])) as producer:
        producer.redis.ping()
        time.sleep(max(0.0, config["start_at"] - time.time()))
        cpu = time.process_time()  # from the start: imports and set-up are not the run's
        for start in range(0, config["count"], CHUNK):
            handles = producer.submit_many(requests[: config["count"] - start])
            now = time.time()
            ids.extend(h.id for h in handles)
            times.append(now)
    Path(config["out"]).write_text(json.dumps({"ids": ids, "chunk_times": times}))
    return {"submitted": len(ids), "cpu_s": time.process_time() - cpu}


def consume(config: dict[str, Any]) -> dict[str, Any]:
    """The service reading the results: get_many + ack_many until every one is acked (child)."""
    from producer import CallbackQueue
    from shared.settings import Settings

    n, deadline = config["requests"], time.time() + config["timeout"]
    acked: dict[str, tuple[float, str | None]] = {}
    reads = 0
    queue = CallbackQueue(QUEUE, settings=Settings.load(**config["settings"]))
    with closing(queue):
        queue.get_many(1, timeout=0)  # the group exists before the first result
        print("consumer ready", file=sys.stderr, flush=True)
        cpu = time.process_time()  # waiting for the first result costs next to nothing
        while len(acked) < n and time.time() < deadline:
            chunk = queue.get_many(CONSUME_CHUNK, timeout=1.0)
            if not chunk:
                continue
            queue.ack_many(chunk)
            now = time.time()
            reads += len(chunk)
            for delivery in chunk:
                acked[delivery.result.request_id] = (now, delivery.result.batch_id)
    Path(config["out"]).write_text(json.dumps(acked))
    return {"acked": len(acked), "reads": reads, "cpu_s": time.process_time() - cpu}


def batch_created(data_dir: Path) -> dict[str, float]:
    """When each batch was packed (its row's created_at), as a wall-clock timestamp."""
    with closing(sqlite3.connect(data_dir / "batchbridge.sqlite3")) as db:
        rows = db.execute("SELECT id, created_at FROM batches").fetchall()
    out = {}
    for batch_id, created in rows:
        stamp = datetime.fromisoformat(str(created))
        stamp = stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)
        out[batch_id] = stamp.timestamp()
    return out


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def run_pipeline(bench: Bench, shape: Pipeline, name: str) -> dict[str, Any]:
    """Run one pipeline until every result is acked; throughput, latencies, checks."""
    bench.flush()
    data_dir = bench.data_dir(name)
    overrides = settings_overrides(bench, data_dir, shape)
    env = environment(overrides)
    per_producer = shape.requests // shape.producers
    workers: list[WorkerProcess] = []
    with ExitStack() as stack:
        for i in range(shape.workers):
            log = data_dir / f"worker-{i}.log"
            worker = WorkerProcess(
                env,
                beat=i == 0,
                concurrency=shape.concurrency,
                loglevel="INFO",  # the "ready." line is INFO
                log_path=log,
                schedule_path=data_dir / "beat-schedule",
                hostname=f"bench{i}@%h",
            ).start()
            stack.callback(worker.stop)
            workers.append(worker)
            wait_ready(worker, log)
        consumer_log = data_dir / "consumer.log"
        consumer = spawn(
            "bench.cases.pipeline:consume",
            {
                "settings": overrides,
                "requests": per_producer * shape.producers,
                "timeout": shape.timeout,
                "out": str(data_dir / "acked.json"),
            },
            env,
            consumer_log,
        )
        stack.callback(consumer.kill)
        while "consumer ready" not in consumer_log.read_text():
            if consumer.poll() is not None:
                raise RuntimeError(f"consumer died:\n{consumer_log.read_text()}")
            time.sleep(0.05)
        start_at = time.time() + 3.0  # every producer has imported and connected by then
        cpu_before = sum(tree_cpu_seconds(w) for w in workers)
        with bench.client() as client:
            redis_before = redis_cpu_seconds(client)
        producers = []
        for i in range(shape.producers):
            config = {
                "settings": overrides,
                "index": i,
                "count": per_producer,
                "size": shape.size,
                "start_at": start_at,
                "out": str(data_dir / f"producer-{i}.json"),
            }
            log = data_dir / f"producer-{i}.log"
            producers.append((spawn("bench.cases.pipeline:produce", config, env, log), log))
        producer_cpu = sum(
            collect_output(proc, "producer", log, shape.timeout)["cpu_s"] for proc, log in producers
        )
        consumed = collect_output(consumer, "consumer", consumer_log, shape.timeout + 30)
        cpu = sum(tree_cpu_seconds(w) for w in workers) - cpu_before
        with bench.client() as client:
            redis_cpu = redis_cpu_seconds(client) - redis_before
    summary = summarise(data_dir, shape, start_at, consumed)
    # Idle ticks count too: what a worker costs per request at this load. Producers and
    # the consumer count from the start of the run (their imports are not part of it).
    return {
        **summary,
        "worker_cpu_s": cpu,
        "redis_cpu_s": redis_cpu,
        "producer_cpu_s": producer_cpu,
        "consumer_cpu_s": consumed["cpu_s"],
    }


def tree_cpu_seconds(worker: WorkerProcess) -> float:
    """CPU seconds a worker's main process and its pool children have used so far."""
    import psutil

    assert worker.process is not None
    try:
        root = psutil.Process(worker.process.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def summarise(
    data_dir: Path, shape: Pipeline, start_at: float, consumed: dict[str, Any]
) -> dict[str, Any]:
    """Throughput and latencies from the producers' and the consumer's records; checks."""
    submitted: dict[str, float] = {}
    for i in range(shape.producers):
        record = json.loads((data_dir / f"producer-{i}.json").read_text())
        for k, stamp in enumerate(record["chunk_times"]):
            for request_id in record["ids"][k * CHUNK : (k + 1) * CHUNK]:
                submitted[request_id] = stamp
    acked: dict[str, list[Any]] = json.loads((data_dir / "acked.json").read_text())
    if set(acked) != set(submitted):
        missing, extra = len(set(submitted) - set(acked)), len(set(acked) - set(submitted))
        raise AssertionError(f"{missing} submitted requests never acked, {extra} unexpected")
    if consumed["reads"] != len(acked):
        raise AssertionError(f"{consumed['reads']} deliveries for {len(acked)} requests")
    created = batch_created(data_dir)
    latency, overhead = [], []
    for request_id, (acked_at, batch_id) in acked.items():
        sent = submitted[request_id]
        latency.append(acked_at - sent)
        # The wait for the buffer to flush is the price of batching, not overhead.
        overhead.append(acked_at - max(sent, created.get(batch_id, sent)))
    end = max(a for a, _ in acked.values())
    seconds = end - start_at
    return {
        "requests": len(acked),
        "seconds": seconds,
        "rate": len(acked) / seconds,
        "submit_seconds": max(submitted.values()) - start_at,
        "batches": len(created),
        "latency_p50": percentile(latency, 50),
        "latency_p99": percentile(latency, 99),
        "overhead_p50": percentile(overhead, 50),
        "overhead_p99": percentile(overhead, 99),
    }
