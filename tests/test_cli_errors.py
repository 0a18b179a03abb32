"""CLI errors: one line and a non-zero exit; the traceback only with --debug."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.embedded_redis import free_port
from tests.test_cli import batchbridge, cli_env

PASSWORD = "pw-never-shown-42"


@pytest.mark.parametrize(
    "command", [["status"], ["submit", "--model", "m", "--prompt", "x"], ["result", "abc"]]
)
def test_an_unreachable_redis_is_one_line_naming_the_variable(
    tmp_path: Path, command: list[str]
) -> None:
    # Given a Redis URL (with a password) that nothing answers
    env = cli_env(tmp_path)
    env["BATCHBRIDGE_REDIS_URL"] = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"

    # When a command needs Redis
    done = batchbridge(env, *command)

    # Then it exits 2 with one error line naming the variable, no traceback, no password
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "BATCHBRIDGE_REDIS_URL" in errors[0], done.stderr
    assert "Traceback" not in done.stderr and PASSWORD not in done.stderr + done.stdout
    assert len(done.stderr.splitlines()) <= 2


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    env["BATCHBRIDGE_REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    done = batchbridge(env, "--debug", "status")
    assert done.returncode != 0
    assert "Traceback" in done.stderr


def test_a_bad_database_url_stops_every_command_naming_it(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    env["BATCHBRIDGE_DATABASE_URL"] = "notaurl"
    done = batchbridge(env, "status")
    assert done.returncode == 2
    assert done.stderr.startswith("error: invalid settings: BATCHBRIDGE_DATABASE_URL: ")
    assert len(done.stderr.splitlines()) == 1


def test_a_misspelled_variable_is_warned_about(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    env["BATCHBRIDGE_REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
    env["BATCHBRIDGE_MAX_WAIT_SECOND"] = "5"
    done = batchbridge(env, "status")
    assert "did you mean BATCHBRIDGE_MAX_WAIT_SECONDS?" in done.stderr


def test_a_celery_worker_that_cannot_reach_redis_stops_with_one_line(tmp_path: Path) -> None:
    # Given `celery worker` (not `up`) pointed at a Redis that nothing answers
    import subprocess
    import sys

    env = cli_env(tmp_path)
    env["BATCHBRIDGE_REDIS_URL"] = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"

    # When it starts / Then it exits at once saying which variable, without retrying for ever
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-c", "1"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert "batchbridge worker cannot start: cannot reach Redis" in done.stderr
    assert "BATCHBRIDGE_REDIS_URL" in done.stderr
    assert "Traceback" not in done.stderr and "Trying again" not in done.stderr
    assert PASSWORD not in done.stderr + done.stdout


@pytest.mark.parametrize(
    ("command", "option"),
    [
        (["up", "--concurrency", "0"], "--concurrency"),
        (["up", "--metrics-port", "99999"], "--metrics-port"),
        (["up", "--loglevel", "FOO"], "--loglevel"),
        (["metrics", "--port", "99999"], "--port"),
        (["local-api", "--port", "99999"], "--port"),
        (["local-api", "--concurrency", "0"], "--concurrency"),
        (["local-api", "--fail-rate", "2"], "--fail-rate"),
        (["submit", "--model", "m", "--prompt", "p", "--wait", "--timeout", "-5"], "--timeout"),
        (["demo", "--requests", "0"], "--requests"),
    ],
)
def test_an_option_out_of_its_range_is_refused_naming_it_before_anything_runs(
    tmp_path: Path, command: list[str], option: str
) -> None:
    # Given a value outside what the option allows (a port above 65535, no processes, ...)
    from typer.testing import CliRunner

    from worker.cli import app

    env = {"BATCHBRIDGE_DATA_DIR": str(tmp_path / "data")}
    env["BATCHBRIDGE_REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"

    # When the command is run
    done = CliRunner().invoke(app, command, env=env)

    # Then it exits 2 naming the option and its bound, having started and stored nothing
    assert done.exit_code == 2, done.output
    shown = " ".join(done.output.replace("│", " ").split())
    assert f"Invalid value for '{option}': " in shown
    assert "Input should be" in shown or "is not one of" in shown
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("since", ["800000d", "99999999999999d"])
def test_a_cost_window_too_long_for_the_calendar_is_refused_naming_the_option(
    tmp_path: Path, since: str
) -> None:
    # Given a --since so long that "now minus it" falls before year 1
    from typer.testing import CliRunner

    from worker.cli import app

    # When the cost report is asked for / Then one error line names --since and its bound
    env = {"BATCHBRIDGE_DATA_DIR": str(tmp_path / "data")}
    done = CliRunner().invoke(app, ["cost", "--since", since], env=env)
    assert done.exit_code == 2, done.output
    assert (
        done.output.strip()
        == f"error: --since: must be at most 100 years, e.g. 5200w (got '{since}')"
    )
