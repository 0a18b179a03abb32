"""Aggregator wake-ups: a producer that fills a buffer asks the workers to pack it now.

Producers push the buffer onto ``{p}:wakeups`` (no Celery, no broker); every worker's watcher
pops it and sends one aggregate task. Real Redis throughout; the last scenario runs a real
worker whose aggregate tick is a minute away, so only the wake-up can pack in time.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redis import Redis

from producer import AsyncProducer, Producer
from producer.wakeup import WAKEUPS_KEPT
from shared import task_names
from shared.redis_layout import Keys, buffer_name, pending_ids
from shared.schemas import DEFAULT_PROVIDER
from tests.conftest import WorkerFactory, make_settings
from worker.wakeups import BLOCK_SECONDS, WakeupWatcher

MESSAGES = [{"role": "user", "content": "Is this review positive? 'Great kettle.'"}]
KEYS = Keys()


def request(model: str = "m-a") -> dict[str, object]:
    return {"model": model, "messages": MESSAGES}


def wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_filling_a_buffer_queues_one_wake_up_and_no_celery_message(
    flavour: str, redis_url: str, tmp_path: Path, redis_client: Redis
) -> None:
    # Given batches of 5 requests
    settings = make_settings(redis_url, tmp_path, max_batch_requests=5)

    def submit_many(batches: list[list[dict[str, object]]]) -> list[int]:
        """Submit each list in turn; the wake-up list's length after each."""
        lengths = []
        if flavour == "sync":
            with Producer(settings=settings) as producer:
                for requests in batches:
                    producer.submit_many(requests)
                    lengths.append(int(redis_client.llen(KEYS.wakeups)))
            return lengths

        async def run() -> None:
            async with AsyncProducer(settings=settings) as producer:
                for requests in batches:
                    await producer.submit_many(requests)
                    lengths.append(int(redis_client.llen(KEYS.wakeups)))

        asyncio.run(run())
        return lengths

    # When a buffer reaches 5, then again within the debounce window
    lengths = submit_many([[request()] * 4, [request()], [request()] * 6])

    # Then one wake-up naming the buffer waits for the workers, none before the 5th request,
    # and nothing at all went to the Celery queue
    assert lengths == [0, 1, 1]
    assert redis_client.lrange(KEYS.wakeups, 0, -1) == [
        buffer_name(DEFAULT_PROVIDER, "m-a").encode()
    ]
    assert redis_client.llen(task_names.QUEUE) == 0


def test_wake_ups_nobody_pops_are_kept_to_the_newest_few(
    redis_url: str, tmp_path: Path, redis_client: Redis
) -> None:
    # Given batches of one request and no worker running
    settings = make_settings(redis_url, tmp_path, max_batch_requests=1)
    # When requests fill more buffers than the list keeps
    with Producer(settings=settings) as producer:
        for n in range(WAKEUPS_KEPT + 6):
            producer.submit(f"model-{n}", MESSAGES)
    # Then the list holds only the newest wake-ups
    kept = redis_client.lrange(KEYS.wakeups, 0, -1)
    assert len(kept) == WAKEUPS_KEPT
    assert kept[0] == buffer_name(DEFAULT_PROVIDER, f"model-{WAKEUPS_KEPT + 5}").encode()


@pytest.fixture
def url_without_set(redis_url: str, redis_client: Redis) -> Iterator[str]:
    """The test Redis as a user who may run anything but SET (scripts included)."""
    if "@" in redis_url:
        pytest.skip("the test Redis URL already names a user")
    user, password = "bb-no-set", "secret-no-set"
    redis_client.acl_setuser(
        user, enabled=True, passwords=[f"+{password}"], keys=["*"], commands=["+@all", "-set"]
    )
    try:
        yield redis_url.replace("redis://", f"redis://{user}:{password}@", 1)
    finally:
        redis_client.acl_deluser(user)


