"""`batchbridge up` as an operator runs it: a workload flows, Flower, metrics, status and cost
tell the truth about it, no secret shows anywhere, and a SIGKILLed `up` leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from producer import Producer
from shared.embedded_redis import free_port, redis_server_binary
from shared.schemas import Result
from shared.settings import Settings
from tests.conftest import PG_URL, private_postgres_database
from tests.test_cli import batchbridge, cli_env

REDIS_PASSWORD = "redis-pw-4f1c9e"
DB_PASSWORD = "db-pw-8a2b7d"
API_KEY = "tgp-key-never-logged-5e6f"
WEBHOOK_SECRET = "whsec_" + "c2VjcmV0LXNpZ25pbmcta2V5LWZvci10ZXN0cy0xMjM0NTY="
SECRETS = (REDIS_PASSWORD, DB_PASSWORD, API_KEY, WEBHOOK_SECRET, WEBHOOK_SECRET[6:])
PRICED = "meta-llama/Llama-3.3-70B-Instruct-Turbo"  # $0.88 / $0.88 per 1M, 50% off in batch
UNPRICED = "acme/unlisted-model"
REQUESTS_PER_MODEL = 60
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def password_redis(tmp_path: Path) -> Iterator[str]:
    """A redis-server that wants a password; its URL (with the password)."""
    port = free_port()
    directory = tmp_path / "redis"
    directory.mkdir()
    server = subprocess.Popen(
        [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1",
         "--requirepass", REDIS_PASSWORD, "--save", "", "--appendonly", "no",
         "--dir", str(directory), "--maxmemory-policy", "noeviction"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert _wait_port(port, 10), "redis-server did not start"
        yield f"redis://:{REDIS_PASSWORD}@127.0.0.1:{port}/0"
    finally:
        server.terminate()
        server.wait(10)


@pytest.fixture
def database(tmp_path: Path) -> Iterator[str]:
    """PostgreSQL (a private database, reached with a password) when available, else SQLite."""
    if PG_URL is None:
        yield f"sqlite:///{tmp_path / 'record.sqlite3'}"
        return
    with private_postgres_database(PG_URL) as url:
        # Trust auth ignores the password, but every client still carries it in its URL.
        user, _, rest = url.partition("://")[2].partition("@")
        yield f"postgresql+psycopg://{user.split(':')[0]}:{DB_PASSWORD}@{rest}"


def _wait_port(port: int, timeout: float) -> bool:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return True
        time.sleep(0.1)
    return False


def _metrics(port: int) -> Samples:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _metric(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name`` over the samples whose labels include ``labels``."""
    return sum(
        value
        for (sample, have), value in samples.items()
        if sample == name and set(labels.items()) <= set(have)
    )


@pytest.mark.slow
def test_up_runs_a_workload_that_flower_metrics_status_and_cost_report(
    tmp_path: Path, password_redis: str, database: str
) -> None:
    # Given `batchbridge up` on a Redis and a database that need passwords, with an API key and
    # a webhook secret in its environment, and Flower and metrics on free ports
    env = cli_env(tmp_path / "data")
    env.update(
        BATCHBRIDGE_REDIS_URL=password_redis,
        BATCHBRIDGE_DATABASE_URL=database,
        BATCHBRIDGE_WEBHOOK_SECRET=WEBHOOK_SECRET,
        TOGETHER_API_KEY=API_KEY,
        BATCHBRIDGE_MAX_BATCH_REQUESTS="25",
    )
    flower_port, metrics_port = free_port(), free_port()
    log_path = tmp_path / "up.log"
    with open(log_path, "w") as log:
        up = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "up", "--concurrency", "2",
             "--flower-port", str(flower_port), "--metrics-port", str(metrics_port)],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        assert _wait_port(flower_port, 60) and _wait_port(metrics_port, 60), log_path.read_text()

        # When a producer submits requests for a priced and an unpriced model and waits
        settings = Settings.load(**_settings_from(env))
        producer = Producer(settings=settings)
        handles = [
            producer.submit(model, [{"role": "user", "content": f"review {i}: fine kettle"}])
            for model in (PRICED, UNPRICED)
            for i in range(REQUESTS_PER_MODEL)
        ]
        results = [h.wait(timeout=120) for h in handles]
        producer.close()
        assert {r.status for r in results} == {"completed"}
        usage = _usage_by_model(results)

        # Then a second `up` on the same data directory refuses, naming the first
        second = batchbridge(env, "up", "--no-flower", "--no-metrics", timeout=60)
        assert second.returncode == 2
        assert f"pid {up.pid}" in second.stderr, second.stderr

        # And Flower's API lists the worker and batchbridge tasks saying what they did
        flower = f"http://127.0.0.1:{flower_port}/api"
        workers = httpx.get(f"{flower}/workers", params={"refresh": "1"}, timeout=20).json()
        assert any(name.startswith("celery@") for name in workers), workers
        tasks = httpx.get(
            f"{flower}/tasks", params={"search": "result:packed", "limit": "50"}, timeout=20
        ).json()
        names = {t["name"] for t in tasks.values()}
        assert "batchbridge.aggregate" in names, tasks
        assert all("packed" in t["result"] and "batch" in t["result"] for t in tasks.values())

        # And the metrics count what happened
        samples = _wait_for_metrics(metrics_port, 2 * REQUESTS_PER_MODEL)
        total = 2 * REQUESTS_PER_MODEL
        assert _metric(samples, "batchbridge_requests_total", outcome="completed") == total
        assert _metric(samples, "batchbridge_request_latency_seconds_count") == total
        assert _metric(samples, "batchbridge_pending_requests") == 0
        for model, (prompt, completion) in usage.items():
            assert _metric(samples, "batchbridge_prompt_tokens_total", model=model) == prompt
            assert (
                _metric(samples, "batchbridge_completion_tokens_total", model=model) == completion
            )

        # And status and cost agree with the hand-computed figures
        status = batchbridge(env, "status", "--json")
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        assert report["pending"] == []
        assert report["requests"]["last_hour"] == {
            "completed": 2 * REQUESTS_PER_MODEL,
            "failed": 0,
            "cancelled": 0,
        }
        assert {(b["state"], b["status"]) for b in report["batches"]} == {("finished", "finished")}
        assert sum(b["requests"] for b in report["batches"]) == 2 * REQUESTS_PER_MODEL
        assert sum(b["completed"] for b in report["batches"]) == 2 * REQUESTS_PER_MODEL
        assert report["failed_batches"] == [] and report["held_batches"] == []
        cost = batchbridge(env, "cost", "--json", "--by", "model")
        assert cost.returncode == 0, cost.stderr
        _check_cost(json.loads(cost.stdout), usage)

        # And no secret appears in anything an operator sees
        conf = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "worker.app", "inspect", "conf", "-t", "5"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert "broker_url" in conf.stdout, conf.stdout + conf.stderr
        seen = {
            "up's output": log_path.read_text(),
            "status": status.stdout + status.stderr + batchbridge(env, "status").stdout,
            "metrics": httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text,
            "celery inspect conf": conf.stdout + conf.stderr,
            "Flower's workers": json.dumps(workers),
            "Flower's tasks": json.dumps(tasks),
            "cost": cost.stdout + cost.stderr,
        }
        for where, text in seen.items():
            for secret in SECRETS:
                assert secret not in text, f"{secret[:6]}... shows in {where}"

        # When `up` is SIGKILLed
        family = psutil.Process(up.pid).children(recursive=True)
        assert len(family) >= 4, family  # worker (+ pool, beat), Flower, metrics
        up.send_signal(signal.SIGKILL)
        up.wait(10)

        # Then none of its children is left
        _gone, alive = psutil.wait_procs(family, timeout=30)
        assert alive == [], [p.cmdline() for p in alive]
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
            up.wait(60)


