"""Paid once, never failed for nothing: ambiguous creates, 404s, refusals, missing output files.

Each scenario runs the real submitter, poller and collector in this process against the local
provider, broken the way real providers break: by its own fault knobs where they exist, or by a
``Flaky`` provider that answers some calls wrongly over the same store (a list that lags a
create, a retrieve that 404s, a key that is refused, a COMPLETED without files).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import orjson
import pytest
from sqlmodel import select
from typer.testing import CliRunner

from producer import Producer, Result
from shared.models import Batch, BatchState, utcnow
from shared.providers.base import ProviderBatch, ProviderError
from shared.providers.local import Faults, LocalProvider
from shared.providers.local.records import JobStatus
from shared.redis_layout import pending_ids
from tests.conftest import run_local_jobs, settings_env
from worker.backoff import backoff
from worker.batch_cancel import request_batch_cancel
from worker.cli import app as cli
from worker.collection import collect_ready_batches
from worker.context import WorkerContext
from worker.lifecycle import fail_unsent_batch, submit_batch, submit_ready_batches
from worker.packing import pack_due_buffers
from worker.polling import poll_due_batches

MESSAGES = [{"role": "user", "content": "Is 'great value' positive?"}]


class Flaky(LocalProvider):
    """The local provider over the worker's store, with scripted misbehaviour per call."""

    def __init__(self, base: LocalProvider, **kwargs: object) -> None:
        super().__init__(base.store, faults=kwargs.pop("faults", None), **kwargs)  # type: ignore[arg-type]
        self.hide_from_list = 0  # the next N list calls omit jobs newer than the first list
        self.refuse: ProviderError | None = None  # every call fails with this
        self.retrieve_404 = 0  # the next N retrieves answer 404
        self.strip_files = False  # retrieve reports a finished job without its files
        self.creates = 0

    def _check(self) -> None:
        if self.refuse is not None:
            raise self.refuse

    def upload_file(self, path: Path) -> str:
        self._check()
        return super().upload_file(path)

    def create_batch(self, input_file_id: str, *, model: str) -> ProviderBatch:
        self._check()
        self.creates += 1
        return super().create_batch(input_file_id, model=model)

    def list_batches(self) -> list[ProviderBatch]:
        self._check()
        jobs = super().list_batches()
        if self.hide_from_list:
            self.hide_from_list -= 1
            return []  # eventually consistent: a job just created is not listed yet
        return jobs

    def get_batch(self, batch_id: str) -> ProviderBatch:
        self._check()
        if self.retrieve_404:
            self.retrieve_404 -= 1
            raise ProviderError("batch not found", retryable=False, status_code=404)
        job = super().get_batch(batch_id)
        if self.strip_files:
            job = dataclasses.replace(job, output_file_id=None, error_file_id=None)
        return job


@pytest.fixture
def ctx(worker_context: WorkerContext) -> WorkerContext:
    worker_context.settings = worker_context.settings.model_copy(
        update={
            "max_batch_requests": 10,
            "poll_interval_seconds": 0.01,
            "provider_timeout_seconds": 0.2,  # in-flight window 0.4 s, duplicate watch 2 s
        }
    )
    return worker_context


def use(ctx: WorkerContext, **kwargs: object) -> Flaky:
    """Make the worker use a Flaky provider over its own local store."""
    base = ctx.provider("local")
    assert isinstance(base, LocalProvider)
    flaky = Flaky(base, **kwargs)
    ctx._providers["local"] = flaky
    return flaky


def submit(ctx: WorkerContext, n: int = 10) -> list[str]:
    producer = Producer(settings=ctx.settings, client=ctx.redis)
    requests = [
        {"model": "m-a", "messages": MESSAGES, "callback_queue": "svc", "provider": "local"}
        for i in range(n)
    ]
    return [h.id for h in producer.submit_many(requests)]


def the_batch(ctx: WorkerContext) -> Batch:
    with ctx.session() as session:
        (batch,) = session.exec(select(Batch))
    return batch


def move_back(ctx: WorkerContext, batch_id: str, field: str, seconds: float) -> None:
    """Move one of a batch's recorded times ``seconds`` into the past, as time passing would."""
    with ctx.session() as session:
        batch = session.get(Batch, batch_id)
        assert batch is not None and getattr(batch, field) is not None
        setattr(batch, field, getattr(batch, field) - timedelta(seconds=seconds))
        session.add(batch)
        session.commit()


