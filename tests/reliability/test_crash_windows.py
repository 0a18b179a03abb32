"""Crash windows: the worker SIGKILLs itself at each named step boundary, and nothing is
lost, repeated or billed twice.

The test-only crash plan (``BATCHBRIDGE_CRASH_AT``, see ``shared/crash_points.py``) kills the
pool child the first N times it reaches a step: after the claim, after the file write, after
the batch commit, after the upload, after the create, after a download, after a fan-out
chunk reached Redis, after it was recorded, after a webhook was accepted. Celery starts a
new child; leases, the reaper and the reconciler must finish the work. Each crash leaves a
marker, so the test also proves every window was really hit.

The fast test (in ``make test``) plans one crash at every step but the webhook send in one
run; the chaos test (``make chaos``) plans ten at each step, one run per step.
"""

from __future__ import annotations

import base64
import secrets
from pathlib import Path

import pytest

from shared.crash_points import CRASH_STEPS, crashes_so_far
from tests.reliability.conftest import ScenarioFactory
from tests.reliability.harness import Scenario
from tests.webhook_receiver import Receiver, serve_receiver

SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def run_with_crashes(
    scenario: ScenarioFactory,
    receiver: Receiver,
    tmp_path: Path,
    name: str,
    plan: dict[str, int],
    *,
    requests: int,
    timeout: float,
) -> Scenario:
    """Submit ``requests`` (half with a webhook) to a worker planned to crash per ``plan``."""
    markers = tmp_path / "crashes"
    markers.mkdir()
    run = scenario(
        name,
        crash_at=",".join(f"{step}*{n}" for step, n in plan.items()),
        crash_dir=markers,
        webhook_secret=SECRET,
        # A dead sender's claims lapse after the send timeout plus a minute, and count against
        # their endpoint's cap until then: a cap above one sender's claims keeps the others
        # sending meanwhile.
        webhook_timeout_seconds=5.0,
        webhook_endpoint_concurrency=256,
        max_batch_requests=100,
    )
    hook = receiver.script("/hook", 200)
    run.start_worker(concurrency=2)
    run.start_beat()
    run.supervise()

    # When requests arrive in waves while the worker dies at each planned step
    run.submit(requests // 2, chunk=100, pause=0.3, label="queue only")
    run.submit(requests // 2, chunk=100, pause=0.3, webhook_url=hook, label="with webhook")
    run.source.webhook_posts = lambda: (
        (d.event()["data"]["request_id"], receiver.url + d.path, d.webhook_id)
        for d in list(receiver.received)
    )

    # Then every request has one outcome, delivered once per destination, billed once
    run.finish(
        timeout,
        crashes=lambda: crashes_so_far(markers),
        worker_restarts=lambda: run.worker_restarts,
    )
    crashes = {step: crashes_so_far(markers, step) for step in plan}
    # And every planned crash really happened, so each window was exercised
    assert crashes == plan, crashes
    assert all(d.verified for d in receiver.received)
    return run


@pytest.mark.timeout(240)
def test_one_crash_at_every_step_boundary_loses_and_repeats_nothing(
    scenario: ScenarioFactory, tmp_path: Path
) -> None:
    # Given a worker planned to die once at every step boundary of a request's life (but the
    # webhook send: a dead sender's claim lapses only after the send timeout plus a minute,
    # which the chaos run waits out)
    steps = [step for step in CRASH_STEPS if step != "after_webhook_send"]
    with serve_receiver(SECRET) as receiver:
        run_with_crashes(
            scenario,
            receiver,
            tmp_path,
            "crash-windows-fast",
            dict.fromkeys(steps, 1),
            requests=1000,
            timeout=150,
        )


@pytest.mark.chaos
@pytest.mark.timeout(300)
@pytest.mark.parametrize("step", sorted(CRASH_STEPS))
def test_ten_crashes_at_one_step_boundary_lose_and_repeat_nothing(
    scenario: ScenarioFactory, tmp_path: Path, step: str
) -> None:
    # Given a worker planned to die the first ten times it reaches one step boundary
    with serve_receiver(SECRET) as receiver:
        run_with_crashes(
            scenario,
            receiver,
            tmp_path,
            f"crash-windows-{step}",
            {step: 10},
            requests=2000,
            timeout=240,
        )
