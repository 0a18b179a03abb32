"""Memory: Redis bytes per pending request, and worker RSS on a ~100 MB batch.

(a) On an emptied Redis, N requests are submitted with submit_many and left pending; the
growth of INFO ``used_memory`` per request, less the body bytes the request stores, is what
batchbridge itself costs per waiting request. MEMORY USAGE of each kind of key splits it up.

(b) 2,000 requests of ~44 KB bodies, each with ~5 KB of metadata (a ~88 MB batch file, ~98 MB
counting the metadata the claim weighs), are packed in a fresh child, run through the local
provider, and collected in another fresh child; each child's peak RSS is the step's own. A
second pipeline collects 2,000 small requests whose metadata is at the default 16 KB limit,
the collector's worst case. A step that misses its target runs again (in a pipeline of its
own) with tracemalloc, and the notes name the allocation sites alive at its peak.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from redis import Redis

from bench._common import MODEL, REVIEW, SYSTEM_PROMPT, chat_request
from bench.cases.fanout import fill
from bench.harness import Bench, run_child
from bench.report import CaseResult

PENDING_FULL, PENDING_SMOKE = 50_000, 2_000
FILL_CHUNK = 5_000
TARGET_OVERHEAD_BYTES = 300.0
SAMPLE_KEYS = 1_000  # request hashes measured one by one with MEMORY USAGE

BIG_FULL, BIG_SMOKE = 2_000, 200
BODY_BYTES = 44_000
METADATA_BYTES = 5_000  # well under the 16 KB default limit; 2,000 of them keep the claim < 100 MB
SMALL_BODY_BYTES = 1_000
METADATA_LIMIT_BYTES = 16_000  # just under the default max_metadata_bytes (16,384)
BIG_QUEUE = "memory-big"
TARGET_RSS_MB = 250.0


def run(bench: Bench) -> CaseResult:
    """Measure (a) Redis overhead per pending request and (b) packer and collector RSS."""
    result = CaseResult("memory")
    redis_overhead(bench, result)
    bench.flush()
    big_batch_rss(bench, result)
    bench.flush()
    return result


# --- (a) Redis bytes per pending request ---------------------------------------------------


def redis_overhead(bench: Bench, result: CaseResult) -> None:
    """INFO used_memory growth per pending request, less its body; MEMORY USAGE breakdown."""
    from producer import Producer
    from shared.redis_layout import Keys, buffer_name
    from shared.schemas import DEFAULT_PROVIDER
    from shared.settings import Settings

    n = bench.size(PENDING_FULL, PENDING_SMOKE)
    overrides = bench.settings_overrides(bench.data_dir("memory-pending"))
    settings = Settings.load(**overrides)
    keys = Keys(settings.key_prefix)
    buf = buffer_name(DEFAULT_PROVIDER, MODEL)
    # Loads the scripts (FLUSHDB keeps them) so their cache is in both readings.
    with bench.client() as client:
        Producer(settings=settings, client=client).submit_many([chat_request(i) for i in range(10)])
        client.flushdb()
    before = settled_memory(bench)
    # The producer's connection is closed before the second reading: its query buffer (a
    # pipelined submit_many sends megabytes at once) is client memory, not the dataset's.
    ids = sorted(fill(bench, overrides, (chat_request(i) for i in range(n))))
    after = settled_memory(bench)
    with bench.client() as client:
        if int(client.llen(keys.pending(buf))) != n:
            raise AssertionError(f"expected {n} pending requests in {buf}")
        payload = mean_body_bytes(client, keys.bodies(buf), ids)
        parts = memory_breakdown(client, keys, buf, ids)
    per_request = (after["used_memory"] - before["used_memory"]) / n
    overhead = per_request - payload
    clients = (after["mem_clients_normal"] - before["mem_clients_normal"]) / n
    result.measure(
        "Redis bytes per pending request",
        per_request,
        "B",
        better="lower",
        detail=f"INFO used_memory delta / {n:,}; body payload {payload:.0f} B; "
        f"Redis {after['redis_version']}, allocator {after['mem_allocator']}",
    )
    result.measure(
        "Redis overhead per pending request",
        overhead,
        "B",
        better="lower",
        detail="bytes per request minus its body bytes; "
        + ", ".join(f"{name} {value:.0f}" for name, value in parts.items()),
    )
    result.target("Redis overhead per pending request", overhead, TARGET_OVERHEAD_BYTES, "max", "B")
    result.notes.append(
        f"Redis per pending request: {per_request:.0f} B for a {payload:.0f} B body = "
        f"{overhead:.0f} B overhead (client buffers moved {clients:+.1f} B/request). "
        "MEMORY USAGE split, per request: "
        + "; ".join(f"{name} {value:.1f} B" for name, value in parts.items())
    )
    if overhead > TARGET_OVERHEAD_BYTES:
        result.notes.append(overhead_explanation(parts, overhead, after["mem_allocator"]))
    result.data["pending"] = {
        "requests": n,
        "before": before,
        "after": after,
        "payload_bytes": payload,
        "bytes_per_request": per_request,
        "overhead_bytes": overhead,
        "breakdown_bytes_per_request": parts,
    }


def settled_memory(bench: Bench) -> dict[str, Any]:
    """INFO memory once background work is done: rehashing finished, idle buffers freed."""
    # serverCron rehashes the keyspace a millisecond at a time and clientsCron trims buffers
    # of idle clients; both run several times a second, so a short wait lets them finish.
    time.sleep(1.0)
    with bench.client() as client:
        info: dict[str, Any] = client.info("memory")
        server: dict[str, Any] = client.info("server")
    return {
        "used_memory": int(info["used_memory"]),
        "used_memory_dataset": int(info.get("used_memory_dataset", 0)),
        "mem_clients_normal": int(info.get("mem_clients_normal", 0)),
        "mem_allocator": str(info.get("mem_allocator", "?")),
        "redis_version": str(server.get("redis_version", "?")),
    }


def mean_body_bytes(client: Redis, bodies_key: str, ids: list[str]) -> float:
    """The mean length of the stored body JSON (HSTRLEN of the bodies hash)."""
    total = 0
    for start in range(0, len(ids), 5_000):
        pipe = client.pipeline(transaction=False)
        for request_id in ids[start : start + 5_000]:
            pipe.hstrlen(bodies_key, request_id)
        total += sum(int(n) for n in pipe.execute())
    return total / len(ids)


def memory_usage(client: Redis, key: str) -> int:
    """MEMORY USAGE of one key, every element counted (SAMPLES 0)."""
    return int(client.memory_usage(key, samples=0) or 0)


def memory_breakdown(client: Redis, keys: Any, buf: str, ids: list[str]) -> dict[str, float]:
    """Bytes per request of each kind of key, by MEMORY USAGE, beyond the body bytes."""
    n = len(ids)
    sample = ids[:: max(1, n // SAMPLE_KEYS)][:SAMPLE_KEYS]
    request_hash = sum(memory_usage(client, keys.request(i)) for i in sample) / len(sample)
    bodies = memory_usage(client, keys.bodies(buf)) / n
    payload = mean_body_bytes(client, keys.bodies(buf), sample)
    encoding = client.object("encoding", keys.request(sample[0])).decode()
    parts = {
        f"request hash ({encoding}, key and entry included)": request_hash,
        "bodies hash field, beyond the body bytes": bodies - payload,
        "pending list entry": memory_usage(client, keys.pending(buf)) / n,
        # The keyspace's bucket array (8 bytes a bucket, a power of two >= the keys), which
        # MEMORY USAGE of no key includes.
        "keyspace buckets": 8 * (1 << max(0, int(client.dbsize()) - 1).bit_length()) / n,
    }
    return {name: round(value, 1) for name, value in parts.items()}


def overhead_explanation(parts: dict[str, float], overhead: float, allocator: str) -> str:
    """What the overhead is made of, for a run that misses the target."""
    biggest = sorted(parts.items(), key=lambda item: item[1], reverse=True)
    attributed = sum(parts.values())
    return (
        f"Overhead {overhead:.0f} B misses the {TARGET_OVERHEAD_BYTES:.0f} B target; MEMORY "
        f"USAGE accounts for {attributed:.0f} B of it (allocator {allocator}; its size-class "
        "rounding of each body value is in the bodies-hash figure). Largest first: "
        + ", ".join(f"{name} {value:.0f} B" for name, value in biggest)
        + ". shared/redis_scripts/enqueue.lua writes three entries per pending request: a key "
        "of its own, bb:req:{id} (key name, object header, keyspace entry and a small "
        "ziplist/listpack of state, enq and the buffer's number), a field of bb:bodies:{buf} "
        "(hash-table entry plus the 20-character id again) and an entry of the list "
        "bb:pending:{buf} (the id a third time). What is left is mostly per-key and per-entry "
        "headers and the id's three copies (shorter ids would save on each)."
    )


# --- (b) worker RSS on a ~100 MB batch -----------------------------------------------------


def big_request(
    i: int, body_bytes: int = BODY_BYTES, metadata_bytes: int = METADATA_BYTES
) -> dict[str, Any]:
    """A chat request with a ~``body_bytes`` body and ``metadata_bytes`` of metadata."""
    review = REVIEW.format(n=i)
    words = (" ".join([review] * (body_bytes // len(review) + 1)))[: max(1, body_bytes - 400)]
    request: dict[str, Any] = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT[:300]},
            {"role": "user", "content": words},
        ],
        "max_tokens": 256,
        "callback_queue": BIG_QUEUE,
    }
    # Many small values rather than one long string: parsed at collect time, they cost
    # Python objects, which is what metadata costs a collector holding many of them.
    history = [
        {"sku": f"SKU-{j:05d}", "qty": j % 3 + 1, "cents": 1999 + j, "returned": j % 7 == 0}
        for j in range(60)
    ]
    metadata: dict[str, Any] = {
        "order": f"NW-{i:07d}",
        "customer": {"id": i, "segment": "retail", "country": "DE"},
        "history": history,
    }
    pad = metadata_bytes - len(orjson.dumps({**metadata, "note": ""}))
    metadata["note"] = "x" * max(0, pad)
    request["metadata"] = metadata
    return request


def big_batch_rss(bench: Bench, result: CaseResult) -> None:
    """Peak RSS of packer and collector on the big batch, and of a 16 KB-metadata collector."""
    n = bench.size(BIG_FULL, BIG_SMOKE)
    # What the targets are about: ~44 KB bodies with ~5 KB metadata, a ~100 MB claim.
    big = big_pipeline(bench, n, trace_pack=False, trace_collect=False)
    packed, collected = big["pack"], big["collect"]
    batch = packed["batches"][0]
    files = big["jobs"]["batches"][batch["id"]]
    result.measure(
        "packer peak RSS (~100 MB batch)",
        packed["peak_rss_mb"],
        "MB",
        better="lower",
        detail=f"{n:,} requests, {batch['bytes'] / 1e6:.1f} MB file "
        f"({big['claimed_bytes'] / 1e6:.1f} MB claimed with metadata) in "
        f"{packed['seconds']:.2f} s; {packed['rss_before_mb']:.0f} MB before packing",
    )
    result.measure(
        "collector peak RSS (~100 MB batch)",
        collected["peak_rss_mb"],
        "MB",
        better="lower",
        detail=f"{files['output_bytes'] / 1e6:.1f} MB output file, {METADATA_BYTES:,} B "
        f"metadata per result, in {collected['seconds']:.2f} s; "
        f"{collected['rss_before_mb']:.0f} MB before collecting",
    )
    # The collector holds a chunk of results, each with its metadata: metadata at the
    # default limit (16 KB) is its worst case; small bodies keep the claim one batch.
    limit = big_pipeline(
        bench,
        n,
        trace_pack=False,
        trace_collect=False,
        body_bytes=SMALL_BODY_BYTES,
        metadata_bytes=METADATA_LIMIT_BYTES,
    )
    result.measure(
        "collector peak RSS (16 KB metadata)",
        limit["collect"]["peak_rss_mb"],
        "MB",
        better="lower",
        detail=f"{n:,} results with {METADATA_LIMIT_BYTES:,} B metadata each (the default "
        f"limit is 16,384) in {limit['collect']['seconds']:.2f} s; "
        f"{limit['collect']['rss_before_mb']:.0f} MB before collecting",
    )
    checks = [
        ("packer peak RSS (~100 MB batch)", big, "pack", {}),
        ("collector peak RSS (~100 MB batch)", big, "collect", {}),
        (
            "collector peak RSS (16 KB metadata)",
            limit,
            "collect",
            {"body_bytes": SMALL_BODY_BYTES, "metadata_bytes": METADATA_LIMIT_BYTES},
        ),
    ]
    result.data["big_batch"] = big
    result.data["metadata_limit"] = limit
    for name, runs, step, sizes in checks:
        measured = runs[step]
        if result.target(name, measured["peak_rss_mb"], TARGET_RSS_MB, "max", "MB").passed:
            continue
        # Traced in a pipeline of its own: tracemalloc slows the step and adds memory of its
        # own, so the RSS is the untraced run's and the trace says where that memory went.
        traced = big_pipeline(
            bench, n, trace_pack=step == "pack", trace_collect=step == "collect", **sizes
        )
        result.data[f"traced: {name}"] = traced
        result.notes.append(f"{name}: " + describe_trace(step, measured, traced[step]["trace"]))


def big_pipeline(
    bench: Bench,
    n: int,
    *,
    trace_pack: bool,
    trace_collect: bool,
    body_bytes: int = BODY_BYTES,
    metadata_bytes: int = METADATA_BYTES,
) -> dict[str, Any]:
    """Fill, pack (child), run the job (child), collect (child); check the stream after."""
    from shared.redis_layout import Keys

    bench.flush()
    data_dir = bench.data_dir(f"memory-big-{time.monotonic_ns()}")
    overrides = bench.settings_overrides(data_dir)
    ids = fill_big(bench, overrides, n, body_bytes, metadata_bytes)
    keys = Keys(overrides.get("key_prefix", "bb"))
    with bench.client() as client:
        claimed = sum(int(v) for v in client.hvals(keys.buffers))
    packed = run_child(
        "bench.cases.fanout:pack_child", {"settings": overrides, "trace": trace_pack}
    )
    if len(packed["batches"]) != 1 or packed["batches"][0]["count"] != n:
        raise AssertionError(f"expected one batch of {n} requests, got {packed['batches']}")
    jobs = run_child(
        "bench.cases.fanout:run_jobs_child",
        {"settings": overrides, "line_error_rate": 0.0, "seed": 1},
    )
    collected = run_child(
        "bench.cases.fanout:collect_child",
        {
            "settings": overrides,
            "batch_id": packed["batches"][0]["id"],
            "warm_batch_id": packed["warm_batch_id"],
            "trace": trace_collect,
        },
    )
    with bench.client() as client:
        stream = keys.callback(BIG_QUEUE)
        if int(client.xlen(stream)) != n:
            raise AssertionError(f"{client.xlen(stream)} results on {stream}, expected {n}")
        # Every result carries its request's metadata back.
        ((_, fields),) = client.xrange(stream, count=1)
        first = orjson.loads(fields[b"result"])
        if first["request_id"] not in ids or len(orjson.dumps(first["metadata"])) < metadata_bytes:
            raise AssertionError("the results do not carry their metadata")
    return {"claimed_bytes": claimed, "pack": packed, "jobs": jobs, "collect": collected}


def fill_big(
    bench: Bench, overrides: dict[str, Any], n: int, body_bytes: int, metadata_bytes: int
) -> set[str]:
    """Submit the big requests 100 at a time (5 MB), so the filler itself stays small."""
    ids: set[str] = set()
    for start in range(0, n, 100):
        chunk = range(start, min(n, start + 100))
        ids |= fill(bench, overrides, (big_request(i, body_bytes, metadata_bytes) for i in chunk))
    return ids


def describe_trace(step: str, measured: dict[str, Any], trace: dict[str, Any] | None) -> str:
    """One note: the step's RSS and the Python allocation sites alive at its traced peak."""
    head = (
        f"{step} peak RSS {measured['peak_rss_mb']:.0f} MB ({measured['rss_before_mb']:.0f} MB "
        "before the step) misses the target"
    )
    if not trace:
        return head + "; no trace was taken"
    sites = "; ".join(
        f"{s['mb']:.1f} MB in {s['blocks']:,} blocks allocated at {s['allocated_at']}"
        + (f" via {' <- '.join(via)}" if (via := _callers(s)) else "")
        for s in trace["sites"][:6]
    )
    return (
        f"{head}. tracemalloc: Python allocations peak at {trace['traced_peak_mb']:.0f} MB; "
        f"at the snapshot nearest the peak ({trace['snapshot_traced_mb']:.0f} MB traced) the "
        f"biggest sites were: {sites}"
    )


def _callers(site: dict[str, Any]) -> list[str]:
    """The project frames that led to an allocation site, the site itself left out."""
    return [frame for frame in site["project_frames"] if frame != site["allocated_at"]]
