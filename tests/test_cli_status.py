"""`batchbridge status`, `batches list` and `batches show` as an operator runs them."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from producer import Producer
from tests.conftest import drive_pipeline, settings_env, submit_requests
from worker.cli import app as cli
from worker.collection import collect_ready_batches
from worker.context import WorkerContext
from worker.lifecycle import fail_unsent_batch, submit_ready_batches
from worker.packing import pack_due_buffers

MESSAGES = [{"role": "user", "content": "hi"}]
# The top-level keys `status --json` documents (worker/status.py): scripts rely on them.
STATUS_KEYS = {
    "generated_at",
    "sources",
    "thresholds",
    "pending",
    "uncommitted_claims",
    "batches",
    "active_batches",
    "held_batches",
    "failed_batches",
    "failed_batches_total",
    "batches_with_errors",
    "requests",
    "callback_queues",
    "webhooks",
}


@pytest.fixture
def operator(ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A deployment with one finished, one failed, one held and one submitted batch, plus a
    buffer still filling; the CLI reads it through the environment.

    Returns the ids of those batches by what they are.
    """
    submit_requests(ctx, 10)
    drive_pipeline(ctx)  # finished: 10 completed on queue svc
    submit_requests(ctx, 4)
    (doomed,) = pack_due_buffers(ctx, force=True)
    fail_unsent_batch(ctx, doomed.id)
    collect_ready_batches(ctx)  # finished in the record, failed in truth
    producer = Producer(settings=ctx.settings, client=ctx.redis)
    producer.submit_many([{"model": "m-t", "messages": MESSAGES, "provider": "together"}] * 2)
    (held,) = pack_due_buffers(ctx, force=True)
    assert submit_ready_batches(ctx) == []  # held: no TOGETHER_API_KEY
    submit_requests(ctx, 10)
    (sent,) = pack_due_buffers(ctx)
    assert submit_ready_batches(ctx) == [sent.id]
    producer.submit_many([{"model": "m-wait", "messages": MESSAGES}] * 3)
    for name, value in settings_env(ctx.settings).items():
        monkeypatch.setenv(name, value)
    return {"failed": doomed.id, "held": held.id, "submitted": sent.id}


def test_status_json_reports_flushes_failures_holds_and_backlogs(
    operator: dict[str, str],
) -> None:
    # When the operator asks for the status as JSON
    done = CliRunner().invoke(cli, ["status", "--json"])

    # Then every documented key is there and says what happened
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    assert set(report) == STATUS_KEYS
    (waiting,) = report["pending"]
    assert (waiting["model"], waiting["count"], waiting["flush"]["due"]) == ("m-wait", 3, False)
    assert waiting["flush"]["text"].endswith("(age limit 300 s)")
    assert [b["batch"] for b in report["failed_batches"]] == [operator["failed"]]
    assert [b["batch"] for b in report["held_batches"]] == [operator["held"]]
    assert "TOGETHER_API_KEY" in report["held_batches"][0]["error"]
    assert [b["batch"] for b in report["active_batches"]] == [
        operator["held"],
        operator["submitted"],
    ]
    statuses = sorted((b["provider"], b["status"], b["count"]) for b in report["batches"])
    assert statuses == [
        ("local", "failed", 1),
        ("local", "finished", 1),
        ("local", "submitted", 1),
        ("together", "held", 1),
    ]
    assert report["requests"]["last_hour"] == {"completed": 10, "failed": 4, "cancelled": 0}
    (queue,) = report["callback_queues"]
    assert (queue["queue"], queue["unacked"]) == ("svc", 14)


def test_status_text_shows_the_same_story(operator: dict[str, str]) -> None:
    done = CliRunner().invoke(cli, ["status"], env={"COLUMNS": "200"})
    assert done.exit_code == 0, done.output
    text = done.stdout
    assert re.search(r"m-wait .* in (5m 00s|4m [45]\ds) \(age limit 300 s\)", text)
    assert operator["held"] in text and "Held batches: 1" in text
    assert operator["failed"] in text and "Failed batches: 1" in text
    assert "failed (finished)" in text


