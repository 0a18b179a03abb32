"""Runs one local batch job end to end: validate, answer every line, write shuffled results."""

from __future__ import annotations

import base64
import enum
import hashlib
import random
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import orjson

from shared.limits import BATCH_ENDPOINT, TOGETHER_MAX_BATCH_BYTES, TOGETHER_MAX_BATCH_REQUESTS
from shared.providers.local.engines import Engine, LineError
from shared.providers.local.faults import INJECTED_LINE_ERROR_CODE, Faults
from shared.providers.local.records import BatchJob, JobStatus
from shared.providers.local.shuffle import BucketShuffler
from shared.providers.local.store import LocalStore, NotFound
from shared.providers.local.validation import read_requests, validate_input_file

# A checkpoint is an fsynced rewrite of the job's file. The clock (read every line) carries
# the heartbeat, cancels and progress; the line count only adds progress steps to a fast job,
# which no poller would see (one every 500 lines cost an echo job a tenth of its CPU).
CHECKPOINT_LINES = 5000
CHECKPOINT_SECONDS = 0.5
LINE_ATTEMPTS = 3
_RETRY_BACKOFF_SECONDS = 0.05


class _Stop(enum.Enum):
    DONE = "done"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    LOST = "lost"
    ABANDONED = "abandoned"


@dataclass(frozen=True, slots=True)
class _RunOptions:
    line_delay: float
    line_error_rate: float
    line_rng: random.Random
    shuffle_rng: random.Random
    no_output: bool
    abandon: threading.Event | None


_FINAL_STATUS = {
    _Stop.DONE: JobStatus.COMPLETED,
    _Stop.CANCELLED: JobStatus.CANCELLED,
    _Stop.EXPIRED: JobStatus.EXPIRED,
}


def run_job(
    store: LocalStore,
    job_id: str,
    engine: Engine,
    *,
    line_delay: float = 0.0,
    max_requests: int = TOGETHER_MAX_BATCH_REQUESTS,
    max_bytes: int = TOGETHER_MAX_BATCH_BYTES,
    shuffle_seed: int | None = None,
    faults: Faults | None = None,
    stop: threading.Event | None = None,
) -> BatchJob:
    """Execute a job to a terminal status and return it; a terminal job is returned unchanged.

    A non-terminal job is (re)started from scratch, so a redelivered task is safe. The last
    runner to claim a job owns it: an older runner notices at its next checkpoint and quietly
    discards its work. ``line_delay`` sleeps that many seconds per line (slow batches in tests).

    ``faults`` injects failing lines and expiry (its ``line_delay`` applies when larger than
    ``line_delay``). Setting ``stop`` (e.g. on server shutdown) makes the runner give the job
    up unfinished and unclaimed, so a later ``run_job`` can start it again.
    """
    faults = faults or Faults()
    job = store.get_job(job_id)
    if job.is_terminal or (stop is not None and stop.is_set()):
        return job
    token = uuid.uuid4().hex
    job = store.update_job(job_id, lambda j: _claim(j, token, store.clock()))
    if job.runner_token != token:
        return job
    if job.cancel_requested:
        return _finish(store, job_id, token, JobStatus.CANCELLED)
    if store.clock() >= job.job_deadline:
        return _finish(store, job_id, token, JobStatus.EXPIRED)
    if job.endpoint != BATCH_ENDPOINT:
        error = f"endpoint {job.endpoint!r} is not supported by the local provider"
        return _finish(store, job_id, token, JobStatus.FAILED, error=error)
    try:
        input_path = store.file_path(job.input_file_id)
    except NotFound:
        error = f"input file {job.input_file_id!r} not found"
        return _finish(store, job_id, token, JobStatus.FAILED, error=error)
    result = validate_input_file(
        input_path, max_requests=max_requests, max_bytes=max_bytes, expected_model=job.model_id
    )
    if not result.ok or result.model is None:
        return _finish(store, job_id, token, JobStatus.FAILED, error=result.error)
    model = result.model
    expire_after = faults.expire_after
    job = store.update_job(
        job_id, lambda j: _start(j, token, model, store.clock(), expire_after=expire_after)
    )
    if job.runner_token != token:
        return job
    options = _RunOptions(
        line_delay=max(line_delay, faults.line_delay),
        line_error_rate=faults.line_error_rate,
        line_rng=random.Random(faults.seed),
        shuffle_rng=random.Random(shuffle_seed),
        # Drawn per job from its id, so a seed gives the same jobs whatever their order.
        no_output=random.Random(f"{faults.seed}/{job_id}").random() < faults.no_output_rate,
        abandon=stop,
    )
    return _execute(store, job, token, engine, input_path, total=result.line_count, opts=options)