def make_due(ctx: WorkerContext, batch_id: str) -> None:
    """Skip a batch's backoff, as time passing would."""
    with ctx.session() as session:
        batch = session.get(Batch, batch_id)
        assert batch is not None
        batch.next_poll_at = utcnow() - timedelta(seconds=1)
        session.add(batch)
        session.commit()


def poll_and_collect(ctx: WorkerContext, batch_id: str, rounds: int = 20) -> None:
    for _ in range(rounds):
        run_local_jobs(ctx)
        make_due(ctx, batch_id)
        poll_due_batches(ctx)
        collect_ready_batches(ctx)
        if the_batch(ctx).state == BatchState.FINISHED:
            return
        time.sleep(0.05)
    raise AssertionError(f"batch stuck: {the_batch(ctx)}")


def delivered(ctx: WorkerContext) -> list[Result]:
    """Every result ever appended to the callback stream (entries added, not reads)."""
    entries = ctx.redis.xrange(ctx.keys.callback("svc"))
    return [Result.from_json(fields[b"result"]) for _, fields in entries]


def ids_per_completed_job(ctx: WorkerContext) -> Counter[str]:
    """How many COMPLETED provider jobs each request id was in, from the jobs' input files."""
    store = ctx.provider("local")
    assert isinstance(store, LocalProvider)
    seen: Counter[str] = Counter()
    for job in store.store.list_jobs():
        if job.status is not JobStatus.COMPLETED:
            continue
        for line in store.store.file_path(job.input_file_id).read_bytes().splitlines():
            seen[orjson.loads(line)["custom_id"]] += 1
    return seen


@pytest.fixture
def errors_logged(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.WARNING, logger="worker"):
        yield caplog


# Item 1: ambiguous creates


def test_a_create_whose_answer_is_lost_is_adopted_not_sent_again(ctx: WorkerContext) -> None:
    # Given a provider that creates the job but loses the answer of every create
    flaky = use(ctx, faults=Faults(lost_answer_rate=1.0, seed=1))
    ids = submit(ctx)
    (packed,) = pack_due_buffers(ctx)

    # When the submitter tries, and tries again once the backoff is over
    assert submit_batch(ctx, packed.id) is False
    batch = the_batch(ctx)
    # Then the failure is recorded as ambiguous and its in-flight mark kept
    assert (batch.state, batch.ambiguous_creates) == (BatchState.UPLOADED, 1)
    assert batch.create_started_at is not None
    make_due(ctx, packed.id)
    assert submit_batch(ctx, packed.id) is True

    # Then the job that was created is adopted: one create, one job, every result once
    assert flaky.creates == 1
    assert len(flaky.store.list_jobs()) == 1
    poll_and_collect(ctx, packed.id)
    assert sorted(r.request_id for r in delivered(ctx)) == sorted(ids)
    assert ids_per_completed_job(ctx) == Counter(dict.fromkeys(ids, 1))


def test_no_second_create_while_the_first_may_still_appear(ctx: WorkerContext) -> None:
    # Given a create that failed with a 5xx after taking effect, and a batch list that is
    # slow to show new jobs (the first look after the failure finds nothing)
    # (a window of 20 s: the fixture's 0.4 s could pass on a loaded machine before the retry)
    ctx.settings = ctx.settings.model_copy(update={"provider_timeout_seconds": 10.0})
    flaky = use(ctx, faults=Faults(lost_answer_rate=1.0, seed=1))
    submit(ctx)
    (packed,) = pack_due_buffers(ctx)
    assert submit_batch(ctx, packed.id) is False
    flaky.faults = Faults()
    flaky._call_faults = type(flaky._call_faults)(flaky.faults)
    flaky.hide_from_list = 1

    # When the submitter comes back within the in-flight window
    make_due(ctx, packed.id)
    assert submit_batch(ctx, packed.id) is False

    # Then it sends no second create but waits, and adopts the job once the list shows it
    assert flaky.creates == 1
    batch = the_batch(ctx)
    assert batch.next_poll_at is not None and batch.next_poll_at > utcnow()
    make_due(ctx, packed.id)
    assert submit_batch(ctx, packed.id) is True
    assert (flaky.creates, len(flaky.store.list_jobs())) == (1, 1)


