"""Leftovers: crashed packs and collections leave files that go, and nothing in use goes."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from producer import Producer
from shared.models import Batch, BatchState
from shared.providers.base import ProviderError
from shared.providers.local import LocalProvider
from shared.redis_layout import text
from tests.conftest import run_local_jobs
from worker import packing
from worker.collection import collect_batch, collect_ready_batches
from worker.context import WorkerContext
from worker.leftovers import MIN_AGE_SECONDS, remove_leftovers, remove_leftovers_at_startup
from worker.lifecycle import submit_ready_batches
from worker.packing import pack_buffer, pack_due_buffers
from worker.polling import poll_due_batches
from worker.reaper import reaper_pass

MESSAGES = [{"role": "user", "content": "Is 'great value' positive?"}]


def submit(ctx: WorkerContext, n: int = 10, model: str = "m-a") -> list[str]:
    producer = Producer(settings=ctx.settings, client=ctx.redis)
    requests = [{"model": model, "messages": MESSAGES, "callback_queue": "svc"}] * n
    return [h.id for h in producer.submit_many(requests)]


def age(path: Path, seconds: float) -> None:
    """Make ``path`` look last written ``seconds`` ago."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def run_to_collecting(ctx: WorkerContext) -> str:
    (packed,) = pack_due_buffers(ctx)
    submit_ready_batches(ctx)
    run_local_jobs(ctx)
    time.sleep(0.02)
    poll_due_batches(ctx)
    return packed.id


def local(ctx: WorkerContext) -> LocalProvider:
    provider = ctx.provider("local")
    assert isinstance(provider, LocalProvider)
    return provider


