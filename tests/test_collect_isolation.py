"""Collecting: one bad line or request never costs the rest of the batch its results."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlmodel import select

from producer import Producer, Result
from shared.models import Batch, Request
from shared.providers.local import LocalProvider
from tests.conftest import run_local_jobs
from tests.conftest import submit_requests as submit
from worker import fan_out, result_buckets
from worker.collection import collect_ready_batches
from worker.context import WorkerContext
from worker.lifecycle import submit_ready_batches
from worker.packing import pack_due_buffers
from worker.polling import poll_due_batches
from worker.reaper import reconcile_requeued_rows

MESSAGES = [{"role": "user", "content": "Is 'great value' positive?"}]
MAX_TOKENS = 2**31 - 1  # PostgreSQL integer: the record's token columns


def run_to_results(ctx: WorkerContext) -> tuple[Path, Path]:
    """Pack, submit and run the batch; the provider's (output, error) files, to tamper with."""
    pack_due_buffers(ctx)
    submit_ready_batches(ctx)
    run_local_jobs(ctx)
    provider = ctx.provider("local")
    assert isinstance(provider, LocalProvider)
    job = max(provider.store.list_jobs(), key=lambda j: j.created_at)
    assert job.output_file_id and job.error_file_id
    return provider.store.file_path(job.output_file_id), provider.store.file_path(job.error_file_id)


def collect(ctx: WorkerContext) -> list[str]:
    time.sleep(0.02)
    poll_due_batches(ctx)
    return collect_ready_batches(ctx)


def output_lines(path: Path) -> dict[str, dict[str, Any]]:
    return {line["custom_id"]: line for line in map(orjson.loads, path.read_bytes().splitlines())}


def write_lines(path: Path, lines: list[bytes | dict[str, Any]], end: bytes = b"\n") -> None:
    raw = [line if isinstance(line, bytes) else orjson.dumps(line) for line in lines]
    path.write_bytes(b"\n".join(raw) + end)


def stream(ctx: WorkerContext) -> dict[str, list[bytes]]:
    """Every result on the callback stream, by request id (effects, not what a reader saw)."""
    found: dict[str, list[bytes]] = {}
    for _id, fields in ctx.redis.xrange(ctx.keys.callback("svc")):
        raw = fields[b"result"]
        found.setdefault(Result.from_json(raw).request_id, []).append(raw)
    return found


def state(ctx: WorkerContext, request_id: str) -> bytes | None:
    value: bytes | None = ctx.redis.hget(ctx.keys.request(request_id), "state")  # type: ignore[assignment]
    return value


def delivered(ctx: WorkerContext) -> dict[str, Result]:
    return {request_id: Result.from_json(raw[0]) for request_id, raw in stream(ctx).items()}


def test_unreadable_lines_are_recorded_and_the_rest_of_the_batch_delivered(
    ctx: WorkerContext,
) -> None:
    # Given an output file with one line of each kind of damage, and a line for a stranger
    ids = submit(ctx)
    out, _ = run_to_results(ctx)
    lines = output_lines(out)
    good = [lines[i] for i in ids[4:]]
    bad_utf8 = orjson.dumps(lines[ids[0]]).replace(b'"custom_id"', b'"custom_id\xff"')
    not_json = orjson.dumps(lines[ids[1]])[:-1] + b"]"
    stranger = {**lines[ids[3]], "custom_id": "we-never-sent-this"}
    truncated = orjson.dumps(lines[ids[2]])[:40]
    write_lines(
        out,
        [
            bad_utf8,
            *good[:3],
            not_json,
            b"[1, 2]",
            b'{"no": "custom_id"}',
            stranger,
            *good[3:],
            truncated,
        ],
        end=b"",
    )

    # When the batch is collected
    assert len(collect(ctx)) == 1

    # Then every readable line is delivered, the stranger's never is, and the batch says why
    results = delivered(ctx)
    assert set(results) == set(ids[4:])
    assert {r.status for r in results.values()} == {"completed"}
    with ctx.session() as session:
        (batch,) = session.exec(select(Batch))
    assert batch.state == "finished" and batch.completed_count == 6
    error = batch.error or ""
    for kind in (
        "1 not valid UTF-8",
        "1 not JSON",
        "1 not a JSON object",
        "1 no custom_id",
        "1 truncated last line",
        "1 custom_ids not in this batch",
    ):
        assert kind in error, error
    # ...and the four requests without a readable line go round again (not executed)
    assert [state(ctx, i) for i in ids] == [b"pending"] * 4 + [b"done"] * 6


