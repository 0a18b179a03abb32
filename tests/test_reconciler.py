"""The reconciler: what a Redis that lost writes leaves behind is repaired from the record.

A lost AOF tail rolls the whole Redis back to an earlier moment. The tests take that moment
with DUMP (every key, with its TTL), let the pipeline go on, then put exactly that dataset
back with RESTORE: Redis forgets the later writes, SQL keeps them.
"""

from __future__ import annotations

import collections
import logging
import time
from datetime import datetime, timedelta
from typing import Any

import orjson
import pytest
from redis import Redis
from sqlmodel import select

from producer import Producer, RequestHandle, Result
from shared.models import Batch, BatchState, Request, RequestState, utcnow
from shared.providers.local import LocalProvider
from shared.redis_layout import buffer_name, pending_ids
from shared.schemas import DEFAULT_PROVIDER
from tests.conftest import RedisFactory, drive_pipeline, force_claim
from tests.conftest import submit_requests as submit
from worker.batch_ownership import batch_ownership, batch_still_owns_requests
from worker.collection import collect_ready_batches
from worker.context import WorkerContext
from worker.fan_out import FanOut
from worker.lifecycle import submit_ready_batches
from worker.orphans import return_orphans
from worker.packing import pack_due_buffers
from worker.reconciler import DATA_LOST, reconcile
from worker.redis_checks import (
    UnsafeRedisConfig,
    accept_epoch,
    check_epoch,
    check_eviction_policy,
)

MESSAGES = [{"role": "user", "content": "Is 'great value' positive?"}]
BUF = buffer_name(DEFAULT_PROVIDER, "m-a")  # requests naming no provider
Snapshot = dict[bytes, tuple[bytes, int]]


def snapshot(ctx: WorkerContext) -> Snapshot:
    """Every key of the dataset (leases aside), as DUMP and remaining TTL."""
    taken: Snapshot = {}
    for key in ctx.redis.scan_iter(match=f"{ctx.keys.base}*"):
        if key.startswith(ctx.keys.lock("").encode()):
            continue
        dumped = ctx.redis.dump(key)
        if dumped is not None:
            taken[key] = (dumped, max(int(ctx.redis.pttl(key)), 0))
    return taken


def roll_back(ctx: WorkerContext, taken: Snapshot) -> None:
    """Make Redis exactly the dataset of ``taken``: what losing every later write does."""
    for key in list(ctx.redis.scan_iter(match=f"{ctx.keys.base}*")):
        if not key.startswith(ctx.keys.lock("").encode()):
            ctx.redis.delete(key)
    for key, (dumped, ttl) in taken.items():
        ctx.redis.restore(key, ttl, dumped, replace=True)


def drive(ctx: WorkerContext, rounds: int = 4) -> None:
    for _ in range(rounds):
        drive_pipeline(ctx)


def since(ctx: WorkerContext) -> datetime:
    """The periodic pass' window."""
    return utcnow() - timedelta(minutes=15)


def stream_results(ctx: WorkerContext) -> list[Result]:
    entries = ctx.redis.xrange(ctx.keys.callback("svc"))
    return [Result.from_json(fields[b"result"]) for _id, fields in entries]


def states(ctx: WorkerContext, ids: list[str]) -> collections.Counter[str]:
    pipe = ctx.redis.pipeline(transaction=False)
    for request_id in ids:
        pipe.hget(ctx.keys.request(request_id), "state")
    return collections.Counter(str(s, "utf-8") if s else "missing" for s in pipe.execute())


def local(ctx: WorkerContext) -> LocalProvider:
    provider = ctx.provider("local")
    assert isinstance(provider, LocalProvider)
    return provider


def custom_ids_sent(ctx: WorkerContext) -> collections.Counter[str]:
    """custom_id -> how many provider jobs were created over a file holding it."""
    store = local(ctx).store
    seen: collections.Counter[str] = collections.Counter()
    for job in store.list_jobs():
        for line in store.file_path(job.input_file_id).read_bytes().splitlines():
            seen[orjson.loads(line)["custom_id"]] += 1
    return seen