@pytest.mark.parametrize("refused", ["debounce", "push"])
def test_a_wake_up_redis_refuses_does_not_fail_the_submit(
    refused: str,
    request: pytest.FixtureRequest,
    redis_url: str,
    tmp_path: Path,
    redis_client: Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a producer whose wake-up Redis refuses: the debounce's SET (a user without SET,
    # who may still enqueue) or the push (a string stands where the list goes)
    url = redis_url
    if refused == "debounce":
        url = request.getfixturevalue("url_without_set")
    else:
        redis_client.set(KEYS.wakeups, b"not a list")
    settings = make_settings(url, tmp_path, max_batch_requests=1)
    # When a submit fills its buffer
    with caplog.at_level(logging.WARNING), Producer(settings=settings) as producer:
        handle = producer.submit("m-a", MESSAGES)
    # Then the submit returns the stored request rather than raising after storing it (a
    # caller would submit it again), and the lost wake-up is logged
    buf = buffer_name(DEFAULT_PROVIDER, "m-a")
    assert pending_ids(redis_client, KEYS, buf) == [handle.id]
    assert "could not queue an aggregate wake-up" in caplog.text


@pytest.fixture
def sent(redis_url: str) -> Iterator[tuple[WakeupWatcher, list[float]]]:
    """A watcher on the test Redis whose sends are recorded (their times); stopped after."""
    times: list[float] = []
    lock = threading.Lock()

    def send() -> None:
        with lock:
            times.append(time.monotonic())

    watcher = WakeupWatcher(Redis.from_url(redis_url), KEYS, send)
    try:
        yield watcher, times
    finally:
        watcher.stop()


def test_the_watcher_sends_one_aggregate_for_all_wake_ups_waiting(
    sent: tuple[WakeupWatcher, list[float]], redis_client: Redis
) -> None:
    watcher, times = sent
    # Given three wake-ups waiting before the watcher starts
    redis_client.lpush(KEYS.wakeups, "p:a", "p:b", "p:c")
    # When it starts
    watcher.start()
    # Then it sends one aggregate and empties the list
    assert wait_until(lambda: len(times) >= 1, 5)
    time.sleep(BLOCK_SECONDS + 0.5)  # a second send would come within one BLPOP
    assert len(times) == 1
    assert redis_client.llen(KEYS.wakeups) == 0
    # And a later wake-up is sent on too
    redis_client.lpush(KEYS.wakeups, "p:a")
    assert wait_until(lambda: len(times) == 2, 5)


def test_the_watcher_keeps_watching_after_redis_refuses(
    sent: tuple[WakeupWatcher, list[float]], redis_client: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    watcher, times = sent
    # Given a watcher whose BLPOP fails (a string stands where the list goes)
    redis_client.set(KEYS.wakeups, b"not a list")
    with caplog.at_level(logging.WARNING):
        watcher.start()
        assert wait_until(lambda: "watching failed" in caplog.text, 5)
    # When the list is back and a wake-up arrives
    redis_client.delete(KEYS.wakeups)
    redis_client.lpush(KEYS.wakeups, "p:a")
    # Then it is sent on
    assert wait_until(lambda: len(times) == 1, 5)


def test_stopping_the_watcher_ends_its_thread(
    sent: tuple[WakeupWatcher, list[float]],
) -> None:
    # Given a watcher blocked on an empty list
    watcher, _ = sent
    watcher.start()
    time.sleep(0.2)
    # When it is stopped (which waits for the BLPOP under way), then its thread has ended
    watcher.stop()
    assert not any(t.name == "bb-wakeups" and t.is_alive() for t in threading.enumerate())


def test_a_worker_packs_a_full_buffer_long_before_its_next_aggregate_tick(
    redis_url: str, tmp_path: Path, redis_client: Redis, start_worker: WorkerFactory
) -> None:
    # Given a worker whose beat aggregates once a minute, and batches of 5
    settings = make_settings(
        redis_url, tmp_path, max_batch_requests=5, aggregate_interval_seconds=60.0
    )
    worker = start_worker(settings)
    log = tmp_path / "worker-0.log"
    assert wait_until(lambda: log.exists() and " ready." in log.read_text(), 60)
    time.sleep(1.0)  # past any tick the beat sends as it starts
    buf = buffer_name(DEFAULT_PROVIDER, "m-a")
    # When a producer fills a buffer
    with Producer(settings=settings) as producer:
        producer.submit_many([request()] * 5)
    assert len(pending_ids(redis_client, KEYS, buf)) == 5
    # Then the worker packs it within seconds, where the tick would take a minute
    assert wait_until(lambda: not pending_ids(redis_client, KEYS, buf), 15)
    assert worker.alive()
