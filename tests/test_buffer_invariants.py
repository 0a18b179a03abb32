"""Property test: whatever order producers, the aggregator and the collector act in, every
request is in exactly one place, buffer byte counts match, and each outcome is delivered once.

Runs the real Lua scripts and packer against a real Redis, with random interleavings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from redis import Redis

from producer import IdempotencyConflict, Producer
from shared.db import finish_requests
from shared.redis_layout import buffer_name, pending_ids
from shared.schemas import DEFAULT_PROVIDER, LINE_OVERHEAD
from tests.conftest import make_settings
from worker.context import WorkerContext
from worker.packing import pack_buffer

MODELS = ("m-a", "m-b")


class BufferMachine(RuleBasedStateMachine):
    """Producers, the packer and the collector, interleaved at random."""

    redis_url = ""
    data_dir = Path()

    @initialize()
    def start(self) -> None:
        Redis.from_url(self.redis_url).flushdb()
        settings = make_settings(
            self.redis_url,
            self.data_dir / f"run-{id(self)}",
            max_batch_requests=4,
            max_wait_seconds=3600,
        )
        self.ctx = WorkerContext.create(settings)
        self.producer = Producer(settings=settings, client=self.ctx.redis)
        # Insertion-ordered, not sorted: ids are random, and hypothesis must draw the same
        # request for the same choices when it replays a run.
        self.ids: dict[str, None] = {}
        self.open_batches: dict[str, list[str]] = {}
        self.finished: set[str] = set()
        self.marked: set[str] = set()  # cancelled while in a batch
        self.with_queue: set[str] = set()

    def teardown(self) -> None:
        if hasattr(self, "ctx"):
            self.ctx.close()

    @rule(model=st.sampled_from(MODELS), n=st.integers(1, 6), key=st.integers(0, 8))
    def submit(self, model: str, n: int, key: int) -> None:
        requests: list[dict[str, Any]] = [
            {"model": model, "messages": [{"role": "user", "content": "x" * (i + 1)}]}
            for i in range(n)
        ]
        requests[0]["idempotency_key"] = f"key-{key}"  # repeats collapse onto one request
        requests[-1]["callback_queue"] = "svc"
        try:
            handles = self.producer.submit_many(requests)
        except IdempotencyConflict:
            return  # the key stands for a different request: nothing was stored
        for request, handle in zip(requests, handles, strict=True):
            if handle.id not in self.ids and "callback_queue" in request:
                self.with_queue.add(handle.id)
            self.ids[handle.id] = None

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        if not self.ids:
            return
        request_id = data.draw(st.sampled_from(list(self.ids)))
        before = self.producer.state(request_id)
        cancelled = self.producer.cancel(request_id)
        # Buffered: removed at once. In a batch: marked, reported cancelled when the batch
        # finishes (so it is finished then, with the rest). Finished: nothing to cancel.
        assert cancelled is (before not in ("completed", "failed", "cancelled"))
        if before == "pending":
            self.finished.add(request_id)
        elif before == "batched":
            self.marked.add(request_id)

    @rule(model=st.sampled_from(MODELS), force=st.booleans())
    def pack(self, model: str, force: bool) -> None:
        batch = pack_buffer(self.ctx, buffer_name(DEFAULT_PROVIDER, model), force=force)
        if batch is not None:
            ids = [line.split(b'"')[3].decode() for line in batch.path.read_bytes().splitlines()]
            assert len(ids) == batch.request_count
            self.open_batches[batch.id] = ids

    @rule(data=st.data())
    def collect(self, data: st.DataObject) -> None:
        if not self.open_batches:
            return
        batch_id = data.draw(st.sampled_from(list(self.open_batches)))
        ids = self.open_batches.pop(batch_id)
        again = data.draw(st.sets(st.sampled_from(ids)))
        keys, scripts = self.ctx.keys, self.ctx.scripts
        done = [i for i in ids if i not in again]
        # A request cancelled while batched is never sent round again: it ends cancelled.
        gone = again & self.marked
        args: list[Any] = [keys.base, 60, batch_id]
        for request_id in done:
            args += [request_id, "completed", f'{{"request_id":"{request_id}"}}']
        # Twice: a repeated collection must change nothing.
        for _ in range(2):
            if done:
                scripts.run("finish", [keys.buffers], args)
            if again:
                scripts.run(
                    "requeue", [keys.buffers], [keys.base, batch_id, "1", 60, *sorted(again)]
                )
        # And the record, as the collector keeps it (only a requeued row may be packed again).
        outcome = {"error_code": None, "error_message": None, "finished_at": None}
        rows = [
            {
                "id": request_id,
                "state": "cancelled"
                if request_id in gone
                else "requeued"
                if request_id in again
                else "completed",
                "prompt_tokens": 0,
                "completion_tokens": 0,
                "result": None,
                **outcome,
            }
            for request_id in ids
        ]
        with self.ctx.session() as session:
            finish_requests(session, batch_id, rows)
            session.commit()
        self.finished.update(done, gone)

    @invariant()
    def every_request_is_in_exactly_one_place(self) -> None:
        redis, keys = self.ctx.redis, self.ctx.keys
        pending = {
            request_id
            for model in MODELS
            for request_id in pending_ids(redis, keys, buffer_name(DEFAULT_PROVIDER, model))
        }
        batched = {i for ids in self.open_batches.values() for i in ids}
        assert not pending & batched and not pending & self.finished
        assert not batched & self.finished
        assert pending | batched | self.finished == set(self.ids)
        for request_id in self.ids:
            state = redis.hget(keys.request(request_id), "state")
            expected = (
                b"pending"
                if request_id in pending
                else b"batched"
                if request_id in batched
                else b"done"
            )
            assert state == expected, (request_id, state, expected)

    @invariant()
    def buffer_counts_match_what_waits(self) -> None:
        redis, keys = self.ctx.redis, self.ctx.keys
        for model in MODELS:
            buf = buffer_name(DEFAULT_PROVIDER, model)
            ids = pending_ids(redis, keys, buf)
            # What the producer weighed each request at: its batch line plus its metadata.
            sizes = sum(
                LINE_OVERHEAD
                + len(i)
                + redis.hstrlen(keys.bodies(buf), i)
                + redis.hstrlen(keys.request(i), "meta")
                for i in ids
            )
            assert int(redis.hget(keys.buffers, buf) or 0) == sizes
            assert int(redis.hget(keys.pending_counts, buf) or 0) == len(ids)
            # A buffer is listed while, and only while, something waits in it: the model
            # names producers send are unbounded, so a drained one must not stay listed.
            assert redis.hexists(keys.buffers, buf) is bool(ids)
            assert redis.hexists(keys.pending_counts, buf) is bool(ids)
            # The head of the list is the oldest waiting request (claims read its age there).
            head = redis.lindex(keys.pending(buf), 0)
            assert (head.decode() if head else None) == (ids[0] if ids else None)

    @invariant()
    def each_outcome_is_delivered_once(self) -> None:
        entries = self.ctx.redis.xrange(self.ctx.keys.callback("svc"))
        delivered = [e[1][b"result"] for e in entries]
        assert len(delivered) == len(set(delivered))
        assert len(delivered) == len(self.finished & self.with_queue)


def test_buffer_invariants_hold_under_any_interleaving(redis_url: str, tmp_path: Path) -> None:
    BufferMachine.redis_url = redis_url
    BufferMachine.data_dir = tmp_path
    run_state_machine_as_test(
        BufferMachine,
        settings=settings(
            max_examples=25,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
