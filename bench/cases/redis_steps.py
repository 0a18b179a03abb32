"""Redis steps: the Redis CPU each step of a request's journey costs, one step at a time.

Every worker and producer of a fleet shares one Redis, which runs commands on one thread, so
Redis' CPU per request bounds what the whole fleet carries. The end-to-end case gives only the
sum. Here each step runs alone on the bench Redis, with nothing else using it, and ``INFO
cpu`` is read before and after it:

- submit: ``submit_many`` of 1,000 requests at a time (``enqueue.lua``);
- pack: the packer claiming every request into one batch (``claim.lua``) and what it reads;
- read meta/cx: the fan-out reading each request's metadata and cancel mark
  (``request_fields.lua``), 2,000 at a time as the collector does;
- deliver: ``finish.lua`` giving each request its outcome and its result a stream entry,
  2,000 at a time;
- consume: ``get_many(500)`` and ``ack_many`` until every result is read.

Celery's messages, batch leases, polls and webhooks are left out: they cost per batch or per
tick, not per request. The requests are 0.4 KB with a little metadata, spread over four
callback queues; the results are ~0.5 KB completions. Medians of the rounds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench._common import median, sized_request
from bench.cases.consume import COMPLETION
from bench.harness import Bench, redis_cpu_seconds
from bench.report import CaseResult

SIZE = 400
QUEUES = tuple(f"steps-{i}" for i in range(4))
ROUNDS = 3
SUBMIT_CHUNK = 1000
CONSUME_CHUNK = 500
STEPS = ("submit", "pack", "read meta/cx", "deliver", "consume")


def run(bench: Bench) -> CaseResult:
    """Each step's Redis CPU per request, over a few rounds of fresh requests."""
    result = CaseResult("redis_steps")
    n = bench.size(20_000, 2_000)
    rounds = [one_round(bench, n, i) for i in range(ROUNDS)]
    bench.flush()  # the last round's request hashes: a case leaves nothing behind
    per_step = {step: median([r[step] for r in rounds]) for step in STEPS}
    total = sum(per_step.values())
    for step in STEPS:
        result.measure(
            f"Redis CPU per request: {step}",
            per_step[step],
            "us",
            better="lower",
            detail=", ".join(f"{r[step]:.2f}" for r in rounds) + " us in the rounds",
        )
    result.measure(
        "Redis CPU per request: the five steps",
        total,
        "us",
        better="lower",
        detail=f"one Redis core carries at most {1e6 / total:,.0f} requests/s at this cost",
    )
    result.notes.append(
        f"{n:,} requests of {SIZE} B per round, {ROUNDS} rounds, each step alone on the bench "
        "Redis (INFO cpu before and after); Celery's messages, leases, polls and webhooks "
        "(per batch or per tick) are not in these steps, the end-to-end case counts them"
    )
    result.data = {"requests": n, "rounds": rounds}
    return result


def one_round(bench: Bench, n: int, index: int) -> dict[str, float]:
    """The five steps over ``n`` new requests: Redis CPU per request (us) of each."""
    from producer import CallbackQueue, Producer
    from shared.redis_layout import request_fields_args
    from shared.schemas import Result
    from worker.context import WorkerContext
    from worker.fan_out import CHUNK_BYTES, CHUNK_RESULTS, REQUEST_FIELDS
    from worker.packing import pack_due_buffers

    bench.flush()
    settings = bench.settings(bench.data_dir(f"redis-steps-{index}"), max_batch_requests=n)
    ctx = WorkerContext.create(settings)
    spent: dict[str, float] = {}

    def measured(step: str, work: Callable[[], Any]) -> Any:
        before = redis_cpu_seconds(ctx.redis)
        out = work()
        spent[step] = (redis_cpu_seconds(ctx.redis) - before) / n * 1e6
        return out

    try:
        requests = [
            {
                **sized_request(SIZE, i),
                "callback_queue": QUEUES[i % len(QUEUES)],
                "metadata": {"i": i},
            }
            for i in range(n)
        ]
        with Producer(settings=settings) as producer:
            ids = measured(
                "submit",
                lambda: [
                    h.id
                    for start in range(0, n, SUBMIT_CHUNK)
                    for h in producer.submit_many(requests[start : start + SUBMIT_CHUNK])
                ],
            )
        packed = measured("pack", lambda: pack_due_buffers(ctx, force=True))
        if [b.request_count for b in packed] != [n]:
            raise AssertionError(f"expected one batch of {n}, packed {packed}")
        batch_id = packed[0].id
        # As the collector applies outcomes: its chunk size, fields and byte budget.
        chunks = [ids[start : start + CHUNK_RESULTS] for start in range(0, n, CHUNK_RESULTS)]

        def read_fields() -> None:
            for chunk in chunks:
                args = request_fields_args(ctx.keys.base, chunk, REQUEST_FIELDS, CHUNK_BYTES)
                ctx.scripts.run("request_fields", [], args)

        measured("read meta/cx", read_fields)
        # Encoded before the step: the collector's Python work is not Redis'.
        results = {
            request_id: Result(
                request_id=request_id, status="completed", response=COMPLETION
            ).to_json()
            for request_id in ids
        }

        def deliver() -> int:
            finished = 0
            for chunk in chunks:
                args: list[Any] = [ctx.keys.base, settings.result_ttl_seconds, batch_id]
                for request_id in chunk:
                    args += [request_id, "completed", results[request_id]]
                finished += int(ctx.scripts.run("finish", [ctx.keys.buffers], args)[0])
            return finished

        if measured("deliver", deliver) != n:
            raise AssertionError("not every request was delivered")

        def consume() -> int:
            acked = 0
            for name in QUEUES:
                queue = CallbackQueue(name, settings=settings)
                try:
                    while deliveries := queue.get_many(CONSUME_CHUNK, timeout=0.01):
                        acked += queue.ack_many(deliveries)
                finally:
                    queue.close()
            return acked

        if measured("consume", consume) != n:
            raise AssertionError("not every result was consumed")
    finally:
        ctx.close()
    return spent
