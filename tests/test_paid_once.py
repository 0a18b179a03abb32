"""Paid once, answered once: 1,000 requests through ``local-api`` while creates lose their
answers and retrieves answer 404 for ten seconds.

The ledger is counted from effects: entries appended to the callback stream, and the request
ids in the input files of the provider jobs that completed (read from local-api's own store).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest
from redis import Redis
from sqlmodel import Session, select

from producer import Producer, Result
from shared.db import make_engine
from shared.models import Batch, BatchState
from shared.providers.local import LocalStore
from shared.providers.local.records import JobStatus
from shared.redis_layout import Keys
from shared.settings import Settings
from tests.conftest import LocalApiFactory, WorkerFactory, make_settings

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

N = 1000
SETTINGS = {
    "provider": "together",
    "max_batch_requests": 100,
    "max_wait_seconds": 0.5,
    "poll_interval_seconds": 0.5,
    "aggregate_interval_seconds": 0.3,
    "submit_interval_seconds": 0.3,
    # A lost answer comes back at once; a short timeout keeps the in-flight window (2x) short.
    "provider_timeout_seconds": 3.0,
}


def ledger(settings: Settings, store: LocalStore, ids: set[str]) -> dict[str, int]:
    """Lost, duplicated, unexpected and double-billed requests, from effects."""
    client = Redis.from_url(settings.configured_redis_url or "")
    entries = client.xrange(Keys(settings.key_prefix).callback("svc"))
    client.close()
    delivered = Counter(Result.from_json(fields[b"result"]).request_id for _, fields in entries)
    billed: Counter[str] = Counter()
    for job in store.list_jobs():
        if job.status is JobStatus.COMPLETED:
            for line in store.file_path(job.input_file_id).read_bytes().splitlines():
                billed[orjson.loads(line)["custom_id"]] += 1
    return {
        "lost": len(ids - delivered.keys()),
        "duplicated": sum(1 for n in delivered.values() if n > 1),
        "unexpected": len(delivered.keys() - ids),
        "double_billed": sum(1 for n in billed.values() if n > 1),
        "unbilled": len(ids - billed.keys()),
    }


CLEAN = {"lost": 0, "duplicated": 0, "unexpected": 0, "double_billed": 0, "unbilled": 0}


def settled_ledger(
    settings: Settings, store: LocalStore, ids: set[str], *, timeout: float
) -> dict[str, int]:
    """The ledger once nothing is lost (or ``timeout`` passed), and a moment more."""
    deadline = time.monotonic() + timeout
    while ledger(settings, store, ids)["lost"] and time.monotonic() < deadline:
        time.sleep(1.0)
    time.sleep(2.0)  # anything delivered twice would be appended by now
    return ledger(settings, store, ids)


def test_lost_create_answers_and_a_404_burst_neither_lose_nor_double_bill(
    redis_url: str,
    tmp_path: Path,
    start_local_api: LocalApiFactory,
    start_worker: WorkerFactory,
) -> None:
    # Given local-api losing the answer of 30% of creates (the job is made all the same) and
    # answering 404 to every retrieve for ten seconds, starting while batches are running
    # (seed 4: the first and third creates lose their answers, and others after them)
    api = start_local_api(
        "--lost-answer-rate",
        "0.3",
        "--not-found-window",
        "6:10",
        "--line-delay",
        "0.01",
        env_overrides={"BATCHBRIDGE_LOCAL_FAULT_SEED": "4"},
    )
    settings = make_settings(redis_url, tmp_path / "worker", **SETTINGS)
    start_worker(settings, TOGETHER_BASE_URL=api.url, TOGETHER_API_KEY=api.api_key)

    # When 1,000 requests arrive in four waves, the last ones after the 404s began
    producer = Producer(settings=settings)
    ids: set[str] = set()
    for wave in range(4):
        handles = producer.submit_many(
            {
                "model": "m-x",
                "messages": [{"role": "user", "content": f"wave {wave} item {i}"}],
                "callback_queue": "svc",
            }
            for i in range(N // 4)
        )
        ids.update(h.id for h in handles)
        time.sleep(2.0)
    producer.close()
    store = LocalStore(tmp_path / "local-api-0" / "local_api")

    # Then every request was answered exactly once, and ran in exactly one completed job
    assert settled_ledger(settings, store, ids, timeout=180) == CLEAN
    # And no other job ran at all (a cancelled duplicate may have run, and billed, some lines)
    assert {job.status for job in store.list_jobs()} == {JobStatus.COMPLETED}
    # And both faults really happened: creates answered 5xx, retrieves answered 404
    log = (tmp_path / "local-api-0.log").read_text()
    assert re.search(r'"POST /v1/batches HTTP/1.1" 50[024]', log)
    assert re.search(r'"GET /v1/batches/[^ ]+ HTTP/1.1" 404', log)
    engine = make_engine(settings)
    with Session(engine) as session:
        batches = list(session.exec(select(Batch)))
    engine.dispose()
    assert any(b.ambiguous_creates for b in batches)
    assert {b.state for b in batches} == {BatchState.FINISHED}
    assert {b.outcome for b in batches} == {"completed"}
