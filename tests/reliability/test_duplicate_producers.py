"""Duplicate producers: three processes (sync and asyncio) submit the same idempotency keys
at the same moment; each key becomes one request, packed, billed and answered once.

Counted from effects: the request ids each process got back (one per key, the same in
every process), the buffer and batch entries, provider input lines and stream entries.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.conftest import settings_env
from tests.reliability.conftest import ScenarioFactory


def race_producers(scenario: ScenarioFactory, tmp_path: Path, name: str, keys: int) -> None:
    """Three producers (sync, async, sync) racing over ``keys`` idempotency keys."""
    run = scenario(name, api_args=("--line-delay", "0.0002"))
    run.start_worker(concurrency=2)
    run.start_beat()
    env = {**settings_env(run.settings), "PYTHONPATH": str(Path.cwd())}
    outs = [tmp_path / f"producer-{n}.json" for n in range(3)]
    modes = ["sync", "async", "sync"]

    # When three producers submit the same keys at once
    racers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.reliability.duplicate_producer", mode, str(keys), out],
            env=env,
        )
        for mode, out in zip(modes, outs, strict=True)
    ]
    assert [p.wait(120) for p in racers] == [0, 0, 0]

    # Then every process got the same request id for each key
    answers = [orjson.loads(out.read_bytes()) for out in outs]
    assert [len(a) for a in answers] == [keys] * 3
    assert answers[0] == answers[1] == answers[2]
    ids = answers[0]
    assert len(set(ids.values())) == keys
    for request_id in ids.values():
        run.expected.add(request_id, "svc")

    # And each request was packed, billed and answered exactly once
    run.finish(240, producers=3, keys=keys)
    offered = sum(
        1
        for store in run.source.stores
        for job in store.list_jobs()
        for _ in store.file_path(job.input_file_id).read_bytes().splitlines()
    )
    assert offered == keys


@pytest.mark.timeout(180)
def test_three_producers_racing_over_the_same_keys_make_each_request_once(
    scenario: ScenarioFactory, tmp_path: Path
) -> None:
    race_producers(scenario, tmp_path, "duplicate-producers-fast", keys=2000)


@pytest.mark.chaos
@pytest.mark.timeout(300)
def test_three_producers_racing_over_ten_thousand_keys(
    scenario: ScenarioFactory, tmp_path: Path
) -> None:
    race_producers(scenario, tmp_path, "duplicate-producers", keys=10_000)