def test_batches_list_filters_by_status(operator: dict[str, str]) -> None:
    runner = CliRunner()
    # When batches are listed by status
    failed = json.loads(
        runner.invoke(cli, ["batches", "list", "--state", "failed", "--json"]).stdout
    )
    held = json.loads(runner.invoke(cli, ["batches", "list", "--state", "held", "--json"]).stdout)
    newest = json.loads(runner.invoke(cli, ["batches", "list", "--limit", "2", "--json"]).stdout)

    # Then each has exactly those, and --limit takes the newest
    assert [(b["batch"], b["state"], b["status"]) for b in failed["batches"]] == [
        (operator["failed"], "finished", "failed")
    ]
    assert [b["batch"] for b in held["batches"]] == [operator["held"]]
    assert [b["batch"] for b in newest["batches"]] == [operator["submitted"], operator["held"]]
    text = runner.invoke(cli, ["batches", "list"], env={"COLUMNS": "200"}).stdout
    assert all(batch_id in text for batch_id in operator.values())


def test_batches_list_refuses_an_unknown_status_in_one_line(operator: dict[str, str]) -> None:
    done = CliRunner().invoke(cli, ["batches", "list", "--state", "bogus"])
    assert done.exit_code == 2
    assert "--state must be one of" in done.stderr and "'bogus'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.output


def test_batches_show_gives_an_operator_everything(operator: dict[str, str]) -> None:
    runner = CliRunner()
    # When the submitted batch is shown, as JSON and as text
    done = runner.invoke(cli, ["batches", "show", operator["submitted"], "--json"])
    assert done.exit_code == 0, done.output
    shown = json.loads(done.stdout)
    text = runner.invoke(cli, ["batches", "show", operator["submitted"]], env={"COLUMNS": "200"})

    # Then it has the provider's ids, counts, attempts and times
    record = shown["record"]
    assert shown["status"] == "submitted" and shown["requests"] == 10
    assert shown["requests_by_state"] == {"batched": 10}
    assert record["provider_batch_id"] and record["provider_file_id"]
    assert record["submit_attempts"] == 1 and record["flush_reason"] == "count"
    assert record["created_at"].endswith("+00:00") and record["submitted_at"]
    assert record["provider_batch_id"] in text.stdout
    assert "submit attempts" in text.stdout and "flushed by" in text.stdout

    # And the failed one says why it failed, and that it failed
    failed = json.loads(
        runner.invoke(cli, ["batches", "show", operator["failed"], "--json"]).stdout
    )
    assert (failed["status"], failed["state"], failed["outcome"]) == (
        "failed",
        "finished",
        "failed",
    )
    assert failed["requests_by_state"] == {"failed": 4}
    assert "failed by the operator" in failed["error"]


def test_batches_show_of_an_unknown_batch_exits_1(operator: dict[str, str]) -> None:
    done = CliRunner().invoke(cli, ["batches", "show", "no-such-batch"])
    assert done.exit_code == 1
    assert done.stderr.strip() == "error: no batch 'no-such-batch' is known"


def test_status_watch_refreshes_and_stops_cleanly_on_ctrl_c(operator: dict[str, str]) -> None:
    # Given `status --watch` writing into a pipe
    env = {k: v for k, v in os.environ.items()}
    watch = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "status", "--watch", "--interval", "0.3"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # When it has refreshed a few times and Ctrl-C is pressed
        time.sleep(3)
        watch.send_signal(signal.SIGINT)
        out, err = watch.communicate(timeout=30)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()

    # Then it exits 0 with no traceback, having drawn the status more than once
    assert watch.returncode == 0, err
    assert "Traceback" not in err and "Traceback" not in out
    assert out.count("batchbridge status at") >= 2
    assert operator["held"] in out


def test_status_without_redis_says_so_in_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHBRIDGE_")}
    env["BATCHBRIDGE_DATA_DIR"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", "status"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "BATCHBRIDGE_REDIS_URL" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
