"""Workers that share no disk: two workers whose data directories are hidden from each other,
one Redis, one PostgreSQL database and one provider (``local-api``), and one SIGKILLed midway.

Each worker runs in a mount namespace of its own with an empty tmpfs over the other's data
directory, so a batch file one packs is invisible to the other, as on two machines. The ledger
is counted from effects (callback stream entries, provider input files).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlmodel import Session, select

from producer import Producer
from shared.db import make_engine
from shared.embedded_redis import child_environment
from shared.models import Batch, BatchState
from shared.providers.local import LocalStore
from shared.settings import Settings
from tests.conftest import PG_URL, LocalApiFactory, make_settings, private_postgres_database
from tests.conftest import settings_env as env_of
from tests.reliability.harness import CHAOS_SETTINGS, ProcessGroup
from tests.test_paid_once import CLEAN, settled_ledger
from worker.context import WorkerContext
from worker.packing import pack_due_buffers
from worker.processes import WorkerProcess

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(PG_URL is None, reason="needs BATCHBRIDGE_TEST_DATABASE_URL (PostgreSQL)"),
    pytest.mark.skipif(
        shutil.which("unshare") is None or os.geteuid() != 0,
        reason="hiding each worker's data directory needs unshare -m as root",
    ),
]

WAVE = 1500
SETTINGS = {**CHAOS_SETTINGS, "max_batch_requests": 100}


def pack_on_a_machine_that_is_gone(data_dir: Path, redis_url: str, database_url: str) -> set[str]:
    """Submit and pack a batch with ``data_dir`` as the disk, then lose that disk; the ids."""
    settings = make_settings(redis_url, data_dir, database_url=database_url, **SETTINGS)
    producer = Producer(settings=settings)
    messages = [{"role": "user", "content": "packed elsewhere"}]
    handles = producer.submit_many(
        {"model": "m-x", "messages": messages, "callback_queue": "svc"} for _ in range(100)
    )
    producer.close()
    ctx = WorkerContext.create(settings)
    try:
        assert [b.request_count for b in pack_due_buffers(ctx, force=True)] == [100]
    finally:
        ctx.close()
    shutil.rmtree(data_dir)
    return {h.id for h in handles}


class HiddenWorker(ProcessGroup):
    """A Celery worker (with its beat) that cannot see ``hidden``, the other's data dir."""

    def __init__(self, settings: Settings, hidden: Path, log: Path, api: str, key: str) -> None:
        assert settings.configured_redis_url is not None
        env = child_environment(settings, settings.configured_redis_url)
        env.update(env_of(settings), TOGETHER_BASE_URL=api, TOGETHER_API_KEY=key)
        celery = WorkerProcess(env, concurrency=2, loglevel="INFO").command()
        mount = f'mount -t tmpfs batchbridge-hidden {hidden} && exec "$@"'
        command = ["unshare", "-m", "--propagation", "private", "sh", "-c", mount, "sh", *celery]
        super().__init__(command, env, log)


@pytest.fixture
def shared_database() -> Iterator[str]:
    """A PostgreSQL database of this test's own, dropped afterwards."""
    assert PG_URL is not None
    with private_postgres_database(PG_URL) as url:
        yield url


@pytest.mark.slow
def test_two_workers_with_separate_data_dirs_answer_every_request_once(
    redis_url: str, tmp_path: Path, shared_database: str, start_local_api: LocalApiFactory
) -> None:
    # Given one provider, and two workers whose data directories cannot see each other
    api = start_local_api("--line-delay", "0.002")
    dirs = [tmp_path / "machine-a", tmp_path / "machine-b"]
    settings = [make_settings(redis_url, d, database_url=shared_database, **SETTINGS) for d in dirs]
    for d in dirs:
        d.mkdir()
    # Given too a batch packed by a third machine, since gone with its disk: whichever worker
    # submits it must rebuild its file from Redis (which the kill below may or may not cause)
    ids = pack_on_a_machine_that_is_gone(tmp_path / "machine-c", redis_url, shared_database)
    workers = [
        HiddenWorker(settings[i], dirs[1 - i], tmp_path / f"worker-{i}.log", api.url, api.api_key)
        for i in range(2)
    ]
    try:
        # When 1,500 requests arrive while both work, then 1,500 more as one worker is killed
        producer = Producer(settings=settings[0])
        for wave in range(2):
            for chunk in range(10):
                handles = producer.submit_many(
                    {
                        "model": "m-x",
                        "messages": [{"role": "user", "content": f"wave {wave} {chunk}/{i}"}],
                        "callback_queue": "svc",
                    }
                    for i in range(WAVE // 10)
                )
                ids.update(h.id for h in handles)
                time.sleep(0.3)
                if wave == 1 and chunk == 4:
                    workers[1].kill()
        producer.close()
        store = LocalStore(tmp_path / "local-api-0" / "local_api")

        # Then every request was answered exactly once and billed exactly once
        assert settled_ledger(settings[0], store, ids, timeout=200) == CLEAN
        # And no batch was bounced for a missing file: every one recorded completed. (The kill
        # can land between a claim and its record: the survivor reaps that claim back to its
        # buffer and leaves an abandoned tombstone, a batch that never reached the provider.)
        engine = make_engine(settings[0])
        with Session(engine) as session:
            batches = list(session.exec(select(Batch)))
        engine.dispose()
        sent = [b for b in batches if b.state != BatchState.ABANDONED]
        assert len(batches) - len(sent) <= 1 and all(
            not b.provider_batch_id for b in batches if b not in sent
        )
        assert {b.state for b in sent} == {BatchState.FINISHED}
        assert {b.outcome for b in sent} == {"completed"}, [
            (b.id, b.outcome, b.error) for b in sent if b.outcome != "completed"
        ]
        # And files really crossed machines: some were rebuilt by a worker that had not packed
        logs = "".join(w.log.read_text(errors="replace") for w in workers)
        assert "rebuilt its file from Redis" in logs
    finally:
        for worker in workers:
            worker.stop()