def test_results_lost_with_the_aof_tail_are_delivered_again_once(ctx: WorkerContext) -> None:
    # Given a batch the provider finished, and Redis as it was just before collecting
    ids = submit(ctx, 10)
    drive_pipeline(ctx, collect=False)
    before_collect = snapshot(ctx)
    collect_ready_batches(ctx)
    delivered = {r.request_id: r for r in stream_results(ctx)}
    assert sorted(delivered) == sorted(ids)

    # When Redis loses everything after that moment (the finishes and their deliveries)
    roll_back(ctx, before_collect)
    assert ctx.redis.xlen(ctx.keys.callback("svc")) == 0
    assert states(ctx, ids) == {"batched": 10}
    report = reconcile(ctx, since=since(ctx))

    # Then each result is on the stream exactly once again, as first delivered (metadata too)
    assert report.restored == 10
    again = stream_results(ctx)
    assert sorted(r.request_id for r in again) == sorted(ids)
    assert {r.request_id: r for r in again} == delivered
    assert states(ctx, ids) == {"done": 10}
    assert ctx.redis.hlen(ctx.keys.bodies(BUF)) == 0

    # And reconciling again changes nothing
    assert reconcile(ctx, since=since(ctx)).repairs == 0
    assert ctx.redis.xlen(ctx.keys.callback("svc")) == 10


def test_a_wiped_redis_is_noticed_and_results_come_back_from_the_record(
    ctx: WorkerContext, caplog: pytest.LogCaptureFixture
) -> None:
    # Given finished requests, and the record knowing this Redis' epoch
    ids = submit(ctx, 10)
    drive(ctx)
    assert check_epoch(ctx).known is None  # first sight
    assert not check_epoch(ctx).replaced

    # When Redis is wiped
    ctx.redis.flushdb()
    with caplog.at_level(logging.ERROR):
        check = check_epoch(ctx)

    # Then the loss is noticed and logged loudly
    assert check.replaced
    assert "REDIS DATA LOST" in caplog.text

    # And a full pass brings every result back from the record, once, with its metadata
    report = reconcile(ctx, since=utcnow() - timedelta(seconds=ctx.settings.result_ttl_seconds))
    accept_epoch(ctx, check)
    assert report.restored == 10
    results = stream_results(ctx)
    assert sorted(r.request_id for r in results) == sorted(ids)
    assert sorted(r.metadata["i"] for r in results if r.metadata) == list(range(10))
    producer = Producer(settings=ctx.settings, client=ctx.redis)
    assert {RequestHandle(i, producer).status() for i in ids} == {"completed"}
    assert not check_epoch(ctx).replaced
    assert reconcile(ctx, since=since(ctx)).repairs == 0
    assert ctx.redis.xlen(ctx.keys.callback("svc")) == 10


def unsent_batch(ctx: WorkerContext, n: int) -> tuple[list[str], int]:
    """Requests packed into a batch that could not be sent.

    Its file vanished and it cannot be rebuilt: it records no digest, as from an older version.
    """
    ids = submit(ctx, n)
    waiting = int(ctx.redis.hget(ctx.keys.buffers, BUF) or 0)
    (packed,) = pack_due_buffers(ctx, force=True)
    packed.path.unlink()
    with ctx.session() as session:
        batch = session.get(Batch, packed.id)
        assert batch is not None
        batch.file_sha256 = None
        session.add(batch)
        session.commit()
    submit_ready_batches(ctx)  # -> FAILED, outcome unsent: the collector requeues them all
    return ids, waiting


