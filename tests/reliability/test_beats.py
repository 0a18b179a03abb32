"""Beats: the beat killed mid-run and replaced, and two or three beats ticking at once.

Beat only sends wake-ups; every periodic step runs under a Redis lease, so a tick sent twice
(or three times) is an idle task run, and a beat that dies costs latency until another one
ticks, never work.
"""

from __future__ import annotations

import time

import pytest

from tests.reliability.conftest import ScenarioFactory
from tests.reliability.harness import results_statuses


def many_beats_run(scenario: ScenarioFactory, name: str, beats: int, requests: int) -> None:
    """``beats`` beats at once over one worker, ``requests`` arriving in waves."""
    run = scenario(name, api_args=("--line-delay", "0.0005"))
    run.start_worker(concurrency=3)
    for _ in range(beats):
        run.start_beat()

    # When requests arrive while every beat ticks every step
    run.submit(requests, chunk=250, pause=0.3, label=f"{beats} beats")

    # Then each is answered and billed once, as with one beat
    run.finish(180, beats=beats)
    assert set(results_statuses(run)) == {"completed"}


@pytest.mark.timeout(150)
def test_three_beats_at_once_do_each_step_once(scenario: ScenarioFactory) -> None:
    many_beats_run(scenario, "three-beats-fast", beats=3, requests=1500)


@pytest.mark.chaos
@pytest.mark.timeout(300)
@pytest.mark.parametrize("beats", [2, 3])
def test_two_and_three_beats_over_ten_thousand_requests(
    scenario: ScenarioFactory, beats: int
) -> None:
    many_beats_run(scenario, f"beats-{beats}", beats=beats, requests=10_000)


@pytest.mark.chaos
@pytest.mark.timeout(300)
def test_killing_the_beat_mid_run_stalls_work_until_another_beat_ticks(
    scenario: ScenarioFactory,
) -> None:
    # Given a worker and its beat, with work flowing
    run = scenario("beat-kill", api_args=("--line-delay", "0.0005"))
    run.start_worker(concurrency=2)
    beat = run.start_beat()
    run.submit(3000, chunk=250, pause=0.3, label="before the kill")
    run.wait_delivered(1000, timeout=60)

    # When the beat is SIGKILLed and more requests arrive
    beat.kill()
    time.sleep(3)  # wake-ups already queued drain
    run.submit(2000, chunk=250, label="without a beat")
    stalled_at = run.delivered_count()
    time.sleep(5)
    # Then nothing moves without a beat (the worker runs no schedule of its own) ...
    assert run.delivered_count() - stalled_at < 500
    # ... and once a new beat starts, everything is answered once and billed once
    run.start_beat()
    run.finish(180, beat_kills=1)
    assert set(results_statuses(run)) == {"completed"}
