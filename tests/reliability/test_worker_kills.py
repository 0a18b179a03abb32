"""Killed workers: SIGKILL pool children at random moments, or the whole worker, while
requests flow through aggregate, submit, poll, collect and fan-out; nothing is lost,
repeated or billed twice.

Celery's prefork pool replaces a killed child; the task it ran is redelivered (acks late,
reject on worker lost) or simply run again at the next tick, and leases keep the redone
work single. A killed main process takes its pool with it; a new worker takes over once
the dead one's leases expire.
"""

from __future__ import annotations

import time

import pytest

from tests.reliability.conftest import ScenarioFactory
from tests.reliability.harness import Background, results_statuses


def child_kill_run(
    scenario: ScenarioFactory, name: str, requests: int, kills: int, chunk: int, pause: float
) -> None:
    """``requests`` arriving ``chunk`` every ``pause`` s; ``kills`` pool children killed."""
    run = scenario(name, api_args=("--line-delay", "0.002"))
    run.start_worker(concurrency=3)
    run.start_beat()
    run.supervise()
    arrivals = Background(run.submit, requests, chunk=chunk, pause=pause)

    # When pool children are killed 0.2-3 s apart while requests arrive and are worked on
    killed = 0
    give_up = time.monotonic() + 120  # a worker that stopped working must fail, not hang
    while killed < kills and (arrivals.is_alive() or run.delivered_count() < requests):
        assert time.monotonic() < give_up, f"{killed} kills in; see {run.tmp}"
        time.sleep(run.rng.uniform(0.2, 3.0))
        if run.kill_random_child() is not None:
            killed += 1
    arrivals.join()

    # Then every request is answered once (completed), and billed once
    run.finish(120, kills=killed, worker_restarts=lambda: run.worker_restarts)
    assert killed == kills, f"the work was done after {killed} of {kills} kills"
    assert set(results_statuses(run)) == {"completed"}


@pytest.mark.timeout(180)
def test_killing_pool_children_at_random_loses_and_repeats_nothing(
    scenario: ScenarioFactory,
) -> None:
    # Given a worker with three pool children and a provider that takes a while per line
    child_kill_run(scenario, "child-kill-fast", requests=2000, kills=5, chunk=100, pause=0.5)


@pytest.mark.chaos
@pytest.mark.timeout(420)
def test_twenty_child_kills_over_ten_thousand_requests(scenario: ScenarioFactory) -> None:
    # Given the same worker, and ten thousand requests
    child_kill_run(scenario, "child-kill", requests=10_000, kills=20, chunk=250, pause=0.8)


def main_kill_run(scenario: ScenarioFactory, name: str, requests: int, kills: int) -> None:
    """``kills`` times: SIGKILL the worker's main process (and pool), start a new one."""
    run = scenario(name, api_args=("--line-delay", "0.0005"))
    worker = run.start_worker(concurrency=2)
    run.start_beat()
    per_wave = requests // kills
    for wave in range(kills):
        run.submit(per_wave, chunk=250, pause=0.2, label=f"wave {wave}")
        # When the worker dies mid-wave (something delivered, not everything)
        target = run.delivered_count() + per_wave // 3
        run.wait_delivered(target, timeout=60)
        run.kill_worker(worker)
        time.sleep(run.rng.uniform(0.0, 2.0))
        worker = run.start_worker(concurrency=2)
    run.submit(requests - per_wave * kills, chunk=250, label="tail")

    # Then a new worker finishes everything, each request answered and billed once
    run.finish(240, kills=kills)
    assert set(results_statuses(run)) == {"completed"}


@pytest.mark.timeout(180)
def test_killing_the_worker_main_process_and_restarting_it(scenario: ScenarioFactory) -> None:
    # Given a worker, killed outright once mid-run and replaced
    main_kill_run(scenario, "main-kill-fast", requests=1500, kills=1)


@pytest.mark.chaos
@pytest.mark.timeout(420)
def test_killing_the_worker_main_process_five_times(scenario: ScenarioFactory) -> None:
    # Given a worker, killed outright five times over the run and replaced each time
    main_kill_run(scenario, "main-kill", requests=6000, kills=5)
