"""Chaos: SIGKILL the whole worker mid-pipeline; a fresh worker finishes with nothing lost
or delivered twice (Celery messages are only wake-ups, so none of them carries state)."""

from __future__ import annotations

import collections
import os
import signal
import time
from pathlib import Path

import pytest

from producer import CallbackQueue, Producer
from shared.redis_layout import pending_ids, text
from tests.conftest import WorkerFactory, make_settings
from worker import packing
from worker.context import WorkerContext
from worker.packing import pack_buffer
from worker.reaper import reap_abandoned_claims

CHAOS = {
    "max_batch_requests": 300,
    "max_wait_seconds": 0.5,
    "poll_interval_seconds": 0.3,
    "aggregate_interval_seconds": 0.3,
    "submit_interval_seconds": 0.3,
    # Short, so the dead worker's leases (no longer renewed) expire quickly.
    "lease_seconds": 3,
}


@pytest.mark.slow
def test_killing_the_worker_mid_pipeline_loses_and_duplicates_nothing(
    redis_url: str, tmp_path: Path, start_worker: WorkerFactory
) -> None:
    # Given 2,400 requests and a worker whose batches run slowly (10 ms a line, 3 s a batch)
    settings = make_settings(redis_url, tmp_path / "data", **CHAOS)
    producer = Producer(settings=settings)
    handles = producer.submit_many(
        [
            {
                "model": ("m-1", "m-2")[i % 2],
                "messages": [{"role": "user", "content": f"req-{i} please"}],
                "callback_queue": "svc",
            }
            for i in range(2400)
        ]
    )
    ids = {h.id for h in handles}
    first = start_worker(settings, BATCHBRIDGE_LOCAL_LINE_DELAY="0.01")
    queue = CallbackQueue("svc", settings=settings)
    deliveries: collections.Counter[str] = collections.Counter()

    def take(until: float, stop_at: int) -> None:
        while time.monotonic() < until and len(deliveries) < stop_at:
            delivery = queue.get(timeout=0.5)
            if delivery is not None:
                deliveries[delivery.result.request_id] += 1
                assert delivery.result.status == "completed", delivery.result
                delivery.ack()

    # When some results are out and the worker (main process, pool and beat) is SIGKILLed
    take(time.monotonic() + 90, stop_at=300)
    assert first.process is not None
    os.killpg(first.process.pid, signal.SIGKILL)
    first.process.wait()
    pipe = producer.redis.pipeline(transaction=False)
    for request_id in ids:
        pipe.hget(producer.keys.request(request_id), "state")
    done_at_kill = sum(state == b"done" for state in pipe.execute())
    assert 300 <= done_at_kill < len(ids), f"the kill should land mid-pipeline ({done_at_kill})"

    # And a fresh worker takes over
    start_worker(settings, BATCHBRIDGE_LOCAL_LINE_DELAY="0.01")
    take(time.monotonic() + 150, stop_at=len(ids))
    time.sleep(2)
    take(time.monotonic() + 1, stop_at=len(ids) + 1)  # anything more would be a duplicate

    # Then every request got exactly one result
    assert set(deliveries) == ids, f"lost {len(ids - set(deliveries))}"
    assert set(deliveries.values()) == {1}
    queue.close()
    producer.close()


def test_one_claim_the_reaper_cannot_take_back_does_not_keep_the_others_out(
    worker_context: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given two abandoned claims (packers killed before committing), the older of which the
    # database refuses to record a tombstone for
    ctx = worker_context
    ctx.settings = ctx.settings.model_copy(update={"claim_timeout_seconds": 0.05})
    producer = Producer(settings=ctx.settings, client=ctx.redis)
    messages = [{"role": "user", "content": "hi"}]
    ids = {
        model: {h.id for h in producer.submit_many([{"model": model, "messages": messages}] * 3)}
        for model in ("m-old", "m-new")
    }
    bufs = {text(b).rpartition(":")[2]: text(b) for b in ctx.redis.hkeys(ctx.keys.buffers)}

    def killed(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt("packer killed")

    monkeypatch.setattr(packing, "write_batch_file", killed)
    for model in ("m-old", "m-new"):
        with pytest.raises(KeyboardInterrupt):
            pack_buffer(ctx, bufs[model], force=True)
        time.sleep(0.002)  # claims are ordered by their time
    old_claim, new_claim = (text(m) for m in ctx.redis.zrange(ctx.keys.claims, 0, -1))
    refuse_tombstone(ctx, old_claim)
    time.sleep(0.1)

    # When the reaper runs
    returned = reap_abandoned_claims(ctx)

    # Then the other claim's requests are back in their buffer, and the failing claim is
    # kept (not released with its requests stranded) for the next pass
    assert returned == 3
    assert pending(ctx, bufs["m-new"]) == ids["m-new"]
    assert pending(ctx, bufs["m-old"]) == set()
    assert [text(m) for m in ctx.redis.zrange(ctx.keys.claims, 0, -1)] == [old_claim]
    assert ctx.redis.llen(ctx.keys.claim_ids(old_claim)) == 3
    assert not ctx.redis.exists(ctx.keys.claim(new_claim))

    # And once the database accepts it again, the next pass returns it too
    allow_tombstones(ctx)
    assert reap_abandoned_claims(ctx) == 3
    assert pending(ctx, bufs["m-old"]) == ids["m-old"]
    assert ctx.redis.zcard(ctx.keys.claims) == 0


def pending(ctx: WorkerContext, buf: str) -> set[str]:
    return set(pending_ids(ctx.redis, ctx.keys, buf))


def refuse_tombstone(ctx: WorkerContext, batch_id: str) -> None:
    """Make the database reject an insert of this one batch row (a real database error)."""
    with ctx.engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql(
                "CREATE TRIGGER refuse_batch BEFORE INSERT ON batches "
                f"WHEN NEW.id = '{batch_id}' BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )
        else:
            conn.exec_driver_sql(
                "CREATE FUNCTION refuse_batch() RETURNS trigger AS $$ BEGIN "
                f"IF NEW.id = '{batch_id}' THEN RAISE EXCEPTION 'refused'; END IF; "
                "RETURN NEW; END $$ LANGUAGE plpgsql"
            )
            conn.exec_driver_sql(
                "CREATE TRIGGER refuse_batch BEFORE INSERT ON batches "
                "FOR EACH ROW EXECUTE FUNCTION refuse_batch()"
            )


def allow_tombstones(ctx: WorkerContext) -> None:
    with ctx.engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            conn.exec_driver_sql("DROP TRIGGER refuse_batch")
        else:
            conn.exec_driver_sql("DROP TRIGGER refuse_batch ON batches")