def test_a_result_that_expired_is_not_taken_for_lost_while_its_record_lagged(
    ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a one-minute result TTL, and a record that lags the delivery in Redis by 3 s (a
    # slow database, a large chunk)
    ctx.settings = ctx.settings.model_copy(update={"result_ttl_seconds": 60})
    record = FanOut._record

    def lagging_record(self: FanOut, *args: Any) -> None:
        time.sleep(3)
        record(self, *args)

    monkeypatch.setattr(FanOut, "_record", lagging_record)
    (request_id,) = submit(ctx, 1)
    drive_pipeline(ctx)
    assert ctx.redis.xlen(ctx.keys.callback("svc")) == 1

    # When its result expires from Redis as set, and the periodic reconcile runs just after
    expires_in = timedelta(milliseconds=int(ctx.redis.pttl(ctx.keys.request(request_id))))
    expired_at = ctx.now() + expires_in + timedelta(milliseconds=500)
    ctx.redis.delete(ctx.keys.request(request_id))
    monkeypatch.setattr(ctx, "now", lambda: expired_at)
    report = reconcile(ctx, since=expired_at - timedelta(minutes=15))

    # Then it is not taken for a result Redis lost: nothing is delivered a second time
    assert report.restored == 0
    assert ctx.redis.xlen(ctx.keys.callback("svc")) == 1


def test_a_lost_requeue_is_done_again(ctx: WorkerContext) -> None:
    # Given a batch whose requests the collector sent round again, and Redis from before
    ids, waiting = unsent_batch(ctx, 5)
    before_collect = snapshot(ctx)
    collect_ready_batches(ctx)
    assert states(ctx, ids) == {"pending": 5}

    # When Redis loses the requeue (requests still batched under the finished batch)
    roll_back(ctx, before_collect)
    assert states(ctx, ids) == {"batched": 5}
    report = reconcile(ctx, since=since(ctx))

    # Then they are back in their buffer, bytes and all, and go through once
    assert report.requeued == 5
    assert sorted(pending_ids(ctx.redis, ctx.keys, BUF)) == sorted(ids)
    assert int(ctx.redis.hget(ctx.keys.buffers, BUF) or 0) == waiting
    drive(ctx)
    assert sorted(r.request_id for r in stream_results(ctx)) == sorted(ids)
    assert {r.status for r in stream_results(ctx)} == {"completed"}
    assert custom_ids_sent(ctx) == dict.fromkeys(ids, 1)


def test_a_requeued_request_whose_data_redis_lost_fails_clearly(ctx: WorkerContext) -> None:
    # Given requeued requests, two of which Redis has lost outright and one lost its body
    ids, _ = unsent_batch(ctx, 5)
    before_collect = snapshot(ctx)
    collect_ready_batches(ctx)
    roll_back(ctx, before_collect)
    ctx.redis.delete(ctx.keys.request(ids[0]), ctx.keys.request(ids[1]))
    ctx.redis.hdel(ctx.keys.bodies(BUF), ids[2])

    # When the reconciler runs
    report = reconcile(ctx, since=since(ctx))

    # Then those three fail with redis_data_lost, recorded and delivered once; the rest go round
    assert (report.lost, report.requeued) == (3, 2)
    failed = {r.request_id: r for r in stream_results(ctx)}
    assert sorted(failed) == sorted(ids[:3])
    assert {r.error.code for r in failed.values() if r.error} == {DATA_LOST}
    with ctx.session() as session:
        rows = {r.id: r for r in session.exec(select(Request))}
    assert {rows[i].state for i in ids[:3]} == {RequestState.FAILED.value}
    assert {rows[i].error_code for i in ids[:3]} == {DATA_LOST}
    assert reconcile(ctx, since=since(ctx)).repairs == 0
    drive(ctx)
    results = stream_results(ctx)
    assert collections.Counter(r.request_id for r in results) == dict.fromkeys(ids, 1)


def test_a_lost_claim_is_taken_back_by_its_committed_batch(ctx: WorkerContext) -> None:
    # Given requests packed into a committed batch, and Redis from before the claim
    ids = submit(ctx, 10)
    before_claim = snapshot(ctx)
    (packed,) = pack_due_buffers(ctx)

    # When Redis loses the claim: the requests are pending in their buffer again
    roll_back(ctx, before_claim)
    assert states(ctx, ids) == {"pending": 10}
    report = reconcile(ctx, since=since(ctx))

    # Then the batch takes them back; nothing is left to pack twice
    assert report.reclaimed == 10
    assert states(ctx, ids) == {"batched": 10}
    assert pending_ids(ctx.redis, ctx.keys, BUF) == []
    assert int(ctx.redis.hget(ctx.keys.buffers, BUF) or 0) == 0
    assert pack_due_buffers(ctx, force=True) == []
    assert batch_still_owns_requests(ctx, packed.id)
    drive(ctx)
    assert collections.Counter(r.request_id for r in stream_results(ctx)) == dict.fromkeys(ids, 1)
    assert custom_ids_sent(ctx) == dict.fromkeys(ids, 1)


@pytest.mark.parametrize("first_state", ["packed", "submitted"])
def test_requests_offered_again_are_never_packed_into_a_second_batch(
    ctx: WorkerContext, first_state: str
) -> None:
    # Given a committed batch (only packed, or already created at the provider) whose claim
    # Redis lost, so that its requests are pending in their buffer again
    ids = submit(ctx, 10)
    before_claim = snapshot(ctx)
    (first,) = pack_due_buffers(ctx)
    if first_state == "submitted":
        submit_ready_batches(ctx)
    roll_back(ctx, before_claim)
    assert states(ctx, ids) == {"pending": 10}

    # When the aggregator claims them again, before any reconciler pass
    packed = pack_due_buffers(ctx, force=True)

    # Then no second batch is recorded: the batch that owns them took them back
    assert packed == []
    assert states(ctx, ids) == {"batched": 10}
    with ctx.session() as session:
        recorded = {b.id: b.state for b in session.exec(select(Batch))}
    assert recorded[first.id] == first_state
    assert set(recorded.values()) - {first_state} <= {BatchState.ABANDONED.value}

    # And every request runs in one provider job and is delivered once
    drive(ctx)
    assert custom_ids_sent(ctx) == dict.fromkeys(ids, 1)
    assert collections.Counter(r.request_id for r in stream_results(ctx)) == dict.fromkeys(ids, 1)
    with ctx.session() as session:
        rows = list(session.exec(select(Request)))
    assert {r.batch_id for r in rows} == {first.id}
    assert {r.state for r in rows} == {RequestState.COMPLETED.value}


def test_a_batch_whose_requests_another_batch_holds_is_never_sent(ctx: WorkerContext) -> None:
    # Given a committed batch whose requests Redis now files under another claim (a claim
    # lost, then the requests claimed again and that claim not yet committed)
    ids = submit(ctx, 10)
    before_claim = snapshot(ctx)
    (first,) = pack_due_buffers(ctx)
    roll_back(ctx, before_claim)
    result = force_claim(ctx, BUF, "other")
    assert result[0] == 10

    # When the submitter asks whether the batch still owns its requests
    # Then it does not, and it is given back unsent instead of being created
    assert not batch_still_owns_requests(ctx, first.id)
    with ctx.session() as session:
        batch = session.get(Batch, first.id)
    assert batch is not None and batch.state == BatchState.FAILED and batch.outcome == "unsent"
    submit_ready_batches(ctx)
    assert local(ctx).store.list_jobs() == []
    assert len(ids) == 10


def test_requests_of_a_forgotten_claim_return_to_their_buffer(ctx: WorkerContext) -> None:
    # Given requests claimed for a batch, and the claim's keys and list entry lost
    ids = submit(ctx, 5)
    waiting = int(ctx.redis.hget(ctx.keys.buffers, BUF) or 0)
    batch_id = "lost-claim"
    assert force_claim(ctx, BUF, batch_id)[0] == 5
    ctx.redis.delete(ctx.keys.claim_ids(batch_id), ctx.keys.claim(batch_id))
    ctx.redis.zrem(ctx.keys.claims, batch_id)

    # When the reconciler looks for orphans
    returned = return_orphans(ctx)

    # Then they are back in their buffer with their bytes; a second look finds none
    assert returned == 5
    assert states(ctx, ids) == {"pending": 5}
    assert int(ctx.redis.hget(ctx.keys.buffers, BUF) or 0) == waiting
    assert return_orphans(ctx) == 0


@pytest.mark.parametrize("policy", ["allkeys-lru", "allkeys-random"])
def test_an_evicting_redis_is_refused(own_redis: RedisFactory, policy: str) -> None:
    # Given a Redis that evicts any key under memory pressure
    server = own_redis(persistent=False, extra_args=("--maxmemory-policy", policy))
    client = Redis.from_url(server.url)

    # When the worker checks it / Then it refuses, naming the policy and the fix
    with pytest.raises(UnsafeRedisConfig, match=f"maxmemory-policy is {policy}.*noeviction"):
        check_eviction_policy(client)
    client.close()


def test_a_volatile_policy_is_warned_about_and_read_even_without_config(
    own_redis: RedisFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a managed-style Redis that refuses CONFIG and evicts keys with a TTL
    args = ("--maxmemory-policy", "volatile-lru", "--rename-command", "CONFIG", "")
    server = own_redis(persistent=False, extra_args=args)
    client = Redis.from_url(server.url)

    # When the worker checks it
    with caplog.at_level(logging.WARNING):
        policy = check_eviction_policy(client)

    # Then it reads the policy from INFO and warns
    assert policy == "volatile-lru"
    assert "maxmemory-policy is volatile-lru" in caplog.text
    client.close()


def test_noeviction_passes(own_redis: RedisFactory) -> None:
    server = own_redis(persistent=False)
    client = Redis.from_url(server.url)
    assert check_eviction_policy(client) == "noeviction"
    client.close()


def test_a_result_whose_time_to_live_ran_out_is_not_delivered_again(ctx: WorkerContext) -> None:
    # Given results delivered a while ago, whose Redis hashes then expired as designed
    ctx.settings = ctx.settings.model_copy(update={"result_ttl_seconds": 60})
    ids = submit(ctx, 3)
    drive(ctx)
    assert len(stream_results(ctx)) == 3
    with ctx.session() as session:
        for row in session.exec(select(Request)):
            row.finished_at = utcnow() - timedelta(seconds=120)
            session.add(row)
        session.commit()
    for request_id in ids:
        ctx.redis.delete(ctx.keys.request(request_id))

    # When the periodic pass runs
    report = reconcile(ctx, since=since(ctx))

    # Then nothing is restored or delivered again
    assert report.restored == 0
    assert len(stream_results(ctx)) == 3


def test_ownership_sorts_each_request_by_where_redis_holds_it(ctx: WorkerContext) -> None:
    # Given a batch of six requests in the record, which Redis holds in every way it can
    ids = [f"own{i}" for i in range(6)]
    with ctx.session() as session:
        session.add(
            Batch(id="b1", provider="local", model="m-a", state="packed", request_count=6, bytes=0)
        )
        for request_id in ids:
            session.add(Request(id=request_id, batch_id="b1", state="batched"))
        session.commit()
    held = {"own0": ("batched", "b1"), "own1": ("pending", ""), "own2": ("batched", "b2")}
    held |= {"own3": ("done", "b1"), "own5": ("batched", "b1")}  # own4: no hash at all
    for request_id, (state, batch) in held.items():
        ctx.redis.hset(ctx.keys.request(request_id), mapping={"state": state, "batch": batch})
    # When the check before creating the provider job looks
    with ctx.session() as session:
        batch = session.get(Batch, "b1")
    assert batch is not None
    ownership = batch_ownership(ctx, batch)
    # Then each request is where Redis has it, and the batch is not safe to send
    assert ownership.owned == ["own0", "own5"]
    assert ownership.pending == ["own1"]
    assert ownership.elsewhere == ["own2", "own3"]
    assert ownership.missing == ["own4"]
    assert not ownership.intact
