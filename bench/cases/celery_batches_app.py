"""The celery-batches baseline's worker app: ``celery -A bench.cases.celery_batches_app worker``.

Configured from the environment :func:`bench.cases.celery_baselines.celery_batches_rate` sets
for the worker subprocess (broker, queue, output directory, flush size and interval).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson
from celery import Celery, signals
from celery_batches import Batches, SimpleRequest

from bench.cases.celery_baselines import (
    ENV_BROKER_URL,
    ENV_FLUSH_EVERY,
    ENV_FLUSH_INTERVAL,
    ENV_OUT_DIR,
    ENV_QUEUE,
    ENV_READY_FILE,
    READY_FILE_NAME,
    TASK_NAME,
    batch_file_name,
)

# Defaults only so that importing the module (ruff, an IDE) works without the variables.
BROKER_URL = os.environ.get(ENV_BROKER_URL, "redis://127.0.0.1:6379/1")
QUEUE = os.environ.get(ENV_QUEUE, "bench.celery_batches")
OUT_DIR = Path(os.environ.get(ENV_OUT_DIR, "."))
READY_FILE = Path(os.environ.get(ENV_READY_FILE, READY_FILE_NAME))
FLUSH_EVERY = int(os.environ.get(ENV_FLUSH_EVERY, "1000"))
FLUSH_INTERVAL = float(os.environ.get(ENV_FLUSH_INTERVAL, "1.0"))

app = Celery("bench-celery-batches", broker=BROKER_URL)
app.conf.update(
    task_default_queue=QUEUE,
    # celery-batches' README: 0 (no limit) lets the worker prefetch a whole batch; with the
    # default 4 x concurrency it would hold 4 messages and never fill a batch of 1,000.
    worker_prefetch_multiplier=0,
    # Nothing reads results; a result backend would add a Redis write per request.
    task_ignore_result=True,
    # No pidbox queue or broadcast bindings: fewer keys to clean and no control chatter.
    worker_enable_remote_control=False,
    worker_send_task_events=False,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)

_batch_seq = 0


@app.task(  # type: ignore[misc]  # Celery ships no types
    base=Batches,
    name=TASK_NAME,
    flush_every=FLUSH_EVERY,
    flush_interval=FLUSH_INTERVAL,
    ignore_result=True,
)
def llm_request(requests: list[SimpleRequest]) -> None:
    """Write one flushed batch of chat requests as a Batch API JSONL file."""
    global _batch_seq
    _batch_seq += 1
    lines = []
    for request in requests:
        body: dict[str, Any] = request.args[0]
        # The Celery task id is the one id every message has: it serves as custom_id.
        lines.append(
            orjson.dumps(
                {
                    "custom_id": request.id,
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": body,
                }
            )
        )
    path = OUT_DIR / batch_file_name(os.getpid(), _batch_seq)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(b"\n".join(lines) + b"\n")
    # Renamed into place so the measuring process never counts a half-written file.
    os.replace(tmp, path)


@signals.worker_ready.connect
def _announce_ready(**_kwargs: Any) -> None:
    """Tell the measuring process the consumer is up, so start-up stays out of the clock."""
    READY_FILE.touch()
