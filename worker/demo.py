"""``batchbridge demo``: a sample classification workload through the whole pipeline."""

from __future__ import annotations

import collections
import shutil
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlmodel import Session, select

from producer import CallbackQueue, Producer
from shared.db import make_engine
from shared.embedded_redis import EmbeddedRedis, child_environment
from shared.models import Batch
from shared.settings import ENV_PREFIX, Settings
from worker.processes import WorkerProcess

DEMO_MODELS = ("meta-llama/Llama-3.3-70B-Instruct-Turbo", "Qwen/Qwen2.5-7B-Instruct-Turbo")
DEMO_QUEUE = "demo-results"
# Short thresholds so the demo shows several batches per model within seconds.
DEMO_SETTINGS: dict[str, Any] = {
    "provider": "local",
    "max_batch_requests": 250,
    "max_wait_seconds": 2.0,
    "poll_interval_seconds": 0.5,
    "aggregate_interval_seconds": 0.5,
    "submit_interval_seconds": 0.5,
}
SYSTEM_PROMPT = (
    "Classify the sentiment of the product review as positive, negative or neutral. "
    "Answer with one word."
)


def sample_requests(n: int) -> list[dict[str, Any]]:
    """``n`` classification requests from the bundled reviews, alternating between models."""
    source = resources.files("worker") / "demo_data" / "reviews.jsonl"
    reviews = [orjson.loads(line) for line in source.read_bytes().splitlines() if line]
    requests = []
    for i in range(n):
        review = reviews[i % len(reviews)]
        requests.append(
            {
                "model": DEMO_MODELS[i % len(DEMO_MODELS)],
                "messages": [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": review["text"]},
                ],
                "max_tokens": 4,
                "temperature": 0,
                "callback_queue": DEMO_QUEUE,
                "metadata": {"review": review["id"], "label": review["label"]},
                "idempotency_key": f"demo-{i}",
            }
        )
    return requests


def run_demo(console: Console, *, requests: int, timeout: float) -> int:
    """Run the demo; returns the process exit code (0 when every request got its result)."""
    workdir = Path(tempfile.mkdtemp(prefix="batchbridge-demo-"))
    settings = Settings.load(data_dir=workdir, **DEMO_SETTINGS)
    redis = EmbeddedRedis(workdir / "redis", persistent=False)
    worker: WorkerProcess | None = None
    ok = False
    try:
        url = redis.start()
        env = child_environment(settings, url)
        env.update({f"{ENV_PREFIX}{k.upper()}": str(v) for k, v in DEMO_SETTINGS.items()})
        console.print(f"[bold]batchbridge demo[/bold]: private Redis at {url}, data in {workdir}")
        worker = WorkerProcess(
            env,
            log_path=workdir / "worker.log",
            loglevel="WARNING",
            schedule_path=workdir / "celerybeat-schedule",
        ).start()
        settings = Settings.load(data_dir=workdir, redis_url=url, **DEMO_SETTINGS)
        started = time.monotonic()
        outcomes, sample = _push_and_collect(console, settings, requests, timeout)
        elapsed = time.monotonic() - started
        ok = sum(outcomes.values()) == requests and outcomes["completed"] == requests
        _summarise(console, settings, requests, outcomes, elapsed, sample)
    finally:
        if worker is not None:
            worker.stop()
        redis.stop()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            console.print(f"[yellow]kept {workdir} for inspection (worker.log)[/yellow]")
    return 0 if ok else 1


def _push_and_collect(
    console: Console, settings: Settings, n: int, timeout: float
) -> tuple[collections.Counter[str], dict[str, Any]]:
    outcomes: collections.Counter[str] = collections.Counter()
    sample: dict[str, Any] = {}
    producer = Producer(settings=settings)
    queue = CallbackQueue(DEMO_QUEUE, settings=settings)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    try:
        with Progress(*columns, TimeElapsedColumn(), console=console) as progress:
            pushed = progress.add_task("submitted", total=n)
            done = progress.add_task("results  ", total=n)
            requests = sample_requests(n)
            for start in range(0, n, 100):
                producer.submit_many(requests[start : start + 100])
                progress.update(pushed, completed=min(start + 100, n))
            deadline = time.monotonic() + timeout
            seen: set[str] = set()
            while len(seen) < n and time.monotonic() < deadline:
                delivery = queue.get(timeout=0.5)
                if delivery is None:
                    continue
                result = delivery.result
                if result.request_id not in seen:
                    seen.add(result.request_id)
                    outcomes[result.status] += 1
                    sample = sample or result.model_dump(mode="json")
                delivery.ack()
                progress.update(done, completed=len(seen))
    finally:
        queue.close()
        producer.close()
    return outcomes, sample


def _summarise(
    console: Console,
    settings: Settings,
    requests: int,
    outcomes: collections.Counter[str],
    elapsed: float,
    sample: dict[str, Any],
) -> None:
    engine = make_engine(settings)
    with Session(engine) as session:
        batches = list(session.exec(select(Batch)))
    engine.dispose()
    table = Table(title="batchbridge demo summary", show_header=False)
    table.add_row("requests", str(requests))
    table.add_row("results", ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items())))
    table.add_row("batches", str(len(batches)))
    for model in DEMO_MODELS:
        mine = [b for b in batches if b.model == model]
        sizes = ", ".join(str(b.request_count) for b in mine)
        table.add_row(f"  {model}", f"{len(mine)} batches ({sizes} requests)")
    reasons = collections.Counter(b.flush_reason for b in batches)
    table.add_row("flushed by", ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())))
    tokens = sum(b.prompt_tokens + b.completion_tokens for b in batches)
    table.add_row("tokens (dry run)", str(tokens))
    table.add_row("time", f"{elapsed:.1f} s")
    console.print(table)
    if sample:
        answer = sample.get("response", {}).get("choices", [{}])[0].get("message", {})
        console.print(f"sample result for {sample['metadata']}: {answer.get('content')!r}")
