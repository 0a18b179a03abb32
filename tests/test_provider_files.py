"""Deleting a finished batch's files at its provider: done, skipped when kept, never fatal."""

from __future__ import annotations

import logging
import time

import pytest
from sqlmodel import select

from shared.models import Batch, BatchState
from shared.providers.local import LocalProvider
from shared.providers.local.faults import ENV_FAIL_RATE
from tests.conftest import LocalApiFactory, run_local_jobs, submit_requests
from worker.collection import collect_ready_batches
from worker.context import WorkerContext
from worker.lifecycle import submit_ready_batches
from worker.packing import pack_due_buffers
from worker.polling import poll_due_batches
from worker.provider_files import delete_provider_files

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def ctx(ctx: WorkerContext) -> WorkerContext:
    """The pipeline context with the production default: provider files are deleted."""
    ctx.settings = ctx.settings.model_copy(update={"keep_provider_files": False})
    return ctx


def local(ctx: WorkerContext) -> LocalProvider:
    provider = ctx.provider("local")
    assert isinstance(provider, LocalProvider)
    return provider


def finished_batch(ctx: WorkerContext, keep: bool = True) -> Batch:
    """Ten requests packed, submitted, run, polled and collected: the FINISHED batch's row.

    With ``keep`` the collector leaves the files at the provider, for the test to delete.
    """
    settings = ctx.settings
    ctx.settings = settings.model_copy(update={"keep_provider_files": keep})
    try:
        return _run_to_finished(ctx)
    finally:
        ctx.settings = settings


def _run_to_finished(ctx: WorkerContext) -> Batch:
    submit_requests(ctx, 10)
    pack_due_buffers(ctx)
    submit_ready_batches(ctx)
    run_local_jobs(ctx)
    time.sleep(0.02)  # past the batch's next_poll_at
    poll_due_batches(ctx)
    assert len(collect_ready_batches(ctx)) == 1
    with ctx.session() as session:
        (batch,) = session.exec(select(Batch))
    assert batch.state == BatchState.FINISHED
    return batch


def batch_files(batch: Batch) -> list[str]:
    ids = [batch.provider_file_id, batch.output_file_id, batch.error_file_id]
    assert all(ids), f"a finished local batch has input, output and error files: {ids}"
    return [file_id for file_id in ids if file_id]


def stored_ids(ctx: WorkerContext) -> set[str]:
    return {stored.id for stored in local(ctx).store.list_files()}


def test_a_finished_batchs_input_output_and_error_files_are_deleted(ctx: WorkerContext) -> None:
    # Given a batch run to FINISHED, whose three files are at the provider
    batch = finished_batch(ctx)
    files = batch_files(batch)
    assert stored_ids(ctx) == set(files)

    # When its provider files are deleted
    deleted = delete_provider_files(ctx, batch)

    # Then all three are reported deleted and are gone, metadata and content alike
    assert deleted == files
    assert [local(ctx).file_exists(file_id) for file_id in files] == [False, False, False]
    assert stored_ids(ctx) == set()
    assert list((local(ctx).store.root / "files").iterdir()) == []
    # And doing it again is harmless: they are already gone
    assert delete_provider_files(ctx, batch) == files


def test_collection_deletes_a_batchs_files_once_it_is_finished(ctx: WorkerContext) -> None:
    # Given the default settings, when a batch is collected to FINISHED
    batch = finished_batch(ctx, keep=False)
    # Then its input, output and error files are gone from the provider
    assert batch_files(batch)
    assert stored_ids(ctx) == set()


def test_keep_provider_files_leaves_them_at_the_provider(ctx: WorkerContext) -> None:
    # Given a batch run to FINISHED, with BATCHBRIDGE_KEEP_PROVIDER_FILES on
    batch = finished_batch(ctx)
    ctx.settings = ctx.settings.model_copy(update={"keep_provider_files": True})

    # When its provider files are "deleted"
    deleted = delete_provider_files(ctx, batch)

    # Then nothing was, and every file still downloads
    assert deleted == []
    assert stored_ids(ctx) == set(batch_files(batch))
    for file_id in batch_files(batch):
        assert local(ctx).store.file_path(file_id).exists()


def test_a_provider_failing_every_call_is_logged_once_and_not_raised(
    ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a FINISHED batch, and a worker whose local provider now fails every call
    batch = finished_batch(ctx)
    monkeypatch.setenv(ENV_FAIL_RATE, "1")
    flaky = WorkerContext(ctx.settings, ctx.redis, ctx.engine)

    # When its provider files are deleted
    with caplog.at_level(logging.WARNING, logger="worker.provider_files"):
        deleted = delete_provider_files(flaky, batch)

    # Then nothing was deleted, nothing raised, and one WARNING names the batch and the files
    assert deleted == []
    assert stored_ids(ctx) == set(batch_files(batch))
    (warning,) = [r for r in caplog.records if r.name == "worker.provider_files"]
    assert warning.levelno == logging.WARNING
    message = warning.getMessage()
    assert batch.id in message and "could not delete 3 of its 3 files" in message
    assert all(file_id in message for file_id in batch_files(batch))


def test_a_refused_api_key_never_reaches_the_log(
    start_local_api: LocalApiFactory,
    ctx: WorkerContext,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a Together-compatible API refusing our key, and a Together batch with two files
    server = start_local_api(api_key="the-right-key-0123456789")
    secret = "sk-wrong-but-secret-9f8e7d6c5b4a"
    monkeypatch.setenv("TOGETHER_API_KEY", secret)
    monkeypatch.setenv("TOGETHER_BASE_URL", server.url)
    batch = Batch(
        id="b-together",
        provider="together",
        model="m-a",
        state=BatchState.FINISHED.value,
        request_count=1,
        bytes=1,
        provider_file_id="file-5b5dc7a5-b96d-4d30-945d-6a98c53db070",
        output_file_id="file-6c6ed8b6-c07e-4e41-a56e-7b09d64ec181",
    )

    # When its files are deleted
    with caplog.at_level(logging.DEBUG):
        deleted = delete_provider_files(ctx, batch)

    # Then none was, the failure (a 401) is logged once, and the key appears nowhere
    assert deleted == []
    warnings = [r for r in caplog.records if r.name == "worker.provider_files"]
    assert len(warnings) == 1 and "401" in warnings[0].getMessage()
    assert secret not in caplog.text


def test_a_batch_without_provider_files_deletes_nothing(ctx: WorkerContext) -> None:
    # Given a batch that never reached its provider (no file ids), naming no real provider
    batch = Batch(
        id="b-never-uploaded",
        provider="nowhere",
        model="m-a",
        state=BatchState.FINISHED.value,
        request_count=1,
        bytes=1,
    )

    # When its provider files are deleted, then there is nothing to do (and nothing fails)
    assert delete_provider_files(ctx, batch) == []
