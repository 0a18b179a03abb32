"""The test-only crash plan: parsed strictly, and a planned crash really kills the process,
the planned number of times, counted across restarts."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from shared.crash_points import CrashPlan, crashes_so_far, parse_crash_plan
from shared.settings import Settings, SettingsError


def test_the_plan_reads_steps_with_optional_counts() -> None:
    assert parse_crash_plan("after_upload*3, after_claim") == {"after_upload": 3, "after_claim": 1}
    assert parse_crash_plan('{"after_create": 2}') == {"after_create": 2}
    assert parse_crash_plan("") == {}


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        ("after_lunch", "unknown step 'after_lunch'"),
        ("after_upload*x", "N must be a whole number"),
        ("after_upload*0", "N must be at least 1"),
    ],
)
def test_a_bad_plan_is_refused_naming_the_variable(
    value: str, complaint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Given a crash plan naming a step that does not exist, or a bad count
    monkeypatch.setenv("BATCHBRIDGE_CRASH_AT", value)
    monkeypatch.setenv("BATCHBRIDGE_CRASH_DIR", str(tmp_path))
    # Then the settings refuse it, naming the variable and the rule
    with pytest.raises(SettingsError, match=f"BATCHBRIDGE_CRASH_AT: .*{complaint}"):
        Settings.load()


def test_a_plan_without_a_marker_folder_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHBRIDGE_CRASH_AT", "after_upload")
    with pytest.raises(SettingsError, match="BATCHBRIDGE_CRASH_AT needs BATCHBRIDGE_CRASH_DIR"):
        Settings.load()


def reach(step: str, plan: str, markers: Path) -> int:
    """Run a process that reaches ``step`` under ``plan``; its exit code."""
    code = (
        "from pathlib import Path\n"
        "from shared.crash_points import CrashPlan, parse_crash_plan\n"
        f"CrashPlan(parse_crash_plan({plan!r}), Path({str(markers)!r})).reached({step!r})\n"
    )
    return subprocess.run([sys.executable, "-c", code], timeout=60).returncode


def test_a_planned_step_kills_the_process_the_planned_number_of_times(tmp_path: Path) -> None:
    # Given a plan to crash twice after an upload
    plan = "after_upload*2"
    # When processes reach that step three times, and another step once
    codes = [reach("after_upload", plan, tmp_path) for _ in range(3)]
    other = reach("after_create", plan, tmp_path)
    # Then the first two were SIGKILLed, the third went on, and the other step is untouched
    assert codes == [-signal.SIGKILL, -signal.SIGKILL, 0]
    assert other == 0
    assert crashes_so_far(tmp_path, "after_upload") == 2
    assert crashes_so_far(tmp_path) == 2


def test_an_empty_plan_does_nothing(tmp_path: Path) -> None:
    CrashPlan({}, tmp_path).reached("after_upload")
    assert crashes_so_far(tmp_path) == 0
