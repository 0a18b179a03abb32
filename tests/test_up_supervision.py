"""`batchbridge up` keeps its children running, and says why when it cannot."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from shared.embedded_redis import free_port
from tests.conftest import RedisFactory
from tests.test_cli import batchbridge, cli_env, port_open


def start_up(env: dict[str, str], tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    log = open(tmp_path / "up.log", "w")  # noqa: SIM115 - the process owns it
    process = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "up", "--concurrency", "1", *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log.close()
    return process


def child(up: subprocess.Popen[str], marker: str, timeout: float = 30) -> psutil.Process:
    """The direct child of ``up`` whose command line contains ``marker``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in psutil.Process(up.pid).children():
            try:
                if marker in " ".join(proc.cmdline()):
                    return proc
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.1)
    raise AssertionError(f"no child running {marker!r}")


def submit_and_wait(env: dict[str, str]) -> None:
    url_file = Path(env["BATCHBRIDGE_DATA_DIR"]) / "redis" / "redis.url"
    deadline = time.monotonic() + 30
    while not (url_file.exists() and port_open(url_file.read_text().strip())):
        assert time.monotonic() < deadline, "the embedded Redis did not come up"
        time.sleep(0.1)
    done = batchbridge(env, "submit", "--model", "m", "--prompt", "hi", "--wait", "--timeout", "60")
    assert done.returncode == 0, done.stderr
    assert '"status": "completed"' in done.stdout


def stop_up(up: subprocess.Popen[str]) -> int:
    if up.poll() is None:
        up.send_signal(signal.SIGINT)
        try:
            return up.wait(40)
        except subprocess.TimeoutExpired:
            up.kill()
    return up.wait()


@pytest.mark.slow
def test_up_restarts_a_killed_worker_and_a_killed_redis(tmp_path: Path) -> None:
    # Given `batchbridge up` with its embedded Redis, serving requests
    env = cli_env(tmp_path / "data")
    up = start_up(env, tmp_path, "--no-flower", "--no-metrics")
    try:
        submit_and_wait(env)

        # When its worker is SIGKILLed
        first = child(up, "celery")
        first.send_signal(signal.SIGKILL)

        # Then a new worker takes its place and requests are served again
        deadline = time.monotonic() + 30
        while (second := child(up, "celery")).pid == first.pid:
            assert time.monotonic() < deadline, "the worker was not restarted"
            time.sleep(0.1)
        assert second.is_running()
        submit_and_wait(env)

        # And when the embedded Redis is SIGKILLed, it comes back on the same port
        redis_server = child(up, "redis-server")
        redis_server.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 30
        while child(up, "redis-server").pid == redis_server.pid:
            assert time.monotonic() < deadline, "Redis was not restarted"
            time.sleep(0.1)
        submit_and_wait(env)
    finally:
        code = stop_up(up)
    output = (tmp_path / "up.log").read_text()
    assert "the worker died (exit code -9); restarting it" in output
    assert "the embedded Redis (port" in output
    assert code == 0, output[-3000:]


def test_up_exits_non_zero_when_the_database_cannot_be_reached(tmp_path: Path) -> None:
    # Given a database URL that nothing answers
    env = cli_env(tmp_path / "data")
    env["BATCHBRIDGE_DATABASE_URL"] = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x"

    # When `up` starts / Then it stops at once with status 2, saying why
    result = batchbridge(env, "up", timeout=60)
    assert result.returncode == 2, result.stderr
    assert "cannot use the database" in result.stderr


def test_up_gives_up_on_a_worker_that_keeps_dying(tmp_path: Path, own_redis: RedisFactory) -> None:
    # Given a Redis the worker refuses to run on (it evicts any key under memory pressure)
    server = own_redis(persistent=False, extra_args=("--maxmemory-policy", "allkeys-lru"))
    env = cli_env(tmp_path / "data")
    env["BATCHBRIDGE_REDIS_URL"] = server.url

    # When `up` runs, its worker exits at start-up every time
    up = start_up(
        env,
        tmp_path,
        "--max-restarts",
        "2",
        "--restart-window",
        "120",
        "--no-flower",
        "--no-metrics",
    )
    try:
        code = up.wait(90)
    finally:
        stop_up(up)

    # Then `up` gives up with status 1, naming the child, and the worker said why
    output = (tmp_path / "up.log").read_text()
    assert code == 1, output[-3000:]
    assert "the worker died 2 times within 120 s" in output
    assert "maxmemory-policy is allkeys-lru" in output