def _execute(
    store: LocalStore,
    job: BatchJob,
    token: str,
    engine: Engine,
    input_path: Path,
    *,
    total: int,
    opts: _RunOptions,
) -> BatchJob:
    with (
        tempfile.TemporaryDirectory(dir=store.tmp_dir, prefix=f"run-{job.id}-") as tmp,
        BucketShuffler(Path(tmp) / "out", opts.shuffle_rng) as outputs,
        BucketShuffler(Path(tmp) / "err", opts.shuffle_rng) as errors,
    ):
        done = 0
        stop = _Stop.DONE
        last_beat = time.monotonic()
        for _, custom_id, body in read_requests(input_path):
            if opts.abandon is not None and opts.abandon.is_set():
                stop = _Stop.ABANDONED
                break
            # Checked per line, not only at checkpoints, so a short deadline is honoured.
            if store.clock() >= job.job_deadline:
                stop = _Stop.EXPIRED
                break
            answer = _answer(engine, body, custom_id, opts)
            if isinstance(answer, LineError):
                errors.add(_error_line(custom_id, answer))
            else:
                outputs.add(_output_line(job.id, custom_id, answer))
            done += 1
            if opts.line_delay > 0:
                if opts.abandon is not None:
                    opts.abandon.wait(opts.line_delay)
                else:
                    time.sleep(opts.line_delay)
            # The last line needs no checkpoint: publishing comes next and re-checks ownership.
            if done < total and (
                done % CHECKPOINT_LINES == 0 or time.monotonic() - last_beat >= CHECKPOINT_SECONDS
            ):
                last_beat = time.monotonic()
                stop = _checkpoint(store, job.id, token, _percent(done, total))
                if stop is not _Stop.DONE:
                    break
        if stop is _Stop.LOST:
            return store.get_job(job.id)
        if stop is _Stop.ABANDONED:
            return store.update_job(job.id, lambda j: _release(j, token))
        if stop is _Stop.DONE and opts.no_output:
            # The injected fault: COMPLETED, and no file named.
            return _finish(store, job.id, token, JobStatus.COMPLETED, progress=100.0)
        return _publish(store, job.id, token, stop, outputs, errors, _percent(done, total))


def _checkpoint(store: LocalStore, job_id: str, token: str, progress: float) -> _Stop:
    job = store.update_job(job_id, lambda j: _beat(j, token, progress, store.clock()))
    if job.runner_token != token:
        return _Stop.LOST
    if job.cancel_requested:
        return _Stop.CANCELLED
    if store.clock() >= job.job_deadline:
        return _Stop.EXPIRED
    return _Stop.DONE


def _publish(
    store: LocalStore,
    job_id: str,
    token: str,
    stop: _Stop,
    outputs: BucketShuffler,
    errors: BucketShuffler,
    progress: float,
) -> BatchJob:
    file_ids: list[str] = []
    for kind, lines in (("output", outputs), ("error", errors)):
        with store.new_output_file(filename=f"batch_{job_id}_{kind}.jsonl") as writer:
            for line in lines.drain():
                writer.write(line)
            file_ids.append(writer.commit().id)
    output_file_id, error_file_id = file_ids
    status = _FINAL_STATUS[stop]
    job = _finish(
        store,
        job_id,
        token,
        status,
        output_file_id=output_file_id,
        error_file_id=error_file_id,
        progress=100.0 if status is JobStatus.COMPLETED else progress,
    )
    if job.output_file_id != output_file_id:
        # Another runner took the job over meanwhile; its result stands, ours is garbage.
        for file_id in file_ids:
            store.delete_file(file_id)
    return job


