"""The counters ``finish.lua`` keeps as it delivers (``_terminal.lua``): one per outcome, and
each request's end-to-end latency in the smallest histogram bucket that holds it."""

from __future__ import annotations

from typing import Any

from shared.counters import LATENCY_BUCKETS
from shared.redis_layout import server_time_ms
from worker.context import WorkerContext

BATCH = "b-counters"
# Seconds each request has been waiting when it finishes, and the bucket it belongs in: well
# inside each bucket, so the time the script takes cannot move one across a bound.
WAITED = {
    "r-fast": (0.2, "1"),
    "r-four": (4.0, "5"),
    "r-six": (6.0, "15"),
    "r-hour": (3000.0, "3600"),
    "r-days": (2 * 86400.0, "+Inf"),
}


def given_batched(ctx: WorkerContext, request_id: str, enqueued_ms: int | None) -> None:
    fields: dict[str, Any] = {"state": "batched", "batch": BATCH, "cbq": "q"}
    if enqueued_ms is not None:
        fields["enq"] = enqueued_ms
    ctx.redis.hset(ctx.keys.request(request_id), mapping=fields)


def counters(ctx: WorkerContext) -> dict[str, int]:
    raw = ctx.redis.hgetall(ctx.keys.counters)
    return {k.decode(): int(v) for k, v in raw.items()}


def test_each_outcome_is_counted_once_and_its_latency_in_the_smallest_bucket_that_holds_it(
    ctx: WorkerContext,
) -> None:
    # Given batched requests submitted at known times, one whose hash has no submit time
    now = server_time_ms(ctx.redis)
    for request_id, (waited, _) in WAITED.items():
        given_batched(ctx, request_id, now - int(waited * 1000))
    given_batched(ctx, "r-rebuilt", None)
    # When the batch delivers them (one failed), twice: a repeat must count nothing
    args: list[Any] = [ctx.keys.base, 60, BATCH]
    for request_id in [*WAITED, "r-rebuilt"]:
        outcome = "failed" if request_id == "r-six" else "completed"
        args += [request_id, outcome, f'{{"request_id":"{request_id}"}}']
    for _ in range(2):
        ctx.scripts.run("finish", [ctx.keys.buffers], args)
    # Then each outcome is counted once, the request without a submit time in no bucket,
    # and every other one in exactly the bucket its wait falls in
    seen = counters(ctx)
    assert seen.pop("requests:completed") == 5
    assert seen.pop("requests:failed") == 1
    expected: dict[str, int] = {}
    for request_id, (_, le) in WAITED.items():
        field = f"lat:{'failed' if request_id == 'r-six' else 'completed'}:{le}"
        expected[field] = expected.get(field, 0) + 1
    sums = {k: seen.pop(k) for k in list(seen) if k.startswith("lat_ms:")}
    assert seen == expected
    assert all(le == "+Inf" or float(le) in LATENCY_BUCKETS for _, le in WAITED.values())
    # And the sums hold the waits in milliseconds (plus the moments the script took)
    waited_completed = sum(int(w * 1000) for r, (w, _) in WAITED.items() if r != "r-six")
    assert 0 <= sums["lat_ms:completed"] - waited_completed < 5_000
    assert 0 <= sums["lat_ms:failed"] - 6_000 < 5_000