def test_a_late_second_job_is_cancelled_and_recorded(
    ctx: WorkerContext, errors_logged: pytest.LogCaptureFixture
) -> None:
    # Given an ambiguous create whose job stays invisible past the in-flight window, so the
    # submitter (rightly, as far as it can tell) creates again
    flaky = use(ctx, faults=Faults(lost_answer_rate=1.0, seed=1))
    ids = submit(ctx)
    (packed,) = pack_due_buffers(ctx)
    assert submit_batch(ctx, packed.id) is False
    flaky.faults = Faults()
    flaky._call_faults = type(flaky._call_faults)(flaky.faults)
    flaky.hide_from_list = 1
    time.sleep(0.45)  # past the in-flight window (2 x 0.2 s)
    make_due(ctx, packed.id)
    assert submit_batch(ctx, packed.id) is True
    assert flaky.creates == 2
    first, second = sorted(flaky.store.list_jobs(), key=lambda job: job.created_at)
    assert the_batch(ctx).provider_batch_id == second.id

    # When the batch is polled while its duplicate watch lasts
    make_due(ctx, packed.id)
    poll_due_batches(ctx)

    # Then the other job is cancelled at the provider and recorded on the batch
    assert flaky.store.get_job(first.id).status is JobStatus.CANCELLED
    batch = the_batch(ctx)
    (extra,) = orjson.loads(batch.extra_jobs or "[]")
    assert (extra["id"], extra["action"]) == (first.id, "cancelled")
    assert any("cancelled duplicate" in r.getMessage() for r in errors_logged.records)
    # And the requests were answered once, each in exactly one completed job
    poll_and_collect(ctx, packed.id)
    assert sorted(r.request_id for r in delivered(ctx)) == sorted(ids)
    assert ids_per_completed_job(ctx) == Counter(dict.fromkeys(ids, 1))


def test_a_definite_refusal_clears_the_in_flight_mark(ctx: WorkerContext) -> None:
    # Given a create refused with a 429 (the provider did nothing)
    flaky = use(ctx)
    submit(ctx)
    (packed,) = pack_due_buffers(ctx)
    original = flaky.create_batch

    def refused(input_file_id: str, *, model: str) -> ProviderBatch:
        raise ProviderError("slow down", retryable=True, status_code=429, retry_after=0.01)

    flaky.create_batch = refused  # type: ignore[method-assign]
    assert submit_batch(ctx, packed.id) is False

    # Then no create is taken to be in flight, so the retry goes straight ahead
    batch = the_batch(ctx)
    assert (batch.create_started_at, batch.ambiguous_creates) == (None, 0)
    flaky.create_batch = original  # type: ignore[method-assign]
    make_due(ctx, packed.id)
    assert submit_batch(ctx, packed.id) is True
    assert the_batch(ctx).duplicate_check_until is None


# Item 2: 404s


def test_a_burst_of_404s_does_not_rerun_the_job(ctx: WorkerContext) -> None:
    # Given a submitted batch whose provider answers 404 to five polls in a row
    flaky = use(ctx)
    ids = submit(ctx)
    (packed,) = pack_due_buffers(ctx)
    assert submit_batch(ctx, packed.id)
    flaky.retrieve_404 = 5

    # When it is polled through the burst and beyond
    for _ in range(5):
        make_due(ctx, packed.id)
        poll_due_batches(ctx)
        assert the_batch(ctx).state == BatchState.SUBMITTED
    # Then the 404s were noted and backed off, but nothing was requeued or created again
    assert the_batch(ctx).not_found_polls == 5
    poll_and_collect(ctx, packed.id)
    assert the_batch(ctx).outcome == "completed"
    assert (flaky.creates, len(flaky.store.list_jobs())) == (1, 1)
    assert sorted(r.request_id for r in delivered(ctx)) == sorted(ids)


