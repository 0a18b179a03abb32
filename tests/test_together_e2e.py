"""End to end through the Together adapter: producer → TogetherProvider over real HTTP →
``batchbridge local-api`` → results on callback queues."""

from __future__ import annotations

import collections
import time
from pathlib import Path

import pytest
from sqlmodel import Session, select
from typer.testing import CliRunner

from producer import CallbackQueue, Producer, Result
from shared.db import make_engine
from shared.models import Batch, BatchState
from shared.settings import Settings
from tests.conftest import LocalApiFactory, WorkerFactory, make_settings, settings_env
from worker.cli import app as cli

FAST = {
    "max_batch_requests": 200,
    "max_wait_seconds": 0.5,
    "poll_interval_seconds": 0.3,
    "aggregate_interval_seconds": 0.3,
    "submit_interval_seconds": 0.3,
    "provider": "together",
    "max_attempts": 10,
    # A create answered 5xx may still have made its job: the next create waits out twice
    # this (the in-flight window) and reconciles first. 3 s keeps the faulty run's tail short.
    "provider_timeout_seconds": 3.0,
}


def push(settings: Settings, n: int) -> dict[str, int]:
    producer = Producer(settings=settings)
    requests = [
        {
            "model": ("model-x", "model-y")[i % 2],
            "messages": [{"role": "user", "content": f"req-{i} is this good?"}],
            "callback_queue": "svc",
            "metadata": {"i": i},
        }
        for i in range(n)
    ]
    handles = producer.submit_many(requests)
    producer.close()
    return {h.id: i for i, h in enumerate(handles)}


def drain(settings: Settings, n: int, timeout: float) -> tuple[dict[str, Result], int]:
    queue = CallbackQueue("svc", settings=settings)
    results: dict[str, Result] = {}
    deliveries = 0
    deadline = time.monotonic() + timeout
    while len(results) < n and time.monotonic() < deadline:
        delivery = queue.get(timeout=0.5)
        if delivery is not None:
            deliveries += 1
            results[delivery.result.request_id] = delivery.result
            delivery.ack()
    time.sleep(1)
    while (delivery := queue.get(timeout=0.1)) is not None:
        deliveries += 1
        delivery.ack()
    queue.close()
    return results, deliveries


def batches(settings: Settings) -> list[Batch]:
    engine = make_engine(settings)
    with Session(engine) as session:
        found = list(session.exec(select(Batch)))
    engine.dispose()
    return found


@pytest.mark.parametrize(
    ("api_args", "expect_retries"),
    [
        ([], False),
        pytest.param(
            ["--line-error-rate", "0.2", "--fail-rate", "0.1"], True, marks=pytest.mark.slow
        ),
        # Batches expire part-way; the unfinished lines go round again, first in line.
        (["--expire-after", "0.6", "--line-delay", "0.004"], True),
    ],
    ids=["clean", "faulty", "expiring"],
)
def test_requests_flow_through_together_adapter_over_http(
    redis_url: str,
    tmp_path: Path,
    start_local_api: LocalApiFactory,
    start_worker: WorkerFactory,
    api_args: list[str],
    expect_retries: bool,
) -> None:
    # Given a Together-compatible API and a worker whose provider is `together`
    api = start_local_api(*api_args)
    settings = make_settings(redis_url, tmp_path / "worker", **FAST)
    start_worker(settings, TOGETHER_BASE_URL=api.url, TOGETHER_API_KEY=api.api_key)

    # When 600 requests are submitted
    ids = push(settings, 600)
    results, deliveries = drain(settings, len(ids), timeout=180)

    # Then each comes back once, completed, answered for its own request
    assert set(results) == set(ids), f"missing {len(set(ids) - set(results))}"
    assert deliveries == len(ids)
    for request_id, i in ids.items():
        result = results[request_id]
        assert result.status == "completed", result.error
        assert result.response is not None
        assert f"req-{i}" in result.response["choices"][0]["message"]["content"]
    attempts = collections.Counter(r.attempts for r in results.values())
    assert (max(attempts) > 1) is expect_retries, attempts

    # And the batches ran at the Together endpoint, at least one per model
    found = [b for b in batches(settings) if b.state == BatchState.FINISHED]
    assert {b.provider for b in found} == {"together"}
    assert {b.model for b in found} == {"model-x", "model-y"}
    assert all(b.provider_batch_id and b.provider_file_id for b in found)
    if "--expire-after" in api_args:
        assert any(b.outcome == "expired" and b.requeued_count for b in found)


def test_a_wrong_api_key_holds_the_requests_until_the_operator_gives_up(
    redis_url: str,
    tmp_path: Path,
    start_local_api: LocalApiFactory,
    start_worker: WorkerFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a worker whose Together key the API refuses (401)
    api = start_local_api()
    settings = make_settings(redis_url, tmp_path / "worker", **FAST)
    start_worker(settings, TOGETHER_BASE_URL=api.url, TOGETHER_API_KEY="wrong-key")

    # When requests arrive (two models, so two batches), then their batches are held: nothing
    # ran, so nothing is failed
    ids = push(settings, 10)
    deadline = time.monotonic() + 60
    while len([b for b in batches(settings) if b.held_since]) < 2 and time.monotonic() < deadline:
        time.sleep(0.3)
    held = batches(settings)
    assert sum(b.request_count for b in held) == len(ids)
    for batch in held:
        assert batch.state == BatchState.PACKED and batch.provider_batch_id is None
        assert batch.error is not None and "on hold" in batch.error and "401" in batch.error
    results, _ = drain(settings, len(ids), timeout=2)
    assert results == {}

    # And when the operator gives up on them, every request fails once, saying so
    for name, value in settings_env(settings).items():
        monkeypatch.setenv(name, value)
    for batch in held:
        outcome = CliRunner().invoke(cli, ["batches", "fail", batch.id])
        assert outcome.exit_code == 0, outcome.output
    results, deliveries = drain(settings, len(ids), timeout=60)
    assert set(results) == set(ids) and deliveries == len(ids)
    assert {r.status for r in results.values()} == {"failed"}
    for result in results.values():
        assert result.error is not None and result.error.code == "batch_failed"
        assert "operator" in result.error.message and "401" in result.error.message