def _settings_from(env: dict[str, str]) -> dict[str, object]:
    return {
        "redis_url": env["BATCHBRIDGE_REDIS_URL"],
        "database_url": env["BATCHBRIDGE_DATABASE_URL"],
        "data_dir": Path(env["BATCHBRIDGE_DATA_DIR"]),
        "provider": "local",
    }


def _usage_by_model(results: list[Result]) -> dict[str, tuple[int, int]]:
    totals: dict[str, list[int]] = {PRICED: [0, 0], UNPRICED: [0, 0]}
    for i, result in enumerate(results):
        model = PRICED if i < REQUESTS_PER_MODEL else UNPRICED
        assert result.usage, result
        totals[model][0] += int(result.usage["prompt_tokens"])
        totals[model][1] += int(result.usage["completion_tokens"])
    return {model: (p, c) for model, (p, c) in totals.items()}


def _wait_for_metrics(
    port: int, total: int
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    deadline = time.monotonic() + 30
    while True:
        samples = _metrics(port)
        done = _metric(samples, "batchbridge_requests_total", outcome="completed")
        if done >= total or time.monotonic() > deadline:
            return samples
        time.sleep(0.5)


def _check_cost(report: dict[str, Any], usage: dict[str, tuple[int, int]]) -> None:
    """The echo engine's answers are dry runs: reported apart, priced as they would be."""
    assert report["billed"]["groups"] == []
    groups = {g["key"]: g for g in report["dry_run"]["groups"]}
    assert set(groups) == {PRICED, UNPRICED}
    prompt, completion = usage[PRICED]
    realtime = (Decimal(prompt) + Decimal(completion)) * Decimal("0.88") / 10**6
    priced = groups[PRICED]
    assert (priced["prompt_tokens"], priced["completion_tokens"]) == (prompt, completion)
    assert priced["requests"] == REQUESTS_PER_MODEL
    assert Decimal(priced["realtime_usd"]) == realtime
    assert Decimal(priced["batch_usd"]) == realtime / 2
    assert Decimal(priced["savings_usd"]) == realtime / 2
    unpriced = groups[UNPRICED]
    assert unpriced["batch_usd"] is None and unpriced["unpriced_requests"] == REQUESTS_PER_MODEL
    assert (unpriced["prompt_tokens"], unpriced["completion_tokens"]) == usage[UNPRICED]


def test_up_serves_local_api_when_together_points_at_this_machine(tmp_path: Path) -> None:
    # Given the Together adapter pointed at a loopback address where nothing listens yet
    env = cli_env(tmp_path / "data")
    port = free_port()
    env.update(
        BATCHBRIDGE_PROVIDER="together",
        TOGETHER_BASE_URL=f"http://127.0.0.1:{port}",
        TOGETHER_API_KEY=API_KEY,
    )
    log_path = tmp_path / "up.log"
    with open(log_path, "w") as log:
        up = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "up", "--concurrency", "1",
             "--no-flower", "--no-metrics"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        # When `up` starts / Then it runs local-api there, and a request goes through it
        assert _wait_port(port, 60), log_path.read_text()
        done = batchbridge(env, "submit", "--model", PRICED, "--prompt", "hi", "--wait",
                           "--timeout", "90", timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr + log_path.read_text()[-3000:]
        assert '"status": "completed"' in done.stdout
        assert f"local-api  http://127.0.0.1:{port}" in log_path.read_text()
        # And local-api took the key the adapter sends: an unauthenticated call is refused
        assert httpx.get(f"http://127.0.0.1:{port}/v1/batches", timeout=5).status_code == 401
    finally:
        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0, log_path.read_text()[-3000:]