def test_odd_usage_is_delivered_as_sent_and_recorded_within_the_columns(
    ctx: WorkerContext,
) -> None:
    # Given results whose usage is not a dict, or holds counts that are not usable integers
    ids = submit(ctx)
    out, _ = run_to_results(ctx)
    lines = output_lines(out)
    odd: list[Any] = [
        [1, 2],
        "lots",
        {"prompt_tokens": "12", "completion_tokens": None},
        {"prompt_tokens": 10**15, "completion_tokens": 2**63},  # PostgreSQL integer overflows
        {"prompt_tokens": -5, "completion_tokens": True},
        {"prompt_tokens": 1e30, "completion_tokens": 7.0},
    ]
    for request_id, usage in zip(ids, odd, strict=False):
        lines[request_id]["response"]["body"]["usage"] = usage
    write_lines(out, list(lines.values()))

    # When the batch is collected
    assert len(collect(ctx)) == 1

    # Then every result is delivered, each with the usage it came with (when it is a dict)
    results = delivered(ctx)
    assert set(results) == set(ids) and {r.status for r in results.values()} == {"completed"}
    assert results[ids[0]].usage is None and results[ids[1]].usage is None
    assert results[ids[3]].usage == odd[3]
    # ...and the record holds only counts that fit its columns
    with ctx.session() as session:
        rows = {r.id: r for r in session.exec(select(Request))}
        (batch,) = session.exec(select(Batch))
    tokens = [(rows[i].prompt_tokens, rows[i].completion_tokens) for i in ids[:6]]
    assert tokens == [(0, 0), (0, 0), (0, 0), (MAX_TOKENS, MAX_TOKENS), (0, 0), (MAX_TOKENS, 7)]
    assert batch.state == "finished" and batch.completed_count == 10
    assert batch.prompt_tokens >= 2 * MAX_TOKENS


