"""Floor: the end-to-end journey done bare, with none of batchbridge's guarantees.

Each request takes the same path as in the end-to-end case, by the fewest operations that can
carry it: one pipelined ``RPUSH`` of its batch line, ``LPOP`` by the thousand into a JSONL
file, the local provider's echo engine over that file, one pipelined ``XADD`` of its result,
and ``XREADGROUP`` + ``XACK`` + ``XDEL`` by the 500. No request state, no buffers per model,
no exactly-once, no cancel or webhook, no SQL; then, separately, the least a SQL record can
cost (one row inserted when packed, updated with its outcome when collected) and the least
request state a pipeline that delivers each result once must keep (a write per transition and
a test-and-set before delivery).

Every step's CPU (this process and Redis) is summed per request, as the stages' ceiling does
for ours: ``cores / sum`` is the most any pipeline doing this work could carry on this
machine, set against the pipelined ``RPUSH`` of the same payload that the end-to-end target
is judged by.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import orjson
from redis import Redis

from bench._common import median, sized_request
from bench.cases.end_to_end import rpush_rate
from bench.harness import Bench, redis_cpu_seconds
from bench.report import CaseResult
from shared.providers.local.engines import EchoEngine

SIZE = 400  # the end-to-end case's payload
PIPELINE = 1000
READ = 500
QUEUE, STREAM, GROUP = "floor:pending", "floor:results", "floor"


def _cpu(client: Redis, step: Callable[[], int]) -> tuple[float, int]:
    """Run ``step``: the CPU seconds it cost here and in Redis, and what it counted."""
    cpu, redis_cpu = time.process_time(), redis_cpu_seconds(client)
    count = step()
    return time.process_time() - cpu + redis_cpu_seconds(client) - redis_cpu, count


class BarePipeline:
    """One round of the bare journey for ``n`` requests, step by step, in ``folder``."""

    def __init__(self, client: Redis, folder: Path, n: int) -> None:
        self.client, self.folder, self.n = client, folder, n
        self.batch = folder / "batch.jsonl"
        self.output = folder / "output.jsonl"
        self.bodies = [sized_request(SIZE, i) for i in range(n)]

    def enqueue(self) -> int:
        """Pipelined RPUSH of each batch line, its body encoded here as a producer does."""
        pipe = self.client.pipeline(transaction=False)
        for i, body in enumerate(self.bodies):
            line = {"custom_id": f"{i:032x}", "method": "POST", "url": "/v1/chat/completions"}
            pipe.rpush(QUEUE, orjson.dumps({**line, "body": body}))
            if len(pipe) >= PIPELINE:
                pipe.execute()
        pipe.execute()
        return int(self.client.llen(QUEUE))

    def pack(self) -> int:
        """LPOP the lines by the thousand into one JSONL file."""
        count = 0
        with open(self.batch, "wb") as out:
            while lines := self.client.lpop(QUEUE, PIPELINE):
                out.write(b"\n".join(lines) + b"\n")  # type: ignore[arg-type]
                count += len(lines)  # type: ignore[arg-type]
        return count

    def provide(self) -> int:
        """The local provider's echo engine over the file: one output line per input line."""
        engine, count = EchoEngine(), 0
        with open(self.batch, "rb") as lines, open(self.output, "wb") as out:
            for raw in lines:
                line = orjson.loads(raw)
                body = engine.complete(line["body"], line["custom_id"])
                response = {"status_code": 200, "body": body}
                out.write(orjson.dumps({"custom_id": line["custom_id"], "response": response}))
                out.write(b"\n")
                count += 1
        return count

    def fan_out(self) -> int:
        """Each output line's result onto the callback stream, pipelined."""
        self.client.xgroup_create(STREAM, GROUP, id="$", mkstream=True)
        pipe = self.client.pipeline(transaction=False)
        with open(self.output, "rb") as lines:
            for raw in lines:
                line = orjson.loads(raw)
                result = {"request_id": line["custom_id"], "status": "completed"}
                result["response"] = line["response"]["body"]
                pipe.xadd(STREAM, {"result": orjson.dumps(result)})
                if len(pipe) >= PIPELINE:
                    pipe.execute()
        pipe.execute()
        return int(self.client.xlen(STREAM))

    def consume(self) -> int:
        """XREADGROUP COUNT 500, then XACK + XDEL of what was read, until the stream is empty."""
        count = 0
        while reply := self.client.xreadgroup(GROUP, "c", {STREAM: ">"}, count=READ):
            ids = [entry_id for entry_id, _fields in reply[0][1]]  # type: ignore[index]
            if not ids:
                break
            pipe = self.client.pipeline(transaction=True)
            pipe.xack(STREAM, GROUP, *ids)
            pipe.xdel(STREAM, *ids)
            acked, _ = pipe.execute()
            count += int(acked)
        self.client.delete(STREAM)
        return count

    def state(self) -> int:
        """The least request state: a write per transition, a test-and-set before delivery.

        A request is marked pending when submitted and batched when packed; when its result
        comes back a test-and-set (``HSETNX``) claims its one delivery (the ``XADD`` that
        would follow is counted in ``fan_out``): without it, a result read twice would be
        delivered twice. Then the state is dropped, as an expiry would. Each pass is one
        script call per 1,000 requests, the cheapest way found to write many small keys.
        No cancel, metadata, counters or webhooks.
        """
        ids = [f"{i:032x}" for i in range(self.n)]
        script = self.client.register_script(_STATE_SCRIPT)
        changed = {"pending": 0, "batched": 0, "done": 0, "drop": 0}
        for step in changed:
            for start in range(0, self.n, PIPELINE):
                changed[step] += int(script(args=[step, *ids[start : start + PIPELINE]]))
        if len(set(changed.values())) != 1:
            raise AssertionError(f"request state transitions disagree: {changed}")
        return changed["done"]

    def record(self) -> int:
        """The least a SQL record costs: a row per request when packed, its outcome when done."""
        path = self.folder / "record.sqlite3"
        path.unlink(missing_ok=True)
        db = sqlite3.connect(path)
        try:
            db.execute(
                "CREATE TABLE requests (id TEXT PRIMARY KEY, batch_id TEXT, state TEXT, "
                "result TEXT, finished_at REAL)"
            )
            with open(self.batch, "rb") as lines:
                ids = [orjson.loads(raw)["custom_id"] for raw in lines]
            db.executemany(
                "INSERT INTO requests (id, batch_id, state) VALUES (?, 'b', 'batched')",
                ((i,) for i in ids),
            )
            db.commit()
            now = time.time()
            with open(self.output, "rb") as lines:
                rows = [
                    (raw.rstrip(b"\n").decode(), now, orjson.loads(raw)["custom_id"])
                    for raw in lines
                ]
            db.executemany(
                "UPDATE requests SET state = 'completed', result = ?, finished_at = ? WHERE id = ?",
                rows,
            )
            db.commit()
            (count,) = db.execute(
                "SELECT count(*) FROM requests WHERE result IS NOT NULL"
            ).fetchone()
            return int(count)
        finally:
            db.close()


