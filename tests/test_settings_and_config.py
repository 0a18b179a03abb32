"""Settings fail at start-up naming the variable; Celery runs only with safe delivery settings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from celery import Celery

from shared.settings import Settings, SettingsError
from worker.app import UnsafeCeleryConfig, celery_config, check_delivery_invariants


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"BATCHBRIDGE_MAX_BATCH_REQUESTS": "50001"}, "BATCHBRIDGE_MAX_BATCH_REQUESTS"),
        ({"BATCHBRIDGE_MAX_BATCH_REQUESTS": "lots"}, "BATCHBRIDGE_MAX_BATCH_REQUESTS"),
        ({"BATCHBRIDGE_MAX_BATCH_BYTES": "200000000"}, "BATCHBRIDGE_MAX_BATCH_BYTES"),
        ({"BATCHBRIDGE_MAX_WAIT_SECONDS": "0"}, "BATCHBRIDGE_MAX_WAIT_SECONDS"),
        ({"BATCHBRIDGE_POLL_INTERVAL_SECONDS": "-1"}, "BATCHBRIDGE_POLL_INTERVAL_SECONDS"),
        ({"BATCHBRIDGE_PROVIDER": "openai"}, "BATCHBRIDGE_PROVIDER"),
        ({"BATCHBRIDGE_KEY_PREFIX": "has space"}, "BATCHBRIDGE_KEY_PREFIX"),
        (
            {"BATCHBRIDGE_TASK_TIME_LIMIT_SECONDS": "3000"},
            "BATCHBRIDGE_TASK_TIME_LIMIT_SECONDS",
        ),
    ],
)
def test_invalid_setting_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], names: str
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SettingsError) as err:
        Settings.load()
    assert names in str(err.value)


def test_provider_defaults_to_together_only_when_a_key_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("BATCHBRIDGE_PROVIDER", raising=False)
    monkeypatch.delenv("TOGETHER_API_KEY", raising=False)
    assert Settings.load().default_provider == "local"
    monkeypatch.setenv("TOGETHER_API_KEY", "secret")
    assert Settings.load().default_provider == "together"
    monkeypatch.setenv("BATCHBRIDGE_PROVIDER", "local")
    assert Settings.load().default_provider == "local"


def test_cli_refuses_to_start_with_a_bad_variable_and_names_it(tmp_path: Path) -> None:
    env = {"BATCHBRIDGE_MAX_BATCH_REQUESTS": "0", "BATCHBRIDGE_DATA_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", "status"],
        env={**env, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "BATCHBRIDGE_MAX_BATCH_REQUESTS" in done.stderr


def test_celery_config_has_one_visibility_timeout_and_safe_acks() -> None:
    settings = Settings.load(visibility_timeout_seconds=1800, task_time_limit_seconds=600)
    app = Celery("t")
    app.conf.update(celery_config(settings, "redis://127.0.0.1:1/0"))
    check_delivery_invariants(app.conf, settings)
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost
    assert app.conf.worker_prefetch_multiplier == 1
    assert app.conf.broker_transport_options["visibility_timeout"] == 1800


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"task_acks_late": False}, "task_acks_late"),
        ({"task_reject_on_worker_lost": False}, "task_reject_on_worker_lost"),
        ({"worker_prefetch_multiplier": 4}, "worker_prefetch_multiplier"),
        ({"broker_transport_options": {"visibility_timeout": 60}}, "broker_transport_options"),
        ({"visibility_timeout": 10}, "visibility_timeout"),
        ({"task_time_limit": 3000}, "task_time_limit"),
    ],
)
def test_unsafe_celery_config_is_refused(change: dict[str, object], complaint: str) -> None:
    settings = Settings.load()
    app = Celery("t")
    app.conf.update(celery_config(settings, "redis://127.0.0.1:1/0"))
    app.conf.update(change)
    with pytest.raises(UnsafeCeleryConfig, match=complaint):
        check_delivery_invariants(app.conf, settings)
