"""Errors a person can act on, secrets that stay secret, logs that say what happened."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from shared.errors import describe_error
from shared.schemas import new_request_ids
from shared.settings import Settings, SettingsError, unknown_variables
from shared.startup_checks import SetupError, check_database, check_redis, ensure_data_dir
from shared.urls import safe_url
from worker import task_summaries
from worker.app import create_app
from worker.log_format import JsonFormatter, QuietTicks
from worker.packing import PackedBatch
from worker.reconciler import ReconcileReport
from worker.webhook_sender import SendReport

PASSWORD = "hunter2-do-not-print"


def test_a_misspelled_variable_is_warned_about_with_the_closest_name() -> None:
    # Given a typo'd setting, a real one, and variables other parts of batchbridge read
    environ = {
        "BATCHBRIDGE_MAX_BATCH_REQUEST": "5",
        "BATCHBRIDGE_MAX_WAIT_SECONDS": "3",
        "BATCHBRIDGE_LOCAL_FAIL_RATE": "0.1",
        "BATCHBRIDGE_TEST_REDIS_URL": "redis://x",
        "BATCHBRIDGE_IMAGE": "registry.example/batchbridge:1",  # docker-compose's
        "BATCHBRIDGE_ZZZ": "1",
        "PATH": "/bin",
    }
    # When the environment is checked / Then only the unknown ones are named, with a hint
    warnings = unknown_variables(environ)
    assert len(warnings) == 2
    assert "BATCHBRIDGE_MAX_BATCH_REQUEST is not a batchbridge setting" in warnings[0]
    assert "did you mean BATCHBRIDGE_MAX_BATCH_REQUESTS?" in warnings[0]
    assert warnings[1].startswith("BATCHBRIDGE_ZZZ ") and "did you mean" not in warnings[1]


def test_loading_settings_logs_the_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("BATCHBRIDGE_POLL_INTERVAL", "5")
    with caplog.at_level(logging.WARNING, logger="batchbridge.settings"):
        Settings.load()
    assert "did you mean BATCHBRIDGE_POLL_INTERVAL_SECONDS?" in caplog.text


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("BATCHBRIDGE_REDIS_URL", "localhost:6379"),
        ("BATCHBRIDGE_REDIS_URL", "http://localhost:6379"),
        ("BATCHBRIDGE_REDIS_URL", "rediss:///0"),
        ("BATCHBRIDGE_REDIS_URL", f"redis://:{PASSWORD}@host:notaport/0"),
        ("BATCHBRIDGE_REDIS_URL", f"redis://:{PASSWORD}@host:6379/zero"),
        # Passwords holding a character that ends the host part: urllib takes their start
        # for a port, or their end for the database
        ("BATCHBRIDGE_REDIS_URL", f"redis://:{PASSWORD}/rest@host:6379/0"),
        ("BATCHBRIDGE_REDIS_URL", f"redis://:{PASSWORD}#rest@host:6379/0"),
        ("BATCHBRIDGE_REDIS_URL", f"redis://user:123/{PASSWORD}@host:6379/0"),
        ("BATCHBRIDGE_CALLBACK_VISIBILITY_TIMEOUT_SECONDS", "inf"),
        ("BATCHBRIDGE_WEBHOOK_RETRY_SCHEDULE", "0,nan"),
        ("BATCHBRIDGE_IDEMPOTENCY_TTL_SECONDS", "9223372036854775808"),
        ("BATCHBRIDGE_DATABASE_URL", "notaurl"),
        ("BATCHBRIDGE_DATABASE_URL", f"postgresql://u:{PASSWORD}@host:port/db"),
    ],
)
def test_a_bad_value_fails_at_load_naming_the_variable_and_never_a_password(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as err:
        Settings.load()
    assert variable in str(err.value)
    if variable.endswith("_URL"):
        assert PASSWORD not in str(err.value)
        assert value not in str(err.value)


def test_a_variable_that_is_not_the_json_it_must_be_is_named_and_not_shown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given endpoint secrets that are not JSON (here: a bare secret, as for webhook_secret)
    monkeypatch.setenv("BATCHBRIDGE_WEBHOOK_ENDPOINT_SECRETS", f"whsec_{PASSWORD}")
    # When the settings load / Then the error is ours, naming the variable and the shape
    with pytest.raises(SettingsError) as err:
        Settings.load()
    message = str(err.value)
    assert message.startswith("invalid settings: BATCHBRIDGE_WEBHOOK_ENDPOINT_SECRETS: ")
    assert "JSON object" in message and PASSWORD not in message


def test_urls_with_passwords_are_kept_out_of_reprs_and_celery_conf(tmp_path: Path) -> None:
    # Given settings whose Redis and database URLs carry passwords
    settings = Settings.load(
        data_dir=tmp_path,
        redis_url=f"redis://:{PASSWORD}@127.0.0.1:6390/0",
        database_url=f"postgresql+psycopg://bb:{PASSWORD}@127.0.0.1/bb",
    )
    # Then neither the settings' repr nor the Celery configuration a worker reports shows them
    assert PASSWORD not in repr(settings)
    app = create_app(settings)
    from celery.app.utils import filter_hidden_settings

    shown = repr(filter_hidden_settings(app.conf.table(with_defaults=False)))
    assert PASSWORD not in shown
    assert "batchbridge_settings" not in shown
    assert settings.configured_redis_url is not None and PASSWORD in settings.configured_redis_url


def test_safe_url_masks_only_the_password() -> None:
    assert safe_url(f"redis://:{PASSWORD}@h:1/0") == "redis://:***@h:1/0"
    assert safe_url(f"postgresql://bb:{PASSWORD}@db/x") == "postgresql://bb:***@db/x"
    assert safe_url("redis://h:1/0") == "redis://h:1/0"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            f"postgresql+psycopg://bb@db/bb?password={PASSWORD}",
            "postgresql+psycopg://bb@db/bb?password=***",
        ),
        (
            f"redis://h:1/0?password={PASSWORD}&socket_timeout=3",
            "redis://h:1/0?password=***&socket_timeout=3",
        ),
        (
            f"postgresql://bb:{PASSWORD}@db/x?sslmode=require&sslpassword={PASSWORD}",
            "postgresql://bb:***@db/x?sslmode=require&sslpassword=***",
        ),
        ("postgresql://bb@db/x?sslmode=require", "postgresql://bb@db/x?sslmode=require"),
    ],
)
def test_safe_url_masks_a_password_given_in_the_query_too(url: str, shown: str) -> None:
    # Given a URL whose driver takes the password from its query string
    # When it is made fit for output / Then the secret values are masked and nothing else
    assert safe_url(url) == shown


def test_errors_echoing_a_query_string_password_are_redacted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a database URL carrying its password in the query, as libpq allows
    monkeypatch.setenv("BATCHBRIDGE_DATABASE_URL", f"postgresql://bb@db/bb?password={PASSWORD}")
    # When a driver's error echoes the URL or the password
    exc = RuntimeError(f"connection to postgresql://bb@db/bb?password={PASSWORD} failed")
    # Then the one line shown has the password masked
    assert PASSWORD not in describe_error(exc)
    assert "password=***" in describe_error(exc)


def test_an_unreachable_redis_is_one_line_naming_the_variable_and_address() -> None:
    from shared.embedded_redis import free_port

    port = free_port()
    with pytest.raises(SetupError) as err:
        check_redis(f"redis://:{PASSWORD}@127.0.0.1:{port}/0", timeout=1)
    message = str(err.value)
    assert "BATCHBRIDGE_REDIS_URL" in message and f"127.0.0.1:{port}" in message
    assert PASSWORD not in message and "\n" not in message


def test_an_unreachable_database_is_one_line_without_the_password(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from shared.embedded_redis import free_port

    url = f"postgresql+psycopg://bb:{PASSWORD}@127.0.0.1:{free_port()}/bb"
    monkeypatch.setenv("BATCHBRIDGE_DATABASE_URL", url)
    with pytest.raises(SetupError) as err:
        check_database(Settings.load(data_dir=tmp_path))
    message = str(err.value)
    assert "BATCHBRIDGE_DATABASE_URL" in message and "bb:***@127.0.0.1" in message
    assert PASSWORD not in message and "\n" not in message


def test_a_data_dir_that_cannot_be_written_names_the_variable(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(SetupError, match="BATCHBRIDGE_DATA_DIR"):
        ensure_data_dir(Settings.load(data_dir=blocker / "data"))
    # and one that does not exist yet is created
    assert ensure_data_dir(Settings.load(data_dir=tmp_path / "new" / "dir")).is_dir()


def test_driver_errors_are_described_without_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHBRIDGE_DATABASE_URL", f"postgresql://bb:{PASSWORD}@db/x")
    exc = OperationalError("SELECT 1", {}, Exception(f"could not connect to bb:{PASSWORD}@db"))
    described = describe_error(exc)
    assert described.startswith("cannot use the database (BATCHBRIDGE_DATABASE_URL)")
    assert PASSWORD not in described


def _record(
    name: str, msg: str, args: object = None, level: int = logging.INFO
) -> logging.LogRecord:
    record = logging.LogRecord(name, level, __file__, 1, msg, None, None)
    record.args = args  # type: ignore[assignment]
    return record


def test_idle_ticks_are_kept_out_of_the_info_log_and_work_is_not() -> None:
    quiet = QuietTicks()
    tick = {"name": "batchbridge.aggregate", "id": "x", "runtime": 0.01}
    assert not quiet.filter(
        _record("celery.beat", "Scheduler: Sending due task %s (%s)", ("a", "b"))
    )
    assert not quiet.filter(_record("celery.worker.strategy", "Task %(name)s received", tick))
    idle = {**tick, "return_value": "'idle'"}
    assert not quiet.filter(_record("celery.app.trace", "Task %(name)s succeeded", idle))
    busy = {**tick, "return_value": "'packed 1 batch (m 3)'"}
    assert quiet.filter(_record("celery.app.trace", "Task %(name)s succeeded", busy))
    assert quiet.filter(_record("celery.beat", "Scheduler: Sending due task", level=logging.ERROR))
    assert quiet.filter(_record("batchbridge", "anything else"))


def test_json_lines_carry_batch_and_request_ids() -> None:
    batch_id, request_id = "0" * 12 + "ab" * 8, new_request_ids(1)[0]
    record = _record("worker.lifecycle", f"batch {batch_id} failed its request {request_id}")
    entry = json.loads(JsonFormatter().format(record))
    assert entry["batch_id"] == batch_id and entry["request_id"] == request_id
    assert entry["level"] == "INFO" and entry["logger"] == "worker.lifecycle"
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.emit(_record("x", "plain"))
    assert json.loads(stream.getvalue())["message"] == "plain"


def test_task_summaries_say_what_happened_and_idle_when_nothing_did() -> None:
    batches = [
        PackedBatch("b1", "local", "m-a", 10_000, 1, "count", Path("x")),
        PackedBatch("b2", "local", "m-b", 421, 1, "age", Path("y")),
    ]
    assert task_summaries.packed(batches) == "packed 2 batches (m-a 10000, m-b 421)"
    assert task_summaries.packed([]) == task_summaries.IDLE
    ids = [f"b{i}" for i in range(7)]
    assert task_summaries.batches_did("collected", ids) == (
        "collected 7 batches: b0, b1, b2, b3, b4 and 2 more"
    )
    assert task_summaries.batches_did("submitted", ["b9"]) == "submitted 1 batch: b9"
    assert task_summaries.reaped(0) == "idle" and "3 requests" in task_summaries.reaped(3)
    assert task_summaries.reconciled(ReconcileReport()) == "idle"
    assert task_summaries.reconciled(ReconcileReport(requeued=2)).startswith("reconciled 2")
    sent = SendReport(settled=3, delivered=3)
    assert task_summaries.webhooks_sent(sent) == "webhooks: 3 delivered, 0 retrying, 0 dead"
    assert task_summaries.webhooks_sent(SendReport()) == "idle"
    # Deliveries held back by the per-endpoint cap are said to be, not blamed on the SSRF guard
    capped = SendReport(settled=1, delivered=1, capped=128)
    assert task_summaries.webhooks_sent(capped) == (
        "webhooks: 1 delivered, 0 retrying, 0 dead, 128 waiting for their endpoint's "
        "concurrency cap"
    )


def test_a_bare_postgresql_url_uses_the_driver_that_ships(tmp_path: Path) -> None:
    settings = Settings.load(data_dir=tmp_path, database_url="postgresql://u:p@db:5432/bb")
    assert settings.sqlalchemy_url == "postgresql+psycopg://u:p@db:5432/bb"
    other = Settings.load(data_dir=tmp_path, database_url="postgres://u@db/bb")
    assert other.sqlalchemy_url == "postgresql+psycopg://u@db/bb"


def test_a_database_driver_that_is_not_installed_is_named(tmp_path: Path) -> None:
    settings = Settings.load(data_dir=tmp_path, database_url="mysql+pymysql://u@127.0.0.1/bb")
    with pytest.raises(SetupError) as err:
        check_database(settings)
    assert "BATCHBRIDGE_DATABASE_URL" in str(err.value) and "'pymysql'" in str(err.value)
    assert "batchbridge[postgres]" in str(err.value)


def test_sqlite_beside_a_redis_on_another_host_is_warned_about(tmp_path: Path) -> None:
    from shared.startup_checks import sqlite_beside_remote_redis

    sqlite = Settings.load(data_dir=tmp_path)
    assert "use PostgreSQL" in (sqlite_beside_remote_redis(sqlite, "redis://10.1.2.3:6379/0") or "")
    assert sqlite_beside_remote_redis(sqlite, "redis://127.0.0.1:6379/0") is None
    postgres = Settings.load(data_dir=tmp_path, database_url="postgresql://u@db/bb")
    assert sqlite_beside_remote_redis(postgres, "redis://10.1.2.3:6379/0") is None


def test_the_together_key_is_a_secret_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TOGETHER_API_KEY", PASSWORD)
    settings = Settings.load(data_dir=tmp_path)
    assert settings.together_api_key is not None
    assert settings.together_api_key.get_secret_value() == PASSWORD
    assert PASSWORD not in repr(settings) and settings.default_provider == "together"
    assert unknown_variables({"BATCHBRIDGE_TOGETHER_API_KEY": "x"}) == []
