"""Scenarios for the local provider: store, validation, echo engine, runner and provider."""

from __future__ import annotations

import random
import re
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from shared.providers.base import BatchProvider, ProviderBatchStatus, ProviderError
from shared.providers.local import (
    DRY_RUN_FINGERPRINT,
    BatchJob,
    BucketShuffler,
    EchoEngine,
    JobStatus,
    LineError,
    LocalProvider,
    LocalStore,
    NotFound,
    get_engine,
    run_job,
    validate_input_file,
)
from shared.providers.local.faults import Faults

MODEL = "meta-llama/Llama-3.3-70B-Instruct-Turbo"
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def request(
    custom_id: str, text: str = "classify: the cat sat on the mat", **body: Any
) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a classifier."},
            {"role": "user", "content": text},
        ],
        "max_tokens": 16,
    }
    fields.update(body)
    return {"custom_id": custom_id, "body": fields}


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> Path:
    with open(path, "wb") as fh:
        for record in records:
            fh.write(orjson.dumps(record) + b"\n")
    return path


def write_lines(path: Path, lines: Iterable[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, "rb") as fh:
        return [orjson.loads(line) for line in fh if line.strip()]


def make_requests(n: int, prefix: str = "req") -> list[dict[str, Any]]:
    return [request(f"{prefix}-{i}", f"item {i}: is this spam or ham?") for i in range(n)]


def results(provider: LocalProvider, batch_id: str, tmp_path: Path) -> tuple[list[Any], list[Any]]:
    batch = provider.get_batch(batch_id)
    assert batch.output_file_id is not None
    assert batch.error_file_id is not None
    out, err = tmp_path / f"{batch_id}.out", tmp_path / f"{batch_id}.err"
    provider.download_file(batch.output_file_id, out)
    provider.download_file(batch.error_file_id, err)
    return read_jsonl(out), read_jsonl(err)


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


@pytest.fixture
def provider(store: LocalStore) -> LocalProvider:
    return LocalProvider(store)


def submit(provider: LocalProvider, path: Path, model: str = MODEL) -> str:
    return provider.create_batch(provider.upload_file(path), model=model).id


# Happy path


def test_upload_create_run_completes_with_every_line_once_and_shuffled(tmp_path: Path) -> None:
    # Given a provider that runs each batch inline as soon as it is created
    store = LocalStore(tmp_path / "store")
    provider = LocalProvider(store, dispatch=lambda job_id: _run(store, job_id))
    assert isinstance(provider, BatchProvider)
    inputs = make_requests(300)
    path = write_jsonl(tmp_path / "in.jsonl", inputs)

    # When a batch is uploaded and created
    created = provider.create_batch(provider.upload_file(path), model=MODEL)

    # Then it completed, and every custom_id appears exactly once across output and error files
    batch = provider.get_batch(created.id)
    assert batch.status is ProviderBatchStatus.COMPLETED
    assert batch.raw_status == "COMPLETED"
    assert batch.progress == 100.0
    assert batch.model == MODEL
    assert batch.completed_at is not None
    out, err = results(provider, batch.id, tmp_path)
    assert err == []
    seen = Counter(line["custom_id"] for line in out + err)
    assert seen == Counter(r["custom_id"] for r in inputs)
    # And the output is in Together's format, in a different order than the input
    assert [line["custom_id"] for line in out] != [r["custom_id"] for r in inputs]
    for line in out:
        assert re.fullmatch(r"br_[A-Za-z0-9_-]{43}", line["id"])
        assert line["response"]["status_code"] == 200
        assert line["response"]["body"]["object"] == "chat.completion"


def _run(store: LocalStore, job_id: str) -> None:
    run_job(store, job_id, EchoEngine())


def test_echo_output_is_a_deterministic_dry_run(
    tmp_path: Path, store: LocalStore, provider: LocalProvider
) -> None:
    # Given the same input file submitted as two separate batches
    path = write_jsonl(tmp_path / "in.jsonl", make_requests(20))
    first, second = submit(provider, path), submit(provider, path)

    # When both run with different shuffles
    run_job(store, first, EchoEngine(), shuffle_seed=1)
    run_job(store, second, EchoEngine(), shuffle_seed=2)

    # Then each answer says it is a dry run of the requested model
    out_a, _ = results(provider, first, tmp_path)
    out_b, _ = results(provider, second, tmp_path)
    body = out_a[0]["response"]["body"]
    assert body["model"] == MODEL
    assert body["system_fingerprint"] == DRY_RUN_FINGERPRINT
    assert body["dry_run"] is True
    assert body["choices"][0]["message"]["content"].startswith("item ")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0
    assert 0 < usage["completion_tokens"] <= 16
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # And identical requests give identical bodies across the two batches
    by_id_a = {line["custom_id"]: line["response"]["body"] for line in out_a}
    by_id_b = {line["custom_id"]: line["response"]["body"] for line in out_b}
    assert by_id_a == by_id_b


def test_echo_respects_max_tokens_and_rejects_bad_messages() -> None:
    # Given the echo engine
    engine = get_engine("echo")

    # When max_tokens is smaller than the echo, then the answer is cut and says so
    body = request("a", "one two three four five", max_tokens=2)["body"]
    answer: Any = engine.complete(body, "a")
    assert answer["choices"][0]["message"]["content"] == "one two"
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 2
    # When messages is missing, empty or not a list, then the line fails, not retryably
    bad_messages: list[object] = [None, [], "hello"]
    for messages in bad_messages:
        bad: dict[str, object] = {"model": MODEL, "messages": messages}
        with pytest.raises(LineError) as info:
            engine.complete(bad, "b")
        assert info.value.code == "invalid_request"
        assert info.value.retryable is False


def test_unknown_engine_name_lists_the_allowed_ones() -> None:
    # When an unknown engine is asked for, then the error names the allowed engines
    with pytest.raises(ValueError, match="echo"):
        get_engine("gpt-5")


# Validation


VALID = orjson.dumps(request("ok-1")).decode()
INVALID_FILES: dict[str, tuple[list[str], str]] = {
    "bad json": ([VALID, '{"custom_id": "x", "body": '], r"line 2: not valid JSON"),
    "not an object": (["[1, 2]"], r"line 1: not a JSON object"),
    "missing custom_id": (['{"body": {"model": "m"}}'], r"line 1: missing custom_id"),
    "missing body": (['{"custom_id": "a"}'], r"line 1: missing body"),
    "body not object": (['{"custom_id": "a", "body": 3}'], r"line 1: body must be a JSON object"),
    "no model": (['{"custom_id": "a", "body": {}}'], r"line 1: body.model must be"),
    "duplicate custom_id": (
        [VALID, orjson.dumps(request("x")).decode(), VALID],
        r"line 3: duplicate custom_id 'ok-1' \(first used on line 1\)",
    ),
    "custom_id of 65 chars": (
        [orjson.dumps(request("c" * 65)).decode()],
        r"line 1: custom_id is 65 characters, over the limit of 64",
    ),
    "two models": (
        [VALID, orjson.dumps(request("b", model="other/model")).decode()],
        r"line 2: model 'other/model' differs from .*; a batch file must use exactly one model",
    ),
    "empty file": (["", "  "], r"file has no requests"),
}


@pytest.mark.parametrize("case", sorted(INVALID_FILES))
def test_invalid_file_fails_the_batch_with_a_message_naming_the_rule(
    case: str, tmp_path: Path, store: LocalStore, provider: LocalProvider
) -> None:
    # Given an input file breaking one rule
    lines, expected = INVALID_FILES[case]
    batch_id = provider.create_batch(
        provider.upload_file(write_lines(tmp_path / "in.jsonl", lines)), model=MODEL
    ).id

    # When the batch runs
    job = run_job(store, batch_id, EchoEngine())

    # Then it failed with a message naming the line and the rule, and produced no files
    assert job.status is JobStatus.FAILED
    assert job.error is not None
    assert re.search(expected, job.error), job.error
    assert job.output_file_id is None
    batch = provider.get_batch(batch_id)
    assert batch.status is ProviderBatchStatus.FAILED
    assert batch.error == job.error


def test_a_64_char_custom_id_and_blank_lines_are_accepted(tmp_path: Path) -> None:
    # Given a file whose custom_id is exactly 64 characters and has blank lines
    path = write_lines(tmp_path / "in.jsonl", [orjson.dumps(request("c" * 64)).decode(), ""])

    # When it is validated, then it passes and reports the model and one request
    result = validate_input_file(path)
    assert (result.ok, result.model, result.line_count, result.error) == (True, MODEL, 1, None)


def test_two_models_in_a_file_name_the_line_of_the_first(tmp_path: Path) -> None:
    # Given a file whose third line uses another model than the first
    path = write_jsonl(
        tmp_path / "in.jsonl", [request("a"), request("b"), request("c", model="o/m")]
    )

    # When it is validated without a batch model, then the message points at both lines
    result = validate_input_file(path)
    assert not result.ok
    assert result.line_number == 3
    assert result.error == (
        f"line 3: model 'o/m' differs from model '{MODEL}' of line 1; "
        "a batch file must use exactly one model"
    )


def test_over_max_requests_fails(
    tmp_path: Path, store: LocalStore, provider: LocalProvider
) -> None:
    # Given a 4-request file and a limit of 3 requests
    batch_id = submit(provider, write_jsonl(tmp_path / "in.jsonl", make_requests(4)))

    # When the batch runs, then it fails on the 4th line naming the limit
    job = run_job(store, batch_id, EchoEngine(), max_requests=3)
    assert job.status is JobStatus.FAILED
    assert job.error == "line 4: over the limit of 3 requests per batch"


def test_over_max_bytes_fails(tmp_path: Path, store: LocalStore, provider: LocalProvider) -> None:
    # Given a file larger than a small byte limit
    path = write_jsonl(tmp_path / "in.jsonl", make_requests(3))
    batch_id = submit(provider, path)

    # When the batch runs, then it fails naming the size and the limit
    job = run_job(store, batch_id, EchoEngine(), max_bytes=100)
    assert job.status is JobStatus.FAILED
    size = path.stat().st_size
    assert job.error == f"file is {size} bytes, over the limit of 100 bytes per batch"


def test_lines_must_use_the_model_the_batch_was_created_for(
    tmp_path: Path, store: LocalStore, provider: LocalProvider
) -> None:
    # Given a batch created for another model than its lines use
    batch_id = submit(provider, write_jsonl(tmp_path / "in.jsonl", make_requests(2)), "x/y")

    # When it runs, then it fails naming both models
    job = run_job(store, batch_id, EchoEngine())
    assert job.status is JobStatus.FAILED
    assert job.error is not None
    assert "line 1: model" in job.error
    assert "'x/y'" in job.error


# Per-line failures, cancel, expiry, idempotency


def test_a_failing_line_goes_to_the_error_file_while_the_others_succeed(
    tmp_path: Path, store: LocalStore, provider: LocalProvider
) -> None:
    # Given a file where one request has no messages
    inputs = make_requests(5)
    inputs[2]["body"]["messages"] = []
    batch_id = submit(provider, write_jsonl(tmp_path / "in.jsonl", inputs))

    # When it runs
    job = run_job(store, batch_id, EchoEngine())

    # Then the batch completes, the bad line is in the error file and the rest succeeded
    assert job.status is JobStatus.COMPLETED
    out, err = results(provider, batch_id, tmp_path)
    assert sorted(line["custom_id"] for line in out) == ["req-0", "req-1", "req-3", "req-4"]
    assert len(err) == 1
    assert err[0]["custom_id"] == "req-2"
    assert err[0]["error"]["code"] == "invalid_request"
    assert "messages" in err[0]["error"]["message"]


def test_retryable_line_errors_are_retried(tmp_path: Path, store: LocalStore) -> None:
    # Given an engine failing retryably twice before answering
    class Flaky:
        calls = 0

        def complete(self, body: dict[str, object], custom_id: str) -> dict[str, object]:
            Flaky.calls += 1
            if Flaky.calls < 3:
                raise LineError("timeout", "try again", retryable=True)
            return EchoEngine().complete(body, custom_id)

    # When it answers through a run, then the line succeeds after the retries
    file_id = store.add_file_from_path(write_jsonl(tmp_path / "in.jsonl", make_requests(1))).id
    job = run_job(store, store.create_job(file_id).id, Flaky())
    assert job.status is JobStatus.COMPLETED
    assert job.output_file_id is not None
    assert store.get_file(job.output_file_id).line_count == 1
    assert Flaky.calls == 3


def test_cancel_while_in_progress_keeps_partial_output(
    tmp_path: Path, store: LocalStore, provider: LocalProvider
) -> None:
    # Given a slow batch running in another thread
    batch_id = submit(provider, write_jsonl(tmp_path / "in.jsonl", make_requests(400)))
    finished: list[BatchJob] = []
    runner = threading.Thread(
        target=lambda: finished.append(run_job(store, batch_id, EchoEngine(), line_delay=0.005))
    )
    runner.start()
    _wait_for(lambda: store.get_job(batch_id).progress > 0)

    # When it is cancelled
    requested = provider.cancel_batch(batch_id)
    runner.join(timeout=30)

    # Then the runner stops it as CANCELLED, keeping the lines done so far
    assert requested.status is ProviderBatchStatus.IN_PROGRESS
    assert finished[0].status is JobStatus.CANCELLED
    batch = provider.get_batch(batch_id)
    assert batch.status is ProviderBatchStatus.CANCELLED
    out, err = results(provider, batch_id, tmp_path)
    assert 0 < len(out) < 400
    assert err == []
    assert len({line["custom_id"] for line in out}) == len(out)
    assert 0 < batch.progress < 100


def test_cancel_without_a_runner_is_immediate_and_later_runs_are_no_ops(
    tmp_path: Path, store: LocalStore, provider: LocalProvider
) -> None:
    # Given a batch that nobody has started
    batch_id = submit(provider, write_jsonl(tmp_path / "in.jsonl", make_requests(3)))
    assert provider.get_batch(batch_id).status is ProviderBatchStatus.VALIDATING

    # When it is cancelled, then it is CANCELLED at once
    assert provider.cancel_batch(batch_id).status is ProviderBatchStatus.CANCELLED
    # And running or cancelling it again changes nothing
    before = store.get_job(batch_id)
    assert run_job(store, batch_id, EchoEngine()) == before
    assert provider.cancel_batch(batch_id).status is ProviderBatchStatus.CANCELLED
    assert store.get_job(batch_id) == before


def test_run_job_on_a_terminal_job_is_a_no_op(
    tmp_path: Path, store: LocalStore, provider: LocalProvider
) -> None:
    # Given a completed batch
    batch_id = submit(provider, write_jsonl(tmp_path / "in.jsonl", make_requests(3)))
    done = run_job(store, batch_id, EchoEngine())
    files_before = store.list_files()

    # When it is run again, then it is returned unchanged and no file is written
    assert run_job(store, batch_id, EchoEngine()) == done
    assert store.get_job(batch_id) == done
    assert store.list_files() == files_before


def test_deadline_passing_while_running_expires_with_partial_output(
    tmp_path: Path, store: LocalStore, provider: LocalProvider
) -> None:
    # Given a slow batch whose deadline is a fraction of a second away
    batch_id = submit(provider, write_jsonl(tmp_path / "in.jsonl", make_requests(400)))
    store.update_job(batch_id, lambda j: replace(j, job_deadline=time.time() + 0.3))

    # When it runs
    job = run_job(store, batch_id, EchoEngine(), line_delay=0.005)

    # Then it expired, keeping the lines done before the deadline
    assert job.status is JobStatus.EXPIRED
    out, _ = results(provider, batch_id, tmp_path)
    assert 0 < len(out) < 400


def test_the_no_output_fault_completes_a_batch_naming_no_file(
    tmp_path: Path, store: LocalStore, provider: LocalProvider
) -> None:
    # Given a fault plan under which every batch completes without output files
    batch_id = submit(provider, write_jsonl(tmp_path / "in.jsonl", make_requests(5)))
    # When it runs
    job = run_job(store, batch_id, EchoEngine(), faults=Faults(no_output_rate=1.0))
    # Then it says COMPLETED but names neither file
    assert job.status is JobStatus.COMPLETED
    assert (job.output_file_id, job.error_file_id) == (None, None)
    assert job.progress == 100.0


def test_a_rerun_after_a_crash_restarts_from_scratch(
    tmp_path: Path, store: LocalStore, provider: LocalProvider
) -> None:
    # Given a job left IN_PROGRESS by a runner that died
    batch_id = submit(provider, write_jsonl(tmp_path / "in.jsonl", make_requests(50)))
    store.update_job(
        batch_id,
        lambda j: replace(
            j, status=JobStatus.IN_PROGRESS, runner_token="dead", progress=40.0, attempts=1
        ),
    )

    # When it is run again
    job = run_job(store, batch_id, EchoEngine())

    # Then it completes with every line exactly once
    assert job.status is JobStatus.COMPLETED
    assert job.attempts == 2
    out, err = results(provider, batch_id, tmp_path)
    assert sorted(line["custom_id"] for line in out + err) == sorted(f"req-{i}" for i in range(50))


def test_an_expired_runner_lease_lets_cancel_finish_at_once(tmp_path: Path) -> None:
    # Given an IN_PROGRESS job whose runner stopped heart-beating long ago
    now = [1_000_000.0]
    store = LocalStore(tmp_path / "store", clock=lambda: now[0], runner_lease_seconds=60)
    file_id = store.add_file_from_path(write_jsonl(tmp_path / "in.jsonl", make_requests(2))).id
    job = store.create_job(file_id)
    store.update_job(
        job.id,
        lambda j: replace(j, status=JobStatus.IN_PROGRESS, runner_token="t", heartbeat_at=now[0]),
    )
    assert store.request_cancel(job.id).status is JobStatus.IN_PROGRESS

    # When the lease has passed and cancel is asked again, then it is CANCELLED at once
    now[0] += 61
    assert store.request_cancel(job.id).status is JobStatus.CANCELLED


# Store


def test_store_state_survives_a_restart(tmp_path: Path) -> None:
    # Given a store holding a file and a completed job
    root = tmp_path / "store"
    store = LocalStore(root)
    stored = store.add_file_from_path(write_jsonl(tmp_path / "in.jsonl", make_requests(7)))
    job = run_job(store, store.create_job(stored.id, model_id=MODEL).id, EchoEngine())

    # When a new LocalStore opens the same root
    reopened = LocalStore(root)

    # Then files and jobs are all there, unchanged
    assert reopened.get_file(stored.id) == stored
    assert reopened.get_job(job.id) == job
    assert reopened.list_jobs() == [job]
    assert {f.id for f in reopened.list_files()} == {
        stored.id,
        job.output_file_id,
        job.error_file_id,
    }
    assert reopened.file_path(stored.id).read_bytes() == (tmp_path / "in.jsonl").read_bytes()


def test_records_render_as_together_does(tmp_path: Path, store: LocalStore) -> None:
    # Given an uploaded file and a job over it
    stored = store.add_file_from_stream([b'{"a": 1}\n{"b"', b': 2}\n{"c": 3}'], filename="in.jsonl")
    job = store.create_job(stored.id)

    # Then the file renders as Together's FileResponse
    assert stored.id.startswith("file-")
    assert stored.to_together() == {
        "id": stored.id,
        "object": "file",
        "created_at": stored.created_at,
        "filename": "in.jsonl",
        "bytes": 26,
        "purpose": "batch-api",
        "FileType": "jsonl",
        "Processed": True,
        "LineCount": 3,
        "processing_status": "COMPLETED",
        "validation_report": None,
    }
    # And the job as Together's BatchJob, with ISO "Z" timestamps and a 24 h deadline
    body = job.to_together()
    assert body["status"] == "VALIDATING"
    assert body["progress"] == 0.0
    assert body["file_size_bytes"] == 26
    assert body["completed_at"] is None
    assert re.fullmatch(r"[0-9a-f]{24}", str(body["user_id"]))
    assert ISO_Z.match(str(body["created_at"]))
    assert ISO_Z.match(str(body["job_deadline"]))
    assert job.job_deadline - job.created_at == 24 * 3600
    assert set(body) == {
        "id",
        "user_id",
        "input_file_id",
        "file_size_bytes",
        "status",
        "job_deadline",
        "created_at",
        "endpoint",
        "progress",
        "model_id",
        "output_file_id",
        "error_file_id",
        "error",
        "completed_at",
    }


def test_update_job_serialises_concurrent_writers(store: LocalStore, tmp_path: Path) -> None:
    # Given a job
    file_id = store.add_file_from_path(write_jsonl(tmp_path / "in.jsonl", make_requests(1))).id
    job_id = store.create_job(file_id).id

    # When 8 threads each increment a counter 25 times through update_job
    def bump() -> None:
        for _ in range(25):
            store.update_job(job_id, lambda j: replace(j, attempts=j.attempts + 1))

    threads = [threading.Thread(target=bump) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Then no increment was lost
    assert store.get_job(job_id).attempts == 200


def test_unknown_and_malformed_ids_are_not_found(
    tmp_path: Path, store: LocalStore, provider: LocalProvider
) -> None:
    # When ids that do not exist (or try to escape the store) are used, then NotFound / 404
    for bad in ("file-00000000-0000-4000-8000-000000000000", "../../etc/passwd", "file-../x"):
        with pytest.raises(NotFound):
            store.get_file(bad)
        with pytest.raises(ProviderError) as info:
            provider.create_batch(bad, model=MODEL)
        assert (info.value.status_code, info.value.retryable) == (404, False)
    for bad in ("00000000-0000-4000-8000-000000000000", "../jobs/x"):
        with pytest.raises(ProviderError) as info:
            provider.get_batch(bad)
        assert info.value.status_code == 404
    # And a deleted file is gone
    stored = store.add_file_from_path(write_jsonl(tmp_path / "in.jsonl", make_requests(1)))
    store.delete_file(stored.id)
    with pytest.raises(NotFound):
        store.file_path(stored.id)


def test_a_failed_dispatch_leaves_the_job_waiting_for_a_later_run(
    tmp_path: Path, store: LocalStore
) -> None:
    # Given a provider whose dispatch is down
    def broken(job_id: str) -> None:
        raise ConnectionError("broker unreachable")

    provider = LocalProvider(store, dispatch=broken)
    file_id = provider.upload_file(write_jsonl(tmp_path / "in.jsonl", make_requests(3)))

    # When a batch is created, the create succeeds and the job waits, alive, for a runner
    created = provider.create_batch(file_id, model=MODEL)
    [listed] = provider.list_batches()
    assert listed.id == created.id and listed.status is ProviderBatchStatus.VALIDATING

    # And a later run (the worker's sweep) completes it
    run_job(store, created.id, EchoEngine())
    assert provider.get_batch(created.id).status is ProviderBatchStatus.COMPLETED


# Scale


def test_60k_lines_run_with_bounded_memory(
    tmp_path: Path, store: LocalStore, provider: LocalProvider
) -> None:
    # Given a 60,000-line input file (above Together's limit, so the limit is raised)
    # (one short message per line keeps the run fast: tracemalloc slows every allocation)
    n = 60_000
    lines = (
        {
            "custom_id": f"r-{i}",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": f"spam {i}?"}]},
        }
        for i in range(n)
    )
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    batch_id = submit(provider, path)

    # When it runs under tracemalloc
    tracemalloc.start()
    try:
        started = time.monotonic()
        job = run_job(store, batch_id, EchoEngine(), max_requests=n)
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    # Then it completes with every line once, within a memory budget smaller than the output
    # itself, so an implementation holding the output in memory would fail
    budget = 20_000_000
    assert job.status is JobStatus.COMPLETED
    assert peak < budget, f"peak {peak / 1e6:.1f} MB"
    assert elapsed < 30
    assert job.output_file_id is not None
    out_path = store.file_path(job.output_file_id)
    assert out_path.stat().st_size > budget
    with open(out_path, "rb") as fh:
        assert sum(1 for _ in fh) == n
    assert store.get_file(job.output_file_id).line_count == n


def test_shuffler_splits_oversized_buckets_and_loses_nothing(tmp_path: Path) -> None:
    # Given a shuffler whose buckets may hold only ~1 kB, fed 2,000 numbered lines (~22 kB)
    lines = [f"line-{i:05d}\n".encode() for i in range(2000)]
    with BucketShuffler(tmp_path / "s", random.Random(7), fan_out=4, max_bucket_bytes=1000) as s:
        for line in lines:
            s.add(line)

        # When it is drained
        drained = list(s.drain())

    # Then every line comes back exactly once, in another order, and no bucket file is left
    assert sorted(drained) == lines
    assert drained != lines
    assert not [p for p in (tmp_path / "s").rglob("*") if p.is_file()]
    with pytest.raises(ValueError):
        BucketShuffler(tmp_path / "t", random.Random()).add(b"no newline")


def _wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)
