"""`batchbridge submit`: metadata, idempotency keys, a system message, a --file of requests."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from producer import Producer
from shared.redis_layout import pending_ids
from tests.conftest import drive_pipeline, settings_env
from worker.cli import app as cli
from worker.context import WorkerContext

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def runner(ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """The CLI configured, through the environment, like the worker context ``ctx``."""
    for name, value in settings_env(ctx.settings).items():
        monkeypatch.setenv(name, value)
    return CliRunner()


def _pending(ctx: WorkerContext, model: str) -> set[str]:
    return set(pending_ids(ctx.redis, ctx.keys, f"default:{model}"))


def _jsonl(path: Path, lines: list[object]) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_submit_file_gives_one_request_per_line(
    ctx: WorkerContext, runner: CliRunner, tmp_path: Path
) -> None:
    # Given a JSONL file of 25 requests (a blank line among them), as submit_many takes them
    lines: list[object] = [
        {
            "model": "m-file",
            "messages": [{"role": "user", "content": f"n{i}"}],
            "metadata": {"i": i},
        }
        for i in range(25)
    ]
    lines.insert(7, "")
    path = _jsonl(tmp_path / "requests.jsonl", lines)

    # When it is submitted
    done = runner.invoke(cli, ["submit", "--file", str(path)])

    # Then 25 ids come back, in line order, and those 25 requests wait in the buffer
    assert done.exit_code == 0, done.output
    ids = done.stdout.split()
    assert len(ids) == 25 and len(set(ids)) == 25
    assert _pending(ctx, "m-file") == set(ids)
    assert "submitted 25 requests" in done.stderr
    metas = ctx.redis.hmget(ctx.keys.request(ids[3]), "meta")
    assert orjson.loads(metas[0]) == {"i": 3}


def test_submit_file_fills_in_options_and_writes_ids_to_output(
    ctx: WorkerContext, runner: CliRunner, tmp_path: Path
) -> None:
    # Given lines that name no model or queue, and options that do
    path = _jsonl(tmp_path / "requests.jsonl", [{"messages": MESSAGES}] * 4)
    out = tmp_path / "ids.txt"

    # When submitted with --model, --callback-queue and --output
    args = ["submit", "--file", str(path), "--model", "m-dflt", "--callback-queue", "svc-x"]
    done = runner.invoke(cli, [*args, "--output", str(out)])

    # Then the ids are in the output file, not on stdout, and the options were applied
    assert done.exit_code == 0, done.output
    ids = out.read_text().split()
    assert done.stdout == "" and len(ids) == 4 and _pending(ctx, "m-dflt") == set(ids)
    assert ctx.redis.hget(ctx.keys.request(ids[0]), "cbq") == b"svc-x"


@pytest.mark.parametrize(
    ("bad", "said"),
    [
        ('{"model": "m", "messages": [', "line 3: not JSON"),
        ('["a list"]', "line 3: must be a JSON object"),
        ({"model": "m", "messages": MESSAGES, "max_tokens": 0}, "line 3: max_tokens"),
        ({"model": "m"}, "line 3: messages"),
    ],
)
def test_a_bad_line_is_named_and_nothing_is_submitted(
    ctx: WorkerContext, runner: CliRunner, tmp_path: Path, bad: object, said: str
) -> None:
    # Given a file whose third line is wrong
    good = {"model": "m-bad", "messages": MESSAGES}
    path = _jsonl(tmp_path / "requests.jsonl", [good, good, bad, good])

    # When it is submitted
    done = runner.invoke(cli, ["submit", "--file", str(path)])

    # Then one line on stderr names the line and the field, and nothing was stored
    assert done.exit_code == 2
    assert said in done.stderr and "nothing submitted" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert _pending(ctx, "m-bad") == set() and _pending(ctx, "m") == set()


def test_a_file_reusing_a_taken_idempotency_key_stores_nothing(
    ctx: WorkerContext, runner: CliRunner, tmp_path: Path
) -> None:
    # Given a key already bound to another request
    Producer(settings=ctx.settings, client=ctx.redis).submit(
        "m-other", MESSAGES, idempotency_key="k-1"
    )
    lines = [{"model": "m-key", "messages": MESSAGES, "idempotency_key": f"k-{i}"} for i in (0, 1)]
    path = _jsonl(tmp_path / "requests.jsonl", lines)

    # When a file uses it (on its second line) for a different request
    done = runner.invoke(cli, ["submit", "--file", str(path)])

    # Then the line is named and not even the first line was stored
    assert done.exit_code == 2
    assert "line 2: idempotency_key" in done.stderr
    assert _pending(ctx, "m-key") == set()


def test_metadata_and_system_message_round_trip_into_the_result(
    ctx: WorkerContext, runner: CliRunner
) -> None:
    # When a request is submitted with --metadata and --system
    args = ["submit", "--model", "m-meta", "--prompt", "Is it good?", "--system", "Be brief."]
    done = runner.invoke(cli, [*args, "--metadata", '{"job": 7, "tags": ["a", "b"]}'])
    assert done.exit_code == 0, done.output
    request_id = done.stdout.strip()

    # Then its body has the system message first
    body = orjson.loads(ctx.redis.hget(ctx.keys.bodies("default:m-meta"), request_id))
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert body["messages"][0]["content"] == "Be brief."

    # And once through the pipeline, its result carries the metadata back
    drive_pipeline(ctx)
    result = runner.invoke(cli, ["result", request_id])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["status"] == "completed"
    assert shown["metadata"] == {"job": 7, "tags": ["a", "b"]}


def test_the_same_idempotency_key_gives_the_same_id(ctx: WorkerContext, runner: CliRunner) -> None:
    args = ["submit", "--model", "m-idem", "--prompt", "once", "--idempotency-key", "order-42"]
    # When the same request is submitted twice with one key
    first, second = runner.invoke(cli, args), runner.invoke(cli, args)

    # Then both give the one id, and one request waits
    assert first.exit_code == second.exit_code == 0, first.output + second.output
    assert first.stdout == second.stdout
    assert _pending(ctx, "m-idem") == {first.stdout.strip()}

    # And the key used for a different request is refused, naming it
    other = runner.invoke(cli, [*args[:4], "twice", *args[5:]])
    assert other.exit_code == 2 and "idempotency_key" in other.stderr


@pytest.mark.parametrize(
    ("metadata", "said"),
    [("{not json", "--metadata is not valid JSON"), ("[1, 2]", "--metadata must be a JSON object")],
)
def test_bad_metadata_names_the_option(runner: CliRunner, metadata: str, said: str) -> None:
    done = runner.invoke(cli, ["submit", "--model", "m", "--prompt", "x", "--metadata", metadata])
    assert done.exit_code == 2
    assert done.stderr.startswith(f"error: {said}")
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args",
    [
        ["--file", "x.jsonl", "--prompt", "p"],
        ["--file", "x.jsonl", "--wait"],
        ["--model", "m"],
        ["--prompt", "p", "--output", "ids.txt", "--model", "m"],
    ],
)
def test_options_that_do_not_go_together_are_refused(runner: CliRunner, args: list[str]) -> None:
    done = runner.invoke(cli, ["submit", *args])
    assert done.exit_code == 2
    assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1


def test_wait_says_up_front_when_the_buffer_flushes(ctx: WorkerContext, runner: CliRunner) -> None:
    # Given no worker running (nothing will flush within the wait)
    # When one request is submitted with --wait
    done = runner.invoke(
        cli, ["submit", "--model", "m-w", "--prompt", "x", "--wait", "--timeout", "0.3"]
    )

    # Then it first says which buffer, when it flushes and which setting decides it
    assert done.exit_code == 1  # timed out, as no worker is running
    first = done.stderr.splitlines()[0]
    assert first.startswith("waiting: buffer (local, m-w) flushes in 4m 59s") or first.startswith(
        "waiting: buffer (local, m-w) flushes in 5m 00s"
    )
    assert first.endswith("(age limit BATCHBRIDGE_MAX_WAIT_SECONDS=300)")
    assert "has no result after 0.3 s" in done.stderr


def test_wait_on_a_full_buffer_names_the_count_limit(
    ctx: WorkerContext, runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a buffer one request short of BATCHBRIDGE_MAX_BATCH_REQUESTS (10 here)
    Producer(settings=ctx.settings, client=ctx.redis).submit_many(
        [{"model": "m-full", "messages": MESSAGES}] * 9
    )

    # When the tenth is submitted with --wait
    done = runner.invoke(
        cli, ["submit", "--model", "m-full", "--prompt", "x", "--wait", "--timeout", "0.2"]
    )

    # Then it says the buffer flushes at the next aggregate tick, and why
    assert done.stderr.splitlines()[0] == (
        "waiting: buffer (local, m-full) flushes at the next aggregate tick "
        "(count 10 ≥ BATCHBRIDGE_MAX_BATCH_REQUESTS=10)"
    )