def test_polls_of_a_missing_job_back_off(ctx: WorkerContext) -> None:
    ctx.settings = ctx.settings.model_copy(update={"poll_interval_seconds": 10})
    flaky = use(ctx)
    submit(ctx)
    (packed,) = pack_due_buffers(ctx)
    assert submit_batch(ctx, packed.id)
    flaky.retrieve_404 = 10
    gaps = []
    for _ in range(6):
        make_due(ctx, packed.id)
        before = utcnow()
        poll_due_batches(ctx)
        next_poll = the_batch(ctx).next_poll_at
        assert next_poll is not None
        gaps.append(round((next_poll - before).total_seconds()))
    # Then the interval grows from the poll interval towards minutes
    assert gaps == sorted(gaps) and gaps[0] == 10 and gaps[-1] >= 60, gaps


def test_a_job_that_is_gone_for_good_is_cancelled_then_sent_round(ctx: WorkerContext) -> None:
    # Given a submitted batch whose job the provider no longer knows, past the grace period
    ctx.settings = ctx.settings.model_copy(update={"lost_job_grace_seconds": 0.0})
    flaky = use(ctx)
    ids = submit(ctx)
    (packed,) = pack_due_buffers(ctx)
    assert submit_batch(ctx, packed.id)
    cancelled: list[str] = []
    original_cancel = flaky.cancel_batch

    def cancel(batch_id: str) -> ProviderBatch:
        cancelled.append(batch_id)
        return original_cancel(batch_id)

    flaky.cancel_batch = cancel  # type: ignore[method-assign]
    (job,) = flaky.store.list_jobs()
    (flaky.store.root / "jobs" / f"{job.id}.json").unlink()

    # When it is polled and collected
    make_due(ctx, packed.id)
    poll_due_batches(ctx)
    collect_ready_batches(ctx)

    # Then the old job was cancelled first, and the requests went round again
    assert cancelled == [job.id]
    batch = the_batch(ctx)
    assert (batch.state, batch.outcome, batch.requeued_count) == ("finished", "lost", 10)
    assert delivered(ctx) == []
    assert sorted(pending_ids(ctx.redis, ctx.keys, "local:m-a")) == sorted(ids)


def test_a_missing_job_with_a_missing_input_file_waits_longer(ctx: WorkerContext) -> None:
    # Given a job and its input file both unknown (as after a change of API key or project);
    # time passes by moving the record's first 404 back: a slow machine cannot overshoot
    ctx.settings = ctx.settings.model_copy(update={"lost_job_grace_seconds": 30.0})
    flaky = use(ctx)
    submit(ctx)
    (packed,) = pack_due_buffers(ctx)
    assert submit_batch(ctx, packed.id)
    (job,) = flaky.store.list_jobs()
    (flaky.store.root / "jobs" / f"{job.id}.json").unlink()
    flaky.file_exists = lambda file_id: False  # type: ignore[method-assign]

    # When it is polled past the grace period, then it is still waiting, saying why
    make_due(ctx, packed.id)
    poll_due_batches(ctx)
    move_back(ctx, packed.id, "not_found_since", 31)
    make_due(ctx, packed.id)
    poll_due_batches(ctx)
    batch = the_batch(ctx)
    assert batch.state == BatchState.SUBMITTED
    assert "API key or project" in (batch.error or "")
    # And only after four times the grace is it taken as lost
    move_back(ctx, packed.id, "not_found_since", 90)
    make_due(ctx, packed.id)
    poll_due_batches(ctx)
    assert (the_batch(ctx).state, the_batch(ctx).outcome) == ("collecting", "lost")


# Item 3: never fail what never ran


def test_a_refused_key_holds_the_batch_and_it_resumes(
    ctx: WorkerContext, errors_logged: pytest.LogCaptureFixture
) -> None:
    # Given a provider that refuses our key
    flaky = use(ctx)
    ids = submit(ctx)
    (packed,) = pack_due_buffers(ctx)
    flaky.refuse = ProviderError("invalid API key", retryable=False, status_code=401)

    # When the submitter tries three times
    for _ in range(3):
        make_due(ctx, packed.id)
        assert submit_batch(ctx, packed.id) is False

    # Then the batch is held, not failed, says why, and it was logged at ERROR once
    batch = the_batch(ctx)
    assert batch.state == BatchState.PACKED and batch.held_since is not None
    assert "on hold" in (batch.error or "") and "401" not in str(batch.outcome)
    assert batch.next_poll_at is not None and batch.next_poll_at > utcnow() + timedelta(seconds=50)
    holds = [r for r in errors_logged.records if "on hold" in r.getMessage()]
    assert [r.levelno for r in holds] == [logging.ERROR]
    assert delivered(ctx) == []

    # And once the key works again, it resumes and completes
    flaky.refuse = None
    make_due(ctx, packed.id)
    assert submit_batch(ctx, packed.id) is True
    poll_and_collect(ctx, packed.id)
    assert sorted(r.request_id for r in delivered(ctx)) == sorted(ids)
    assert {r.status for r in delivered(ctx)} == {"completed"}


