"""Three thousand requests, each with a callback queue and a webhook, through a faulty
``local-api``: one terminal outcome each, delivered once to each destination.

local-api answers 20% of API calls 429/500, fails 5% of lines with a retryable error and
expires any batch still running after three seconds (one burst of 500 requests makes the
one batch that runs that long). Fifty requests are cancelled: while buffered, while in a
batch, and after they finished. The receiver answers some first deliveries 503.

The ledger is counted from effects: entries appended to the callback stream, and every
POST that reached the receiver (each verified with the reference ``standardwebhooks``).
"""

from __future__ import annotations

import base64
import ipaddress
import re
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydantic import SecretStr
from redis import Redis
from sqlmodel import Session, select

from producer import Producer, Result
from shared.db import make_engine
from shared.models import Request
from shared.providers.local import LocalStore
from shared.providers.local.records import JobStatus
from shared.redis_layout import Keys
from shared.settings import Settings
from tests.conftest import LocalApiFactory, WorkerFactory, make_settings
from tests.webhook_receiver import Receiver, serve_receiver

pytestmark = [pytest.mark.timeout(420), pytest.mark.slow]

TRICKLE, CHUNK, BURST = 2500, 50, 500
SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
TERMINAL = ("completed", "failed", "cancelled")


@dataclass
class Cancels:
    """Requests the test cancelled, by the state they were in just before."""

    buffered: set[str] = field(default_factory=set)
    batched: set[str] = field(default_factory=set)
    finished: dict[str, str] = field(default_factory=dict)  # id -> outcome it already had

    def cancel(self, producer: Producer, request_id: str) -> None:
        """Cancel one request, noting its state first and checking what cancel answered."""
        before = producer.state(request_id)
        cancelled = producer.cancel(request_id)
        assert cancelled is (before not in TERMINAL), (request_id, before)
        if before == "pending":
            self.buffered.add(request_id)
        elif before in TERMINAL:
            self.finished[request_id] = before
        else:
            self.batched.add(request_id)


def settings_for(redis_url: str, data_dir: Path) -> Settings:
    return make_settings(
        redis_url,
        data_dir,
        provider="together",
        max_batch_requests=BURST,
        max_wait_seconds=0.5,
        max_attempts=6,
        aggregate_interval_seconds=0.3,
        submit_interval_seconds=0.3,
        poll_interval_seconds=0.5,
        reap_interval_seconds=1.0,
        provider_timeout_seconds=3.0,
        webhook_interval_seconds=0.3,
        webhook_retry_schedule=(0.0, 0.5, 1.0, 2.0),
        webhook_allow_cidrs=(ipaddress.ip_network("127.0.0.0/8"),),
        webhook_secret=SecretStr(SECRET),
    )


def submit_chunk(
    producer: Producer, receiver: Receiver, model: str, start: int, n: int
) -> dict[str, int]:
    """Submit requests ``start .. start+n-1``; every seventh webhook answers 503 once."""
    urls = {}
    for i in range(start, start + n):
        path = f"/hook/{i}"
        urls[i] = receiver.script(path, 503, 200) if i % 7 == 0 else receiver.url + path
    handles = producer.submit_many(
        {
            "model": model,
            "messages": [{"role": "user", "content": f"item {i}"}],
            "callback_queue": "svc",
            "webhook_url": urls[i],
        }
        for i in range(start, start + n)
    )
    return {h.id: i for h, i in zip(handles, range(start, start + n), strict=True)}


def callback_results(settings: Settings) -> list[Result]:
    """Every result ever appended to callback queue ``svc``."""
    client = Redis.from_url(settings.configured_redis_url or "")
    entries = client.xrange(Keys(settings.key_prefix).callback("svc"))
    client.close()
    return [Result.from_json(fields[b"result"]) for _, fields in entries]


def answered(receiver: Receiver, index: dict[str, int]) -> set[str]:
    """Requests whose webhook has been answered 2xx (the scripted 503 is always first)."""
    with receiver.lock:
        seen = Counter(d.path for d in receiver.received)
    return {rid for rid, i in index.items() if seen[f"/hook/{i}"] >= (2 if i % 7 == 0 else 1)}