def test_a_success_line_wins_over_an_error_line_whatever_the_order(
    ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given requests with several lines each, spread over both files, many chunks and buckets
    monkeypatch.setattr(fan_out, "CHUNK_RESULTS", 2)
    monkeypatch.setattr(result_buckets, "BUCKET_LINES", 3)
    ids = submit(ctx)
    out, err = run_to_results(ctx)
    lines = output_lines(out)
    a, b, c, d = ids[:4]

    def failure(request_id: str, code: str) -> dict[str, Any]:
        return {"custom_id": request_id, "error": {"code": code, "message": f"{code}!"}}

    http_400 = {
        "custom_id": b,
        "response": {"status_code": 400, "body": {"error": {"message": "bad"}}},
    }
    second = {**lines[c], "response": {"status_code": 200, "body": {"id": "second"}}}
    # a: an error in the output file before its success; b: an OpenAI-style error first, its
    # success only in the error file; c: two successes; d: two errors, no success
    write_lines(
        out,
        [
            failure(a, "invalid_request"),
            http_400,
            *[lines[i] for i in ids[4:]],
            lines[a],
            lines[c],
            second,
            failure(d, "invalid_request"),
        ],
    )
    write_lines(err, [lines[b], failure(a, "server_error"), failure(d, "rate_limit")])

    # When the batch is collected
    assert len(collect(ctx)) == 1

    # Then each request got one result: a success wins over any error, the first success
    # over a later one, and the first error when there is no success
    assert {request_id: len(raw) for request_id, raw in stream(ctx).items()} == dict.fromkeys(
        ids, 1
    )
    results = delivered(ctx)
    assert results[a].status == results[b].status == results[c].status == "completed"
    assert results[c].response == lines[c]["response"]["body"]
    assert results[d].status == "failed" and results[d].error is not None
    assert results[d].error.code == "invalid_request"
    with ctx.session() as session:
        (batch,) = session.exec(select(Batch))
    assert (batch.completed_count, batch.failed_count) == (9, 1)


def test_results_are_applied_in_the_order_of_the_batch_file_not_the_providers(
    ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a provider that wrote the output in reverse order, and buckets of 3 lines
    monkeypatch.setattr(result_buckets, "BUCKET_LINES", 3)
    ids = submit(ctx)
    out, _ = run_to_results(ctx)
    lines = output_lines(out)
    write_lines(out, [lines[i] for i in reversed(ids)])
    recorded: list[list[str]] = []
    record = fan_out.finish_requests

    def spy(session: Any, batch_id: str, rows: Any) -> None:
        recorded.append([r["id"] for r in rows])
        record(session, batch_id, rows)

    monkeypatch.setattr(fan_out, "finish_requests", spy)

    # When the batch is collected
    assert len(collect(ctx)) == 1

    # Then the rows are recorded a bucket of neighbouring lines at a time, in file order
    # (SQLite rewrites a page per row when rows grow in random order), each result once
    with ctx.session() as session:
        line_of = dict(session.exec(select(Request.id, Request.line)).all())
    assert [sorted(line_of[i] // 3 for i in call) for call in recorded] == [
        [0, 0, 0],
        [1, 1, 1],
        [2, 2, 2],
        [3],
    ]
    assert {request_id: len(raw) for request_id, raw in stream(ctx).items()} == dict.fromkeys(
        ids, 1
    )


def test_a_result_that_cannot_be_encoded_fails_only_its_request(ctx: WorkerContext) -> None:
    # Given a request whose stored metadata nests deeper than the result encoder goes, one
    # whose metadata is not JSON, and one whose response nests too deep
    ids = submit(ctx)
    deep = b'{"a":' * 300 + b"1" + b"}" * 300
    ctx.redis.hset(ctx.keys.request(ids[0]), "meta", deep)
    ctx.redis.hset(ctx.keys.request(ids[1]), "meta", b"{not json")
    out, _ = run_to_results(ctx)
    lines = output_lines(out)
    lines[ids[2]]["response"]["body"]["extra"] = orjson.loads(deep)
    # (orjson cannot write it either; the standard library's encoder goes deeper)
    write_lines(out, [json.dumps(line).encode() for line in lines.values()])

    # When the batch is collected
    assert len(collect(ctx)) == 1

    # Then those three fail with the reason, and the rest of the chunk is delivered
    results = delivered(ctx)
    assert set(results) == set(ids)
    for request_id in ids[:3]:
        failed = results[request_id]
        assert failed.status == "failed" and failed.error is not None
        assert failed.error.code == "result_encoding" and "encoded" in failed.error.message
        assert failed.response is None
    assert results[ids[0]].metadata is None and results[ids[2]].metadata == {"i": 2}
    assert all(results[i].status == "completed" for i in ids[3:])
    assert all(results[i].metadata == {"i": n} for n, i in enumerate(ids) if n > 2)
    with ctx.session() as session:
        row = session.get(Request, ids[0])
    assert row is not None and (row.state, row.error_code) == ("failed", "result_encoding")


def test_the_record_keeps_each_final_result_exactly_as_delivered(ctx: WorkerContext) -> None:
    # Given a batch with a success, a permanent failure and a retryable failure
    ids = submit(ctx)
    out, err = run_to_results(ctx)
    lines = output_lines(out)
    kept = [lines[i] for i in ids[2:]]
    write_lines(out, kept)
    write_lines(
        err,
        [
            {"custom_id": ids[0], "error": {"code": "invalid_request", "message": "no"}},
            {"custom_id": ids[1], "error": {"code": "rate_limit", "message": "later"}},
        ],
    )

    # When it is collected
    assert len(collect(ctx)) == 1

    # Then each final result's row holds the very bytes put on the callback stream, and the
    # request going round again holds none
    on_stream = stream(ctx)
    with ctx.session() as session:
        rows = {r.id: r for r in session.exec(select(Request))}
    assert set(on_stream) == set(ids) - {ids[1]}
    for request_id, (raw,) in on_stream.items():
        assert rows[request_id].result is not None
        assert rows[request_id].result.encode() == raw
    assert rows[ids[1]].state == "requeued" and rows[ids[1]].result is None
    assert Result.from_json(rows[ids[0]].result or "").error is not None


def test_a_requeued_request_cancelled_by_its_producer_keeps_that_result_too(
    ctx: WorkerContext,
) -> None:
    # Given a request sent round again after a retryable line error, then cancelled
    ids = submit(ctx)
    out, err = run_to_results(ctx)
    lines = output_lines(out)
    write_lines(out, [lines[i] for i in ids[1:]])
    write_lines(err, [{"custom_id": ids[0], "error": {"code": "rate_limit", "message": "wait"}}])
    assert len(collect(ctx)) == 1
    assert Producer(settings=ctx.settings, client=ctx.redis).cancel(ids[0])

    # When the reaper reconciles the record
    assert reconcile_requeued_rows(ctx) == 1

    # Then the row holds the cancelled result exactly as it was delivered
    (raw,) = stream(ctx)[ids[0]]
    with ctx.session() as session:
        row = session.get(Request, ids[0])
    assert row is not None and row.state == "cancelled"
    assert row.result is not None and row.result.encode() == raw


def test_a_nul_in_a_provider_error_message_does_not_stall_the_batch(ctx: WorkerContext) -> None:
    # Given an error line whose message holds U+0000 (PostgreSQL text cannot store it)
    ids = submit(ctx)
    out, _ = run_to_results(ctx)
    lines = output_lines(out)
    bad = {"custom_id": ids[0], "error": {"code": "invalid_request", "message": "bad: a\u0000b"}}
    write_lines(out, [bad, *[lines[i] for i in ids[1:]]])

    # When the batch is collected
    collect(ctx)

    # Then it finished, with every result delivered once and the message kept readable
    with ctx.session() as session:
        batch = session.exec(select(Batch)).one()
        row = session.get(Request, ids[0])
    assert batch.state == "finished"
    assert row is not None and row.error_message == "bad: a\ufffdb"
    assert {request_id: len(raw) for request_id, raw in stream(ctx).items()} == dict.fromkeys(
        ids, 1
    )


def test_a_chunks_metadata_is_read_before_the_previous_chunk_is_delivered(
    ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a batch of 10 finished requests, applied 4 at a time, and Redis logging every
    # command it runs, in the order it runs them
    monkeypatch.setattr(fan_out, "CHUNK_RESULTS", 4)
    ids = submit(ctx)
    run_to_results(ctx)
    names = {ctx.scripts.sha(name): name for name in ("request_fields", "finish")}
    for name in names.values():
        ctx.scripts.load(name)  # so no call is logged twice (NOSCRIPT, then loaded and run)
    threshold = ctx.redis.config_get("slowlog-log-slower-than")["slowlog-log-slower-than"]
    ctx.redis.config_set("slowlog-log-slower-than", 0)
    ctx.redis.slowlog_reset()
    try:
        # When it is collected
        assert len(collect(ctx)) == 1
        log = ctx.redis.slowlog_get(10_000)
    finally:
        ctx.redis.config_set("slowlog-log-slower-than", threshold)
        ctx.redis.slowlog_reset()
    # Then Redis read each chunk's metadata before it ran the previous chunk's delivery,
    # rather than behind it, and delivered every result once
    ran = []
    for entry in reversed(log):  # the newest first in SLOWLOG GET
        words = entry["command"].split()
        if words[0].upper() == b"EVALSHA" and words[1].decode() in names:
            ran.append(names[words[1].decode()])
    assert ran == [
        "request_fields",
        "request_fields",
        "finish",
        "request_fields",
        "finish",
        "finish",
    ]
    assert {request_id: len(raw) for request_id, raw in stream(ctx).items()} == dict.fromkeys(
        ids, 1
    )