def test_running_out_of_retries_holds_instead_of_failing(ctx: WorkerContext) -> None:
    # Given a provider that fails every call retryably
    flaky = use(ctx, faults=Faults(fail_rate=1.0, seed=3))
    submit(ctx)
    (packed,) = pack_due_buffers(ctx)

    # When the submitter has tried more than its attempts
    for _ in range(12):
        make_due(ctx, packed.id)
        submit_batch(ctx, packed.id)

    # Then its requests are kept on hold, never failed
    batch = the_batch(ctx)
    assert batch.state == BatchState.PACKED and batch.held_since is not None
    assert flaky.store.list_jobs() == []
    collect_ready_batches(ctx)
    assert delivered(ctx) == []


def test_a_short_retry_after_cannot_burn_the_attempts() -> None:
    # Given a provider asking to retry after 50 ms, when ten attempts' waits are added up
    waits = [backoff(attempt, retry_after=0.05) for attempt in range(1, 11)]
    # Then they are floored and grow, spanning far more than twenty seconds, within a ceiling
    assert min(waits) >= timedelta(seconds=2)
    assert sum(waits, timedelta()) > timedelta(minutes=10)
    assert max(waits) <= timedelta(minutes=10)
    # And a long Retry-After is honoured
    assert backoff(1, retry_after=3600) == timedelta(hours=1)


def test_the_operator_fails_a_held_batch_and_its_requests_get_the_reason(
    ctx: WorkerContext,
) -> None:
    # Given a held batch
    flaky = use(ctx)
    ids = submit(ctx)
    (packed,) = pack_due_buffers(ctx)
    flaky.refuse = ProviderError("account suspended", retryable=False, status_code=403)
    submit_batch(ctx, packed.id)
    assert the_batch(ctx).held_since is not None

    # When the operator fails it and the collector runs
    fail_unsent_batch(ctx, packed.id)
    collect_ready_batches(ctx)

    # Then every request failed once, saying the operator gave up and why
    results = delivered(ctx)
    assert sorted(r.request_id for r in results) == sorted(ids)
    for result in results:
        assert result.status == "failed" and result.error is not None
        assert "operator" in result.error.message and "account suspended" in result.error.message


