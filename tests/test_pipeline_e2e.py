"""End to end: producers → Redis → aggregator → local provider → results on callback queues.

A real redis-server, a real Celery worker subprocess (with its beat), SQLite or PostgreSQL.
"""

from __future__ import annotations

import collections
import threading
import time
from pathlib import Path

import pytest
from sqlmodel import Session, select

from producer import CallbackQueue, Producer, Result
from shared.db import make_engine
from shared.models import Batch, BatchState
from shared.settings import Settings
from tests.conftest import WorkerFactory, make_settings
from worker.processes import WorkerProcess

MODELS = ("model-alpha", "model-beta")
QUEUES = ("svc-a", "svc-b")
FAST = {
    "max_batch_requests": 1000,
    "max_wait_seconds": 1.0,
    "poll_interval_seconds": 0.3,
    "aggregate_interval_seconds": 0.3,
    "submit_interval_seconds": 0.3,
}


@pytest.fixture
def e2e_settings(redis_url: str, tmp_path: Path, database_url: str) -> Settings:
    return make_settings(redis_url, tmp_path, database_url=database_url, **FAST)


@pytest.fixture
def worker(e2e_settings: Settings, start_worker: WorkerFactory) -> WorkerProcess:
    """A Celery worker with beat, configured through the environment like a real deployment."""
    return start_worker(e2e_settings)


def drain(
    settings: Settings, expected: set[str], timeout: float
) -> tuple[collections.Counter[str], dict[str, Result]]:
    """Consume both callback queues until every expected id arrived (or time runs out)."""
    deliveries: collections.Counter[str] = collections.Counter()
    results: dict[str, Result] = {}
    queues = [CallbackQueue(name, settings=settings) for name in QUEUES]
    deadline = time.monotonic() + timeout
    try:
        while not expected <= results.keys() and time.monotonic() < deadline:
            for queue in queues:
                delivery = queue.get(timeout=0.2)
                if delivery is not None:
                    deliveries[delivery.result.request_id] += 1
                    results[delivery.result.request_id] = delivery.result
                    delivery.ack()
        # Anything arriving after everything was delivered would be a duplicate.
        time.sleep(1.0)
        for queue in queues:
            while (delivery := queue.get(timeout=0.1)) is not None:
                deliveries[delivery.result.request_id] += 1
                delivery.ack()
    finally:
        for queue in queues:
            queue.close()
    return deliveries, results


def test_5000_requests_from_3_producers_each_arrive_exactly_once(
    e2e_settings: Settings, worker: WorkerProcess, tmp_path: Path
) -> None:
    # Given 3 producer threads pushing 5,000 distinct requests over 2 models, where about
    # one submit in six repeats an idempotency key another submit already used
    ids: dict[int, set[str]] = collections.defaultdict(set)
    errors: list[BaseException] = []

    def request(n: int) -> dict[str, object]:
        return {
            "model": MODELS[n % 2],
            "messages": [{"role": "user", "content": f"req-{n} classify this sentence"}],
            "max_tokens": 8,
            "callback_queue": QUEUES[n % 2],
            "metadata": {"n": n},
            "idempotency_key": f"key-{n}",
        }

    def produce(thread: int) -> None:
        try:
            producer = Producer(settings=e2e_settings)
            mine = list(range(thread, 5000, 3))
            for start in range(0, len(mine), 250):
                chunk = mine[start : start + 250]
                repeats = [n - 3 for n in chunk[::5] if n >= 3]  # keys already submitted
                if start % 500 == 0:
                    handles = producer.submit_many([request(n) for n in chunk + repeats])
                    for n, handle in zip(chunk + repeats, handles, strict=True):
                        ids[n].add(handle.id)
                else:
                    for n in chunk + repeats:
                        kwargs = request(n)
                        handle = producer.submit(
                            kwargs.pop("model"),  # type: ignore[arg-type]
                            kwargs.pop("messages"),  # type: ignore[arg-type]
                            **kwargs,  # type: ignore[arg-type]
                        )
                        ids[n].add(handle.id)
            producer.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors

    # Then every idempotency key maps to exactly one request id
    assert len(ids) == 5000
    assert all(len(handles) == 1 for handles in ids.values())
    by_id = {next(iter(handles)): n for n, handles in ids.items()}

    # When the worker runs the pipeline, every result arrives on its queue exactly once
    deliveries, results = drain(e2e_settings, set(by_id), timeout=180)
    log = (tmp_path / "worker-0.log").read_text(errors="replace")[-3000:]
    assert set(deliveries) == set(by_id), f"missing {len(set(by_id) - set(deliveries))}\n{log}"
    assert set(deliveries.values()) == {1}

    # And each result is the answer to its own request (custom_id mapping, not line order)
    for request_id, n in by_id.items():
        result = results[request_id]
        assert result.status == "completed", result
        assert result.metadata == {"n": n}
        assert result.response is not None
        assert result.response["model"] == MODELS[n % 2]
        content = result.response["choices"][0]["message"]["content"]
        assert f"req-{n}" in content, (n, content)

    # And the requests went through at least 2 finished batches per model
    engine = make_engine(e2e_settings)
    with Session(engine) as session:
        batches = list(session.exec(select(Batch)))
    engine.dispose()
    for model in MODELS:
        finished = [b for b in batches if b.model == model and b.state == BatchState.FINISHED]
        assert len(finished) >= 2, [(b.model, b.state) for b in batches]
        assert sum(b.completed_count for b in finished) == 2500
        assert all(b.request_count <= 1000 for b in finished)