def _finish(
    store: LocalStore,
    job_id: str,
    token: str,
    status: JobStatus,
    *,
    error: str | None = None,
    output_file_id: str | None = None,
    error_file_id: str | None = None,
    progress: float | None = None,
) -> BatchJob:
    def apply(job: BatchJob) -> BatchJob:
        if job.runner_token != token or job.is_terminal:
            return job
        return replace(
            job,
            status=status,
            completed_at=store.clock(),
            error=error,
            output_file_id=output_file_id,
            error_file_id=error_file_id,
            progress=job.progress if progress is None else progress,
            runner_token=None,
            heartbeat_at=None,
        )

    return store.update_job(job_id, apply)


def _claim(job: BatchJob, token: str, now: float) -> BatchJob:
    if job.is_terminal:
        return job
    # The status is left alone: re-validating an immutable file cannot change the verdict, and
    # pollers should not see a job step back from IN_PROGRESS to VALIDATING.
    return replace(
        job,
        progress=0.0,
        runner_token=token,
        heartbeat_at=now,
        attempts=job.attempts + 1,
    )


def _start(
    job: BatchJob, token: str, model: str, now: float, *, expire_after: float | None
) -> BatchJob:
    if job.runner_token != token or job.is_terminal:
        return job
    if job.cancel_requested:
        return replace(
            job,
            status=JobStatus.CANCELLED,
            completed_at=now,
            runner_token=None,
            heartbeat_at=None,
        )
    deadline = job.job_deadline
    if expire_after is not None:
        # Persisted, so pollers see when the job will expire and a rerun keeps the deadline.
        deadline = min(deadline, now + expire_after)
    return replace(
        job,
        status=JobStatus.IN_PROGRESS,
        model_id=model,
        heartbeat_at=now,
        job_deadline=deadline,
    )


def _release(job: BatchJob, token: str) -> BatchJob:
    if job.runner_token != token or job.is_terminal:
        return job
    # Unclaimed, a cancel while nobody runs the job takes effect at once.
    return replace(job, runner_token=None, heartbeat_at=None)


def _beat(job: BatchJob, token: str, progress: float, now: float) -> BatchJob:
    if job.runner_token != token or job.is_terminal:
        return job
    return replace(job, progress=progress, heartbeat_at=now)


def _answer(
    engine: Engine, body: dict[str, object], custom_id: str, opts: _RunOptions
) -> dict[str, object] | LineError:
    if opts.line_error_rate > 0 and opts.line_rng.random() < opts.line_error_rate:
        # Returned, not raised into _complete: an injected failure must reach the error file
        # for the client to retry, not be absorbed by the runner's own retries.
        return LineError(
            INJECTED_LINE_ERROR_CODE,
            "rate limit exceeded (injected by line_error_rate); retry the request",
            retryable=True,
        )
    return _complete(engine, body, custom_id)


def _complete(
    engine: Engine, body: dict[str, object], custom_id: str
) -> dict[str, object] | LineError:
    attempt = 1
    while True:
        try:
            return engine.complete(body, custom_id)
        except LineError as exc:
            if not exc.retryable or attempt >= LINE_ATTEMPTS:
                return exc
        time.sleep(_RETRY_BACKOFF_SECONDS * 2 ** (attempt - 1))
        attempt += 1


def _output_line(job_id: str, custom_id: str, completion: dict[str, object]) -> bytes:
    return orjson.dumps(
        {
            "id": _request_id(job_id, custom_id),
            "custom_id": custom_id,
            "response": {"status_code": 200, "body": completion},
        },
        option=orjson.OPT_APPEND_NEWLINE,
    )


def _error_line(custom_id: str, error: LineError) -> bytes:
    return orjson.dumps(
        {"custom_id": custom_id, "error": {"message": error.message, "code": error.code}},
        option=orjson.OPT_APPEND_NEWLINE,
    )


def _request_id(job_id: str, custom_id: str) -> str:
    # Together's ids are "br_" + 43 base64url characters, i.e. 32 bytes; a hash keeps reruns
    # of the same job stable.
    digest = hashlib.sha256(f"{job_id}\0{custom_id}".encode()).digest()
    return "br_" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _percent(done: int, total: int) -> float:
    return round(100.0 * done / total, 2) if total else 100.0