def test_batches_fail_cli_refuses_a_submitted_batch_and_fails_a_held_one(
    ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a submitted batch and a held one
    submit(ctx)
    (sent,) = pack_due_buffers(ctx)
    assert submit_batch(ctx, sent.id)
    submit(ctx)
    (held,) = pack_due_buffers(ctx)
    for name, value in settings_env(ctx.settings).items():
        monkeypatch.setenv(name, value)
    runner = CliRunner()

    # When the operator fails each, then the submitted one is refused, changing nothing
    refused = runner.invoke(cli, ["batches", "fail", sent.id])
    assert refused.exit_code == 1  # an answer about the batch, not a set-up problem
    assert "only a batch not yet submitted" in " ".join(refused.output.split())
    failed = runner.invoke(cli, ["batches", "fail", held.id])
    assert failed.exit_code == 0, failed.output
    with ctx.session() as session:
        states = {b.id: (b.state, b.outcome) for b in session.exec(select(Batch))}
    assert states == {sent.id: ("submitted", None), held.id: ("failed", "failed")}
    assert runner.invoke(cli, ["batches", "fail", "no-such-batch"]).exit_code == 1


# Item 4: COMPLETED without output files


def test_completed_without_output_files_is_polled_again_then_sent_round_once(
    ctx: WorkerContext,
) -> None:
    # Given a job the provider reports COMPLETED but without output or error files (a grace
    # no slow machine runs past between two polls: its end is reached by moving the record)
    ctx.settings = ctx.settings.model_copy(update={"missing_output_grace_seconds": 60.0})
    flaky = use(ctx)
    ids = submit(ctx)
    (packed,) = pack_due_buffers(ctx)
    assert submit_batch(ctx, packed.id)
    run_local_jobs(ctx)
    flaky.strip_files = True

    # When it is polled within the grace period, then it is polled again, not collected
    make_due(ctx, packed.id)
    poll_due_batches(ctx)
    batch = the_batch(ctx)
    assert batch.state == BatchState.SUBMITTED and batch.no_output_since is not None
    make_due(ctx, packed.id)
    poll_due_batches(ctx)
    assert the_batch(ctx).state == BatchState.SUBMITTED

    # And after it, its requests go round again as not run, costing one attempt
    move_back(ctx, packed.id, "no_output_since", 61)
    make_due(ctx, packed.id)
    poll_due_batches(ctx)
    collect_ready_batches(ctx)
    batch = the_batch(ctx)
    assert (batch.state, batch.outcome, batch.requeued_count) == ("finished", "no_output", 10)
    assert delivered(ctx) == []
    attempts = [int(ctx.redis.hget(ctx.keys.request(i), "attempts") or 0) for i in ids]
    assert attempts == [1] * len(ids)


def test_a_create_that_took_effect_before_an_unexpected_error_gets_its_twin_cancelled(
    ctx: WorkerContext,
) -> None:
    # Given a create that made its job but then failed with no provider error at all (an
    # answer that could not be parsed; a worker killed or out of time behaves alike)
    flaky = use(ctx)
    ids = submit(ctx)
    (packed,) = pack_due_buffers(ctx)
    real = flaky.create_batch

    def create_then_blow_up(input_file_id: str, *, model: str) -> ProviderBatch:
        real(input_file_id, model=model)
        raise RuntimeError("the answer could not be parsed")

    flaky.create_batch = create_then_blow_up  # type: ignore[method-assign]
    submit_ready_batches(ctx)
    flaky.create_batch = real  # type: ignore[method-assign]

    # When the list lags past the in-flight window, so a second create goes out
    flaky.hide_from_list = 1
    time.sleep(0.45)
    make_due(ctx, packed.id)
    assert submit_batch(ctx, packed.id) is True
    assert flaky.creates == 2

    # Then the batch watches for the first job, cancels it, and every request runs once
    assert the_batch(ctx).duplicate_check_until is not None
    make_due(ctx, packed.id)
    poll_due_batches(ctx)
    assert len(orjson.loads(the_batch(ctx).extra_jobs or "[]")) == 1
    poll_and_collect(ctx, packed.id)
    assert ids_per_completed_job(ctx) == Counter(dict.fromkeys(ids, 1))
    assert sorted(r.request_id for r in delivered(ctx)) == sorted(ids)


def refused_as_used(input_file_id: str, *, model: str) -> ProviderBatch:
    """A create the provider refuses outright, as for a file that already has a batch."""
    raise ProviderError("file already used", retryable=False, status_code=400)


def test_a_permanent_refusal_after_an_ambiguous_create_holds_instead_of_failing(
    ctx: WorkerContext,
) -> None:
    # Given a create that timed out (its job may exist), and a retry the provider refuses
    # outright (say, "this file already has a batch")
    flaky = use(ctx)
    submit(ctx)
    (packed,) = pack_due_buffers(ctx)

    def timed_out(input_file_id: str, *, model: str) -> ProviderBatch:
        raise ProviderError("create timed out", retryable=True)

    flaky.create_batch = timed_out  # type: ignore[method-assign]
    assert submit_batch(ctx, packed.id) is False
    flaky.create_batch = refused_as_used  # type: ignore[method-assign]
    time.sleep(0.45)
    make_due(ctx, packed.id)
    assert submit_batch(ctx, packed.id) is False

    # Then the batch is held, its requests kept, not failed
    batch = the_batch(ctx)
    assert batch.state == BatchState.UPLOADED and batch.held_since is not None
    assert "after an ambiguous create" in (batch.error or "")
    collect_ready_batches(ctx)
    assert delivered(ctx) == []


def test_cancelling_with_requeue_after_an_ambiguous_create_and_a_refusal_pays_once(
    ctx: WorkerContext,
) -> None:
    # Given a create that made its job but lost the answer, a job list that does not show
    # it yet, and a retry the provider refuses outright: the batch is held
    flaky = use(ctx)
    ids = submit(ctx)
    (packed,) = pack_due_buffers(ctx)
    real_create = flaky.create_batch

    def created_then_timed_out(input_file_id: str, *, model: str) -> ProviderBatch:
        real_create(input_file_id, model=model)
        raise ProviderError("create timed out", retryable=True)

    flaky.create_batch = created_then_timed_out  # type: ignore[method-assign]
    assert submit_batch(ctx, packed.id) is False
    time.sleep(0.45)
    make_due(ctx, packed.id)
    flaky.hide_from_list = 1
    flaky.create_batch = refused_as_used  # type: ignore[method-assign]
    assert submit_batch(ctx, packed.id) is False
    assert the_batch(ctx).held_since is not None

    # When the operator cancels it with --requeue and the workers carry on
    said = request_batch_cancel(ctx, packed.id, requeue=True)
    flaky.create_batch = real_create  # type: ignore[method-assign]
    make_due(ctx, packed.id)
    submit_ready_batches(ctx)  # adopts the job its first create made (and cancels it)
    poll_and_collect(ctx, packed.id)
    pack_due_buffers(ctx, force=True)  # whatever was sent round again
    submit_ready_batches(ctx)
    run_local_jobs(ctx)

    # Then the cancel did not take the batch for one the provider never saw, every request
    # ran in one provider job, and each got one outcome
    assert ids_per_completed_job(ctx) == Counter(dict.fromkeys(ids, 1))
    assert "before it reached the provider" not in said
    outcomes = Counter(r.request_id for r in delivered(ctx))
    assert outcomes == Counter(dict.fromkeys(ids, 1))


def test_a_result_file_that_answers_404_once_is_fetched_again_not_rerun(
    ctx: WorkerContext,
) -> None:
    # Given a finished job whose output file answers 404 on the first download (files can
    # lag their job's status)
    flaky = use(ctx)
    ids = submit(ctx)
    (packed,) = pack_due_buffers(ctx)
    assert submit_batch(ctx, packed.id)
    real = flaky.download_file
    calls: list[str] = []

    def download(file_id: str, dest: Path) -> None:
        calls.append(file_id)
        if len(calls) == 1:
            raise ProviderError("file not found", retryable=False, status_code=404)
        real(file_id, dest)

    flaky.download_file = download  # type: ignore[method-assign]

    # When it is polled and collected, then collected again after the backoff
    poll_and_collect(ctx, packed.id)

    # Then nothing went round again: every request completed once, from the one job
    batch = the_batch(ctx)
    assert (batch.completed_count, batch.requeued_count) == (10, 0)
    assert (flaky.creates, len(flaky.store.list_jobs())) == (1, 1)
    assert sorted(r.request_id for r in delivered(ctx)) == sorted(ids)


def test_a_result_file_missing_past_the_grace_sends_its_requests_round_saying_why(
    ctx: WorkerContext,
) -> None:
    # Given a finished job whose output file keeps answering 404, past the grace period
    ctx.settings = ctx.settings.model_copy(update={"missing_output_grace_seconds": 0.2})
    flaky = use(ctx)
    submit(ctx)
    (packed,) = pack_due_buffers(ctx)
    assert submit_batch(ctx, packed.id)

    def gone(file_id: str, dest: Path) -> None:
        raise ProviderError("file not found", retryable=False, status_code=404)

    flaky.download_file = gone  # type: ignore[method-assign]
    run_local_jobs(ctx)
    make_due(ctx, packed.id)
    poll_due_batches(ctx)
    collect_ready_batches(ctx)
    assert the_batch(ctx).state == BatchState.COLLECTING  # within the grace: try again later

    # When the grace has passed and it is collected again
    time.sleep(0.25)
    make_due(ctx, packed.id)
    collect_ready_batches(ctx)

    # Then its requests went round as not executed, and the batch says why
    batch = the_batch(ctx)
    assert (batch.state, batch.requeued_count) == ("finished", 10)
    assert "could not be fetched" in (batch.error or "")
