"""The worker survives its Redis restarting under it, even with a task's ack outstanding."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis

from producer import Producer
from shared.embedded_redis import EmbeddedRedis, child_environment
from shared.settings import Settings
from tests.conftest import RedisFactory, make_settings, settings_env
from worker.app import create_app
from worker.processes import WorkerProcess

PROBE = "tests.probe.hold"  # tests/worker_probe.py, loaded by the worker only
FAST = {
    "max_wait_seconds": 0.2,
    "aggregate_interval_seconds": 0.3,
    "submit_interval_seconds": 0.3,
    "poll_interval_seconds": 0.3,
    "lease_seconds": 3,
}


@pytest.fixture
def probed_worker(tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    """Workers started below (with the probe task loaded); stopped after the test."""
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.stop()


def start_probed_worker(
    settings: Settings, log_path: Path, started: list[WorkerProcess]
) -> WorkerProcess:
    assert settings.configured_redis_url is not None
    env = child_environment(settings, settings.configured_redis_url)
    env.update(settings_env(settings))
    worker = WorkerProcess(
        env,
        log_path=log_path,
        schedule_path=log_path.with_suffix(".beat"),
        include=("tests.worker_probe",),
    ).start()
    started.append(worker)
    return worker


def wait_for(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_the_worker_survives_a_redis_restart_while_a_task_awaits_its_ack(
    own_redis: RedisFactory, tmp_path: Path, probed_worker: list[WorkerProcess]
) -> None:
    # Given a worker on its own persistent Redis, busy with a task whose message is unacked
    server: EmbeddedRedis = own_redis(appendfsync="always")
    settings = make_settings(server.url, tmp_path / "data", **FAST)
    log_path = tmp_path / "worker.log"
    worker = start_probed_worker(settings, log_path, probed_worker)
    producer = Producer(settings=settings)
    first = producer.submit("m", [{"role": "user", "content": "before"}])
    assert first.wait(timeout=60).status == "completed"
    app = create_app(settings)
    app.send_task(PROBE, args=[6.0, "probe:started"], queue="batchbridge")
    client = Redis.from_url(server.url)
    wait_for(lambda: client.get("probe:started") == b"1", 30, "the probe task to start")
    client.close()

    # When Redis is killed and comes back on the same port, with the same files
    server.kill()
    time.sleep(0.5)
    server.start()

    # Then the worker keeps running and serves a request submitted after the restart
    producer.close()
    producer = Producer(settings=settings)
    after = producer.submit("m", [{"role": "user", "content": "after"}])
    result = after.wait(timeout=60)
    assert result.status == "completed"
    assert worker.alive(), log_path.read_text()[-3000:]
    assert "'NoneType' object has no attribute" not in log_path.read_text()
    producer.close()
    app.close()
