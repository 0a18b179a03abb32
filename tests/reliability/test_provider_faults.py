"""Provider faults, all at once, from ``local-api``: 20% of calls answered 429/500, creates
that take effect but lose their answer, 5% of lines failed with a retryable error, slow
lines, a burst of 404s on retrieve, a batch that expires part-way, and batches that
complete without naming an output file.

Each fault has its rule: retry what did not happen, adopt what did, re-run only lines that
did not run (a completed batch that names no output file, after a grace, counts as not
run). The ledger proves the rules hold together.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest

from shared.providers.local.records import JobStatus
from tests.reliability.conftest import ScenarioFactory
from tests.reliability.harness import results_statuses

FAULTS = (
    "--fail-rate", "0.2",
    "--lost-answer-rate", "0.2",
    "--line-error-rate", "0.05",
    "--line-delay", "0.002",
    "--not-found-window", "6:6",
    "--expire-after", "2.5",
    "--no-output-rate", "0.1",
)  # fmt: skip


@pytest.mark.chaos
@pytest.mark.timeout(400)
def test_every_provider_fault_at_once_loses_and_repeats_nothing(
    scenario: ScenarioFactory,
) -> None:
    # Given a local-api with every fault on, and batches of up to 2,000 requests
    run = scenario(
        "provider-faults",
        api_args=FAULTS,
        api_env={"BATCHBRIDGE_LOCAL_FAULT_SEED": "11"},
        max_batch_requests=2000,
        missing_output_grace_seconds=3.0,
        lost_job_grace_seconds=20.0,
    )
    run.start_worker(concurrency=3)
    run.start_beat()

    # When requests trickle in, with one burst big enough to make a batch that expires
    run.submit(1500, chunk=100, pause=0.4, label="trickle")
    run.submit(2000, chunk=2000, label="burst")
    run.submit(1500, chunk=100, pause=0.4, label="after")

    # Then every request has one outcome, delivered once, and billed at most once
    statuses = Counter[str]()
    run.finish(300, statuses=lambda: dict(statuses.update(results_statuses(run)) or statuses))
    # And the faults really happened, each of them
    log = (run.tmp / "local-api-0.log").read_text()
    assert re.search(r'"POST /v1/batches HTTP/1.1" 50[04]', log)
    assert re.search(r'"GET /v1/batches/[^ ]+ HTTP/1.1" 404', log)
    assert re.search(r"HTTP/1.1\" 429", log)
    jobs = [job for store in run.source.stores for job in store.list_jobs()]
    assert any(job.status is JobStatus.EXPIRED for job in jobs)
    completed_empty = [j for j in jobs if j.status is JobStatus.COMPLETED and not j.output_file_id]
    assert completed_empty, "no batch completed without output"
    # And most requests completed; the others failed with a stated reason
    assert statuses["completed"] > 0.7 * run.expected.ids.__len__()