def test_a_crashed_packs_temporary_file_goes_only_once_its_claim_is_dead(
    ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a packer killed while writing its batch file (before the fsync and rename)
    ids = submit(ctx)
    (buf,) = (text(b) for b in ctx.redis.hkeys(ctx.keys.buffers))

    def killed(_fd: int) -> None:
        raise KeyboardInterrupt("packer killed")

    with monkeypatch.context() as patch:
        patch.setattr(packing.os, "fsync", killed)
        with pytest.raises(KeyboardInterrupt):
            pack_buffer(ctx, buf)
    (tmp,) = ctx.batch_dir.rglob("*.tmp")

    # When leftovers are removed while its claim is live, even once the file is old
    assert remove_leftovers(ctx) == 0
    age(tmp, MIN_AGE_SECONDS * 2)
    assert remove_leftovers(ctx) == 0

    # Then it stays; and once the claim times out, one reaper pass takes the claim back
    # and removes the file
    assert tmp.exists()
    ctx.settings = ctx.settings.model_copy(update={"claim_timeout_seconds": 0.05})
    time.sleep(0.1)
    assert reaper_pass(ctx) == len(ids)
    assert not tmp.exists()


def test_temporary_files_without_a_claim_go_once_old_enough(ctx: WorkerContext) -> None:
    # Given temporary batch files of no live claim: one old, one just written
    folder = ctx.batch_dir / "local"
    folder.mkdir(parents=True)
    old, fresh = folder / "0a0a.jsonl.tmp", folder / "0b0b.jsonl.tmp"
    for path in (old, fresh):
        path.write_bytes(b'{"custom_id":"x","bo')
    age(old, MIN_AGE_SECONDS * 2)

    # When a worker starts up
    remove_leftovers_at_startup(ctx.settings)

    # Then only the old one is gone (the fresh one may belong to another deployment)
    assert not old.exists() and fresh.exists()


def test_batch_files_of_finished_or_abandoned_batches_go_and_others_stay(
    ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a finished batch whose input file survived a crash right after it finished
    submit(ctx)
    done_id = run_to_collecting(ctx)
    with ctx.session() as session:
        done = session.get(Batch, done_id)
    assert done is not None
    saved = ctx.settings.data_dir / "saved.jsonl"
    shutil.copy(done.file_path, saved)
    assert collect_batch(ctx, done_id) is True
    shutil.copy(saved, done.file_path)
    # ...a batch still waiting to be submitted, and a file the record does not know
    submit(ctx)
    (waiting,) = pack_due_buffers(ctx)
    stranger = waiting.path.with_name("0c0c.jsonl")
    stranger.write_bytes(b"")
    # ...and a packer killed after writing its file, before recording it
    submit(ctx, model="m-b")
    buf = next(text(b) for b in ctx.redis.hkeys(ctx.keys.buffers) if text(b).endswith("m-b"))

    def killed(*_args: object) -> None:
        raise KeyboardInterrupt("packer killed")

    with monkeypatch.context() as patch:
        patch.setattr(packing, "request_rows", killed)
        with pytest.raises(KeyboardInterrupt):
            pack_buffer(ctx, buf)
    known = [Path(done.file_path), waiting.path, stranger]
    (abandoned,) = (p for p in ctx.batch_dir.rglob("*.jsonl") if p not in known)
    for path in (*known, abandoned):
        age(path, MIN_AGE_SECONDS * 2)

    # When the reaper runs, once the killed packer's claim has timed out
    ctx.settings = ctx.settings.model_copy(update={"claim_timeout_seconds": 0.05})
    time.sleep(0.1)
    assert reaper_pass(ctx) == 10

    # Then the finished batch's file and the abandoned one's are gone, the others stay
    assert not Path(done.file_path).exists() and not abandoned.exists()
    assert waiting.path.exists() and stranger.exists()
    with ctx.session() as session:
        assert session.get(Batch, waiting.id).state == BatchState.PACKED  # type: ignore[union-attr]


def test_two_collectors_of_one_batch_never_share_files(
    ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a batch whose collector is overtaken, mid-download, by a second collector (as
    # when the first one's lease lapses)
    submit(ctx)
    batch_id = run_to_collecting(ctx)
    provider = local(ctx)
    original = provider.download_file
    downloads: list[Path] = []

    def download(file_id: str, dest: Path) -> None:
        downloads.append(dest)
        if len(downloads) == 1:
            assert collect_batch(ctx, batch_id) is True  # the second collector, start to end
        original(file_id, dest)

    monkeypatch.setattr(provider, "download_file", download)

    # When both run
    assert collect_batch(ctx, batch_id) is True

    # Then each worked in a directory of its own, every result went out once, and nothing
    # is left behind
    first, second = downloads[0].parent, downloads[1].parent
    assert first != second and first.parent == second.parent == ctx.results_dir / batch_id
    assert ctx.redis.xlen(ctx.keys.callback("svc")) == 10
    assert list(ctx.results_dir.iterdir()) == []


def test_a_failed_collect_attempt_leaves_no_files(
    ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a download that breaks off half-way with a retryable error
    submit(ctx)
    batch_id = run_to_collecting(ctx)

    def broken(file_id: str, dest: Path) -> None:
        dest.with_name(dest.name + ".part").write_bytes(b'{"custom_id":')
        raise ProviderError("connection reset", retryable=True, status_code=503)

    monkeypatch.setattr(local(ctx), "download_file", broken)

    # When the collector runs
    assert collect_ready_batches(ctx) == []

    # Then the error is recorded for a retry, and its working directory is gone
    with ctx.session() as session:
        batch = session.get(Batch, batch_id)
    assert batch is not None and "connection reset" in (batch.error or "")
    assert list(ctx.results_dir.iterdir()) == []


def test_collect_attempts_older_than_the_task_limit_are_removed(ctx: WorkerContext) -> None:
    # Given the directories of a collector killed long ago, of one still running, and a
    # download of the layout before attempt directories
    limit = ctx.settings.task_time_limit_seconds
    dead = ctx.results_dir / "b-dead" / "attempt-1"
    live = ctx.results_dir / "b-live" / "attempt-2"
    for attempt in (dead, live):
        attempt.mkdir(parents=True)
        (attempt / ".output.jsonl.abc.part").write_bytes(b"half")
    legacy = ctx.results_dir / "b-legacy" / "output.jsonl.part"
    legacy.parent.mkdir()
    legacy.write_bytes(b"half")
    age(dead, limit + 3600)
    age(legacy, limit + 3600)
    age(live, limit / 2)

    # When the reaper runs
    reaper_pass(ctx)

    # Then the dead ones and their emptied batch folders are gone, the live one is kept
    assert sorted(p.name for p in ctx.results_dir.iterdir()) == ["b-live"]
    assert (live / ".output.jsonl.abc.part").exists()
