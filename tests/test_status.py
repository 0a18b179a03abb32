"""`batchbridge status` reports buffers, batches, and batches that are stuck with an error."""

from __future__ import annotations

import pytest

from producer import Producer
from worker.context import WorkerContext
from worker.lifecycle import submit_ready_batches
from worker.packing import pack_due_buffers
from worker.status import collect_status

MESSAGES = [{"role": "user", "content": "hi"}]


def test_status_shows_pending_buffers_and_a_batch_the_provider_keeps_refusing(
    worker_context: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a provider that answers every call with 429/500 (fault injection)
    monkeypatch.setenv("BATCHBRIDGE_LOCAL_FAIL_RATE", "1")
    ctx = worker_context
    ctx.settings = ctx.settings.model_copy(update={"max_batch_requests": 3})
    producer = Producer(settings=ctx.settings, client=ctx.redis)
    producer.submit_many([{"model": "m-a", "messages": MESSAGES}] * 3)
    producer.submit_many([{"model": "m-b", "messages": MESSAGES}] * 2)

    # When one batch is packed and its submission fails
    (packed,) = pack_due_buffers(ctx)
    assert submit_ready_batches(ctx) == []
    report = collect_status(ctx.settings)

    # Then the waiting buffer, the packed batch and its error are all reported
    assert [(p["model"], p["count"]) for p in report["pending"]] == [("m-b", 2)]
    assert report["batches"] == [{"provider": "local", "state": "packed", "count": 1}]
    (stuck,) = report["batches_with_errors"]
    assert stuck["batch"] == packed.id and "retryable error" in stuck["error"]


def test_status_counts_held_batches_and_marks_them(
    worker_context: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a batch for a provider this deployment has no key for (nothing can be sent)
    ctx = worker_context
    ctx.settings = ctx.settings.model_copy(update={"max_batch_requests": 2})
    producer = Producer(settings=ctx.settings, client=ctx.redis)
    producer.submit_many([{"model": "m-t", "messages": MESSAGES, "provider": "together"}] * 2)
    (packed,) = pack_due_buffers(ctx)

    # When the submitter tries it and the status is read
    assert submit_ready_batches(ctx) == []
    report = collect_status(ctx.settings)

    # Then the batch is counted as held, with the reason, and its requests are kept
    assert report["held_batches"] == 1
    (held,) = report["batches_with_errors"]
    assert held["batch"] == packed.id and held["held_since"] is not None
    assert "on hold" in held["error"] and "TOGETHER_API_KEY" in held["error"]