STEPS = ("enqueue", "pack", "provide", "fan_out", "consume")
# ARGV[1]: the transition (pending, batched, done or drop), ARGV[2..]: request ids. Pending
# and batched set the state; done claims the delivery once; drop deletes. Returns how many
# changed.
_STATE_SCRIPT = """
local step, n = ARGV[1], 0
for i = 2, #ARGV do
  local key = 'floor:req:' .. ARGV[i]
  if step == 'done' then
    n = n + redis.call('HSETNX', key, 'done', 1)
  elseif step == 'drop' then
    n = n + redis.call('DEL', key)
  else
    redis.call('HSET', key, 'state', step)
    n = n + 1
  end
end
return n
"""


def run(bench: Bench) -> CaseResult:
    """Rounds of the bare journey: each step's median CPU per request, and the ceilings."""
    result = CaseResult("floor")
    n, rounds = bench.size(50_000, 2_000), bench.size(3, 1)
    client = bench.client()
    bare = BarePipeline(client, bench.data_dir("floor"), n)
    extras = ("record", "state")
    cpu: dict[str, list[float]] = {name: [] for name in (*STEPS, *extras)}
    rpush = rpush_rate(bench, n)  # the end-to-end case's baseline, the same payload
    try:
        for _ in range(rounds):
            for name in (*STEPS, *extras):
                spent, count = _cpu(client, getattr(bare, name))
                if count != n:
                    raise AssertionError(f"bare {name} handled {count} of {n} requests")
                cpu[name].append(spent / n * 1e6)
    finally:
        client.flushdb()
        client.close()
    us: dict[str, float] = {name: median(values) for name, values in cpu.items()}
    cores = os.cpu_count() or 1
    path = sum(us[name] for name in STEPS)
    parts = ", ".join(f"{name} {us[name]:.1f}" for name in STEPS)
    recorded, stateful = path + us["record"], path + us["record"] + us["state"]
    for label, total, detail in (
        ("bare journey", path, parts),
        ("bare journey + SQL record", recorded, f"{parts}, record {us['record']:.1f}"),
        (
            "bare journey + SQL record + request state",
            stateful,
            f"{parts}, record {us['record']:.1f}, state {us['state']:.1f}",
        ),
    ):
        result.measure(
            f"ceiling of the {label}",
            cores / total * 1e6,
            "req/s",
            baseline="pipelined RPUSH x1000",
            baseline_value=rpush,
            detail=f"{cores} cores / {total:.1f} us of CPU per request (this process and "
            f"Redis, medians of {rounds} rounds of {n:,}): {detail}",
        )
    result.data.update(
        requests=n,
        rounds=rounds,
        cpu_us=cpu,
        median_us=us,
        rpush_rate=rpush,
        ceiling=cores / path * 1e6,
        ceiling_with_record=cores / recorded * 1e6,
        ceiling_with_state=cores / stateful * 1e6,
    )
    return result
