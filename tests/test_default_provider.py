"""The worker, not the producer, picks the provider; dry-run results say they are dry runs."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest
from sqlmodel import select

from producer import CallbackQueue, Producer, Result
from shared.models import Batch
from shared.providers.local import DRY_RUN_FINGERPRINT
from shared.redis_layout import buffer_name, pending_ids
from shared.schemas import DEFAULT_PROVIDER
from shared.schemas import DRY_RUN_FINGERPRINT as SCHEMA_FINGERPRINT
from tests.conftest import make_settings, run_local_jobs
from worker import packing
from worker.collection import collect_ready_batches
from worker.context import WorkerContext
from worker.lifecycle import submit_ready_batches
from worker.packing import pack_due_buffers
from worker.polling import poll_due_batches

MESSAGES = [{"role": "user", "content": "Positive or negative: 'quiet fan'"}]


def worker_with_default(ctx: WorkerContext, provider: str) -> WorkerContext:
    """The worker context configured with ``provider`` as the deployment's default."""
    ctx.settings = ctx.settings.model_copy(update={"provider": provider, "max_batch_requests": 3})
    return ctx


def recorded_batches(ctx: WorkerContext) -> list[Batch]:
    with ctx.session() as session:
        return list(session.exec(select(Batch)))


@pytest.mark.parametrize(
    ("producer_key", "worker_default"),
    [(None, "together"), ("sk-producer-only", "local")],
    ids=["producer-without-key", "producer-with-key"],
)
def test_a_request_naming_no_provider_goes_to_the_workers_default(
    worker_context: WorkerContext,
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    producer_key: str | None,
    worker_default: str,
) -> None:
    # Given a producer configured with nothing but the Redis URL, whatever key its
    # environment happens to hold, and a worker whose default provider is another one
    if producer_key is not None:
        monkeypatch.setenv("TOGETHER_API_KEY", producer_key)
    producer_settings = make_settings(redis_url, tmp_path / "producer", provider=None)
    producer = Producer(settings=producer_settings)
    ctx = worker_with_default(worker_context, worker_default)

    # When it submits requests that name no provider and the worker packs them
    ids = [h.id for h in producer.submit_many([{"model": "m-a", "messages": MESSAGES}] * 3)]
    monkeypatch.delenv("TOGETHER_API_KEY", raising=False)
    waiting_in = ctx.redis.hkeys(ctx.keys.buffers)
    (packed,) = pack_due_buffers(ctx)

    # Then they waited in the default buffer and their batch is the worker's default's
    assert packed.provider == worker_default
    assert packed.path.parent == ctx.batch_dir / worker_default
    (batch,) = recorded_batches(ctx)
    assert (batch.provider, batch.file_path) == (worker_default, str(packed.path))
    lines = [orjson.loads(line) for line in packed.path.read_bytes().splitlines()]
    assert [line["custom_id"] for line in lines] == ids
    assert waiting_in == [buffer_name(DEFAULT_PROVIDER, "m-a").encode()]
    producer.close()


def test_a_request_naming_its_provider_still_goes_there(worker_context: WorkerContext) -> None:
    # Given a worker whose default is together
    ctx = worker_with_default(worker_context, "together")
    producer = Producer(settings=ctx.settings, client=ctx.redis)

    # When requests name the local provider
    producer.submit_many([{"model": "m-a", "messages": MESSAGES, "provider": "local"}] * 3)
    (packed,) = pack_due_buffers(ctx)

    # Then they are packed for the local provider
    assert packed.provider == "local"
    assert [b.provider for b in recorded_batches(ctx)] == ["local"]


def test_an_abandoned_claim_of_the_default_buffer_goes_back_to_it(
    worker_context: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a packer whose disk fails while it writes a batch of the default buffer
    ctx = worker_with_default(worker_context, "local")
    producer = Producer(settings=ctx.settings, client=ctx.redis)
    ids = [h.id for h in producer.submit_many([{"model": "m-a", "messages": MESSAGES}] * 3)]

    def disk_full(*_args: object, **_kwargs: object) -> int:
        raise OSError("No space left on device")

    monkeypatch.setattr(packing, "write_batch_file", disk_full)
    buf = buffer_name(DEFAULT_PROVIDER, "m-a")
    with pytest.raises(OSError):
        packing.pack_buffer(ctx, buf)

    # Then its claim is handed back: every request waits in the default buffer again
    assert sorted(pending_ids(ctx.redis, ctx.keys, buf)) == sorted(ids)
    assert [(b.state, b.model) for b in recorded_batches(ctx)] == [("abandoned", "m-a")]


def test_a_dry_run_result_says_so(worker_context: WorkerContext) -> None:
    # Given requests answered by the local provider's echo engine (their text and metadata
    # hold a NUL, which JSON carries as \u0000 and which the record must take too)
    ctx = worker_with_default(worker_context, "local")
    ctx.settings = ctx.settings.model_copy(update={"poll_interval_seconds": 0.01})
    producer = Producer(settings=ctx.settings, client=ctx.redis)
    request = {
        "model": "m-a",
        "messages": [{"role": "user", "content": "quiet\x00fan"}],
        "callback_queue": "svc",
        "metadata": {"tag": "a\x00b"},
    }
    producer.submit_many([request] * 3)

    # When the batch goes through the whole pipeline
    pack_due_buffers(ctx)
    submit_ready_batches(ctx)
    run_local_jobs(ctx)
    time.sleep(0.02)
    poll_due_batches(ctx)
    collect_ready_batches(ctx)

    # Then each result delivered says it is a dry run, in the Result itself
    entries = ctx.redis.xrange(ctx.keys.callback("svc"))
    assert len(entries) == 3
    assert all(b'"dry_run":true' in fields[b"result"] for _, fields in entries)
    queue = CallbackQueue("svc", settings=ctx.settings, client=ctx.redis)
    results = []
    while (delivery := queue.get(timeout=0.05)) is not None:
        results.append(delivery.result)
        delivery.ack()
    assert len(results) == 3
    assert all(r.status == "completed" and r.dry_run for r in results)
    assert {r.metadata["tag"] for r in results if r.metadata} == {"a\x00b"}


def test_only_dry_run_results_carry_the_flag() -> None:
    # The engine's marker and the one results are checked against are the same string
    assert SCHEMA_FINGERPRINT == DRY_RUN_FINGERPRINT
    real = Result(request_id="r1", status="completed", response={"system_fingerprint": "fp_1"})
    assert not Result.is_dry_run(real.response)
    assert b"dry_run" not in real.to_json()
    assert Result.from_json(real.to_json()).dry_run is False
    dry = Result(request_id="r2", status="completed", dry_run=True)
    assert Result.from_json(dry.to_json()).dry_run is True
