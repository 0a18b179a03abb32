"""Two hosts, no shared disk: two workers whose data directories are hidden from each other
(each in a mount namespace of its own), one Redis, one PostgreSQL database, one provider,
and one host killed every minute (the other carries on; the dead one comes back).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import PG_URL, private_postgres_database
from tests.reliability.conftest import ScenarioFactory
from tests.reliability.harness import Background, results_statuses
from tests.test_shared_nothing import HiddenWorker

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.skipif(PG_URL is None, reason="needs BATCHBRIDGE_TEST_DATABASE_URL (PostgreSQL)"),
    pytest.mark.skipif(
        shutil.which("unshare") is None or os.geteuid() != 0,
        reason="hiding each worker's data directory needs unshare -m as root",
    ),
]

MINUTES = 3


@pytest.mark.timeout(MINUTES * 60 + 300)
def test_two_hosts_one_killed_every_minute_lose_and_repeat_nothing(
    scenario: ScenarioFactory, tmp_path: Path
) -> None:
    assert PG_URL is not None
    with private_postgres_database(PG_URL) as database:
        # Given two hosts that share Redis, the database and the provider, but no disk
        dirs = [tmp_path / "host-a", tmp_path / "host-b"]
        for folder in dirs:
            folder.mkdir()
        run = scenario(
            "two-hosts",
            api_args=("--line-delay", "0.001"),
            data_dir=dirs[0],
            database_url=database,
            max_batch_requests=200,
        )
        settings = [run.settings, run.settings.model_copy(update={"data_dir": dirs[1]})]
        logs = [tmp_path / "host-a.log", tmp_path / "host-b.log"]

        def host(i: int) -> HiddenWorker:
            return HiddenWorker(settings[i], dirs[1 - i], logs[i], run.api.url, run.api.api_key)

        hosts = [host(0), host(1)]
        try:
            # When requests arrive for three minutes while, each minute, one host dies
            arrivals = Background(
                run.submit, MINUTES * 2000, chunk=100, pause=60 / 20 - 0.05, label="hosts"
            )
            kills = 0
            for minute in range(MINUTES):
                time.sleep(run.rng.uniform(20, 40))
                victim = minute % 2
                hosts[victim].kill()
                kills += 1
                time.sleep(run.rng.uniform(5, 15))
                hosts[victim] = host(victim)
            arrivals.join()

            # Then every request is answered once and billed once
            run.finish(240, host_kills=kills)
            assert set(results_statuses(run)) == {"completed"}
            # And batch files crossed hosts (rebuilt from Redis by a host that had not packed)
            text = "".join(log.read_text(errors="replace") for log in logs)
            assert "rebuilt its file from Redis" in text
        finally:
            for each in hosts:
                each.stop()
            if run.source.engine is not None:
                run.source.engine.dispose()