def test_every_request_reaches_one_outcome_delivered_once_to_queue_and_webhook(
    redis_url: str,
    tmp_path: Path,
    start_local_api: LocalApiFactory,
    start_worker: WorkerFactory,
) -> None:
    # Given local-api with 20% API faults, 5% retryable line failures and a 3 s expiry
    api = start_local_api(
        "--fail-rate",
        "0.2",
        "--line-error-rate",
        "0.05",
        "--expire-after",
        "3",
        "--line-delay",
        "0.01",
        env_overrides={"BATCHBRIDGE_LOCAL_FAULT_SEED": "7"},
    )
    settings = settings_for(redis_url, tmp_path / "worker")
    start_worker(settings, TOGETHER_BASE_URL=api.url, TOGETHER_API_KEY=api.api_key)
    producer = Producer(settings=settings)
    cancels = Cancels()
    index: dict[str, int] = {}

    with serve_receiver(SECRET) as receiver:
        # When 2,500 requests trickle in (small batches, flushed by age) and 500 arrive at
        # once half-way (one batch of 500: five seconds of work, so it expires), while a
        # request is cancelled as soon as it is submitted and another once it is in a batch
        submitted: list[str] = []
        for n, start in enumerate(range(0, TRICKLE, CHUNK)):
            chunk = submit_chunk(producer, receiver, "m-trickle", start, CHUNK)
            index.update(chunk)
            submitted.extend(chunk)
            if n % 2 == 0 and len(cancels.buffered) < 20:
                cancels.cancel(producer, submitted[-1])
            if n % 2 == 1 and len(cancels.batched) < 20:
                older = submitted[-4 * CHUNK : -CHUNK]
                in_batch = [r for r in older if producer.state(r) == "batched"]
                if in_batch:
                    cancels.cancel(producer, in_batch[len(in_batch) // 2])
            if n == 20:
                index.update(submit_chunk(producer, receiver, "m-burst", TRICKLE, BURST))
            time.sleep(0.5)

        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            delivered = {r.request_id for r in callback_results(settings)}
            if delivered >= index.keys() and answered(receiver, index) >= index.keys():
                break
            time.sleep(1.0)
        # And ten requests are cancelled after they finished (nothing left to cancel)
        untouched = [r for r in index if r not in cancels.buffered | cancels.batched]
        after_finish = untouched[100:2100:200]
        for request_id in after_finish:
            cancels.cancel(producer, request_id)
        time.sleep(4.0)  # a duplicate (or a late retry) would have arrived by now

        with receiver.lock:
            received = list(receiver.received)
    producer.close()

    # Then each request has exactly one entry in its callback queue
    results = callback_results(settings)
    per_request = Counter(r.request_id for r in results)
    assert set(per_request) == set(index), "lost or unexpected callback entries"
    assert [rid for rid, n in per_request.items() if n > 1] == []
    outcome = {r.request_id: r for r in results}

    # And one webhook delivery each (two POSTs where the first was answered 503), all with
    # the same webhook-id, all verified by standardwebhooks, saying what the callback said
    assert all(d.verified for d in received), "a delivery failed signature verification"
    by_path: dict[str, list[str]] = {}
    for d in received:
        by_path.setdefault(d.path, []).append(d.webhook_id)
        event = d.event()
        rid = event["data"]["request_id"]
        assert d.path == f"/hook/{index[rid]}"
        assert event["type"] == f"request.{outcome[rid].status}"
        assert Result.model_validate(event["data"]) == outcome[rid]
    for rid, i in index.items():
        ids = by_path.get(f"/hook/{i}", [])
        assert set(ids) == {f"msg_{rid}"}, (rid, ids)
        assert len(ids) == (2 if i % 7 == 0 else 1), (rid, ids)

    # And cancelled requests ended cancelled, in every state they were cancelled from
    # (a request picked while batched may finish before its cancel: it counts as finished and
    # the loop picks another, so only the ten cancelled after finishing are fixed there)
    assert (len(cancels.buffered), len(cancels.batched), len(after_finish)) == (20, 20, 10)
    assert set(after_finish) <= cancels.finished.keys()
    for rid in cancels.buffered | cancels.batched:
        assert outcome[rid].status == "cancelled", (rid, outcome[rid])
    for rid, before in cancels.finished.items():
        assert outcome[rid].status == before
    cancelled = {rid for rid, r in outcome.items() if r.status == "cancelled"}
    assert cancelled == cancels.buffered | cancels.batched

    # And the SQL record agrees with what was delivered, for every request
    engine = make_engine(settings)
    with Session(engine) as session:
        states = {row.id: row.state for row in session.exec(select(Request))}
    engine.dispose()
    assert {rid: states.get(rid) for rid in index} == {rid: r.status for rid, r in outcome.items()}

    # And the faults really happened: API calls answered 429/500, lines retried, one expiry
    log = (tmp_path / "local-api-0.log").read_text()
    assert re.search(r'HTTP/1.1" (429|500)', log)
    assert any(r.attempts > 1 for r in results)
    store = LocalStore(tmp_path / "local-api-0" / "local_api")
    assert [j for j in store.list_jobs() if j.status is JobStatus.EXPIRED] != []
