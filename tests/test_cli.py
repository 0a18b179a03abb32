"""The CLI as a user runs it: `up` with an embedded Redis, `submit --wait`, `status`, Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

FAST_ENV = {
    "BATCHBRIDGE_MAX_WAIT_SECONDS": "0.5",
    "BATCHBRIDGE_POLL_INTERVAL_SECONDS": "0.2",
    "BATCHBRIDGE_AGGREGATE_INTERVAL_SECONDS": "0.3",
    "BATCHBRIDGE_SUBMIT_INTERVAL_SECONDS": "0.3",
    "BATCHBRIDGE_PROVIDER": "local",
}


def cli_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHBRIDGE_")}
    env.update(FAST_ENV, BATCHBRIDGE_DATA_DIR=str(data_dir))
    return env


def batchbridge(
    env: dict[str, str], *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def port_open(url: str) -> bool:
    host, port = url.removeprefix("redis://").split("/")[0].split(":")
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, int(port))) == 0


def test_up_submit_status_and_clean_stop(tmp_path: Path) -> None:
    # Given `batchbridge up` with no Redis configured
    env = cli_env(tmp_path)
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "worker.cli",
            "up",
            "--loglevel",
            "WARNING",
            "--no-flower",
            "--no-metrics",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url_file = tmp_path / "redis" / "redis.url"
    try:
        deadline = time.monotonic() + 30
        while not url_file.exists():
            assert up.poll() is None, up.stderr.read() if up.stderr else ""
            assert time.monotonic() < deadline, "embedded Redis did not start"
            time.sleep(0.1)
        url = url_file.read_text()
        # It started its own Redis, not the one that may listen on 6379
        assert not url.endswith(":6379/0") and port_open(url)

        # When a request is submitted and waited for
        done = batchbridge(env, "submit", "--model", "m-cli", "--prompt", "hello there", "--wait")
        assert done.returncode == 0, done.stderr
        request_id, _, payload = done.stdout.partition("\n")
        result = json.loads(payload)

        # Then its result comes back through the whole pipeline
        assert result["request_id"] == request_id.strip()
        assert result["status"] == "completed"
        assert result["response"]["system_fingerprint"] == "batchbridge-echo-dry-run"

        # And status reports the batch
        status = batchbridge(env, "status", "--json")
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        assert report["pending"] == []
        assert {(b["state"], b["count"]) for b in report["batches"]} == {("finished", 1)}
        assert report["batches_with_errors"] == []
    finally:
        # When Ctrl-C is pressed, everything stops
        up.send_signal(signal.SIGINT)
        code = up.wait(60)
    assert code == 0
    assert not url_file.exists()
    assert not port_open(url)


def test_submit_without_any_redis_says_what_to_do(tmp_path: Path) -> None:
    done = batchbridge(cli_env(tmp_path), "submit", "--model", "m", "--prompt", "x")
    assert done.returncode == 2
    assert "BATCHBRIDGE_REDIS_URL" in done.stderr


@pytest.mark.parametrize(
    "bad",
    [["--model", "", "--prompt", "x"], ["--model", "m", "--prompt", "x", "--max-tokens", "0"]],
)
def test_submit_rejects_bad_input_naming_the_field(
    redis_url: str, tmp_path: Path, bad: list[str]
) -> None:
    env = cli_env(tmp_path)
    env["BATCHBRIDGE_REDIS_URL"] = redis_url
    done = batchbridge(env, "submit", *bad)
    assert done.returncode == 2
    assert ("model" in done.stderr) or ("max_tokens" in done.stderr)
