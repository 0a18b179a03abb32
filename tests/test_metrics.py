"""Prometheus metrics: scraped from Redis and SQL, they agree with what the pipeline did.

Requests go in through the producer, the pipeline runs its steps in this process against
the local provider (``drive_pipeline``), and the collector is scraped the way Prometheus
would: its text output parsed back with prometheus_client's own parser.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from sqlalchemy import func
from sqlmodel import select
from typer.testing import CliRunner

from producer import CallbackQueue, Producer, Result
from shared.counters import LATENCY_BUCKETS, Counters, instrument_provider
from shared.embedded_redis import free_port
from shared.models import Batch, BatchState, Request
from shared.providers.base import ProviderError
from shared.providers.local import EchoEngine, LocalProvider, run_job
from shared.providers.local.faults import CallFaults, Faults, InjectedFailure
from shared.settings import Settings
from tests.conftest import (
    PIPELINE_MESSAGES,
    drive_pipeline,
    make_settings,
    run_local_jobs,
    settings_env,
)
from tests.webhook_receiver import Receiver, serve_receiver
from worker import cli_metrics
from worker.context import WorkerContext
from worker.metrics import BatchbridgeCollector
from worker.metrics_server import MetricsServer
from worker.webhook_sender import deliver_due

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
SECRET = "whsec_" + base64.b64encode(b"batchbridge-metrics-secret-01").decode()
LUA = Path(__file__).resolve().parent.parent / "shared" / "redis_scripts" / "_terminal.lua"


def documented_metrics() -> dict[str, str]:
    """Name -> type of each metric in the README's table."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    rows = re.findall(r"^\| `(batchbridge_\w+)` \| (\w+) \|", readme, re.MULTILINE)
    return dict(rows)


def scrape(collector: BatchbridgeCollector) -> str:
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


def samples_of(text: str) -> Samples:
    """Every sample of an exposition, keyed by (sample name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every sample called ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, got), v in samples.items() if n == name and wanted <= got)


@pytest.fixture
def collector(ctx: WorkerContext) -> Iterator[BatchbridgeCollector]:
    """A collector with connections of its own, as a separate metrics server would have."""
    made = BatchbridgeCollector(ctx.settings)
    try:
        yield made
    finally:
        made.close()


def submit(
    ctx: WorkerContext, n: int, *, model: str = "m-a", queue: str = "svc", **extra: object
) -> list[str]:
    producer = Producer(settings=ctx.settings, client=ctx.redis)
    requests = [
        {"model": model, "messages": PIPELINE_MESSAGES, "callback_queue": queue, **extra}
        for _ in range(n)
    ]
    return [handle.id for handle in producer.submit_many(requests)]


def results_on(ctx: WorkerContext, queue: str) -> list[Result]:
    entries: Any = ctx.redis.xrange(ctx.keys.callback(queue))
    return [Result.from_json(fields[b"result"]) for _, fields in entries]


def drive_until_done(ctx: WorkerContext, run_jobs: object = None, rounds: int = 12) -> None:
    """Pipeline passes until nothing is pending or in a batch."""
    for _ in range(rounds):
        if run_jobs is None:
            drive_pipeline(ctx)
        else:
            _drive_with(ctx, run_jobs)
        with ctx.session() as session:
            open_batches = session.exec(
                select(func.count())
                .select_from(Batch)
                .where(Batch.state != BatchState.FINISHED.value)
            ).one()
        pending = sum(int(n) for n in ctx.redis.hvals(ctx.keys.buffers))
        if not open_batches and not pending:
            return
    raise AssertionError("the pipeline did not finish its work")


def _drive_with(ctx: WorkerContext, run_jobs: object) -> None:
    from worker.collection import collect_ready_batches
    from worker.lifecycle import submit_ready_batches
    from worker.packing import pack_due_buffers
    from worker.polling import poll_due_batches

    pack_due_buffers(ctx, force=True)
    submit_ready_batches(ctx)
    run_jobs(ctx)  # type: ignore[operator]
    time.sleep(0.02)
    poll_due_batches(ctx)
    collect_ready_batches(ctx)


def test_pending_outcomes_latency_tokens_and_backlog_follow_the_workload(
    ctx: WorkerContext, collector: BatchbridgeCollector
) -> None:
    # Given 12 requests for m-a (no provider named) and 3 for m-b on the local provider
    a_ids = submit(ctx, 12)
    submit(ctx, 3, model="m-b", queue="other", provider="local")
    # Then the buffers show them, with their bytes and an age
    before = samples_of(scrape(collector))
    assert value(before, "batchbridge_pending_requests", provider="default", model="m-a") == 12
    assert value(before, "batchbridge_pending_requests", provider="local", model="m-b") == 3
    bytes_a = int(ctx.redis.hget(ctx.keys.buffers, "default:m-a") or 0)
    assert bytes_a > 0
    assert value(before, "batchbridge_pending_bytes", provider="default", model="m-a") == bytes_a
    age = value(before, "batchbridge_oldest_pending_age_seconds", provider="default", model="m-a")
    assert 0 <= age < 60
    assert total(before, "batchbridge_requests_total") == 0
    assert total(before, "batchbridge_request_latency_seconds_count") == 0
    assert value(before, "batchbridge_metrics_source_up", source="redis") == 1
    assert value(before, "batchbridge_metrics_source_up", source="sql") == 1
    # When one is cancelled in its buffer and the pipeline runs the rest to their end
    assert Producer(settings=ctx.settings, client=ctx.redis).cancel(a_ids[0])
    drive_until_done(ctx)
    after = samples_of(scrape(collector))
    # Then nothing is pending (a drained buffer has no series left: model names are whatever
    # producers send, and each must not stay exported for ever) and every outcome was
    # counted once
    assert not [name for name, _ in after if name.startswith("batchbridge_pending_")]
    assert not [name for name, _ in after if name == "batchbridge_oldest_pending_age_seconds"]
    assert value(after, "batchbridge_requests_total", outcome="completed") == 14
    assert value(after, "batchbridge_requests_total", outcome="cancelled") == 1
    assert value(after, "batchbridge_requests_total", outcome="failed") == 0
    # ... and the latency histogram holds each finished request once, its buckets cumulative
    assert total(after, "batchbridge_request_latency_seconds_count") == 15
    for outcome, n in (("completed", 14), ("cancelled", 1), ("failed", 0)):
        count = value(after, "batchbridge_request_latency_seconds_count", outcome=outcome)
        inf = value(after, "batchbridge_request_latency_seconds_bucket", outcome=outcome, le="+Inf")
        assert count == inf == n
        buckets = [
            value(after, "batchbridge_request_latency_seconds_bucket", outcome=outcome, le=str(b))
            for b in LATENCY_BUCKETS
        ]
        assert buckets == sorted(buckets)
    assert 0 <= total(after, "batchbridge_request_latency_seconds_sum") < 15 * 60
    # ... tokens are those of the delivered usages
    results = results_on(ctx, "svc") + results_on(ctx, "other")
    assert len(results) == 15
    for kind in ("prompt", "completion"):
        used = sum(int((r.usage or {}).get(f"{kind}_tokens", 0)) for r in results)
        assert used > 0
        counted = total(after, f"batchbridge_{kind}_tokens_total", provider="local", dry_run="true")
        assert counted == used
    # ... batches by state agree with the record
    with ctx.session() as session:
        finished = session.exec(
            select(func.count()).select_from(Batch).where(Batch.state == "finished")
        ).one()
    assert finished >= 2
    assert total(after, "batchbridge_batches", state="finished") == finished
    assert total(after, "batchbridge_batches", state="submitted") == 0
    assert total(after, "batchbridge_request_retries_total") == 0
    # ... and the callback queues hold every result, none handed out yet
    assert value(after, "batchbridge_callback_backlog", queue="svc") == 12
    assert value(after, "batchbridge_callback_backlog", queue="other") == 3
    assert value(after, "batchbridge_callback_unacked", queue="svc") == 0
    # When a consumer takes two results and acks one
    queue = CallbackQueue("svc", settings=ctx.settings, client=ctx.redis)
    first, second = queue.get(timeout=1), queue.get(timeout=1)
    assert first is not None and second is not None
    first.ack()
    consumed = samples_of(scrape(collector))
    # Then the backlog shrinks by the ack and the other counts as handed out, unacked
    assert value(consumed, "batchbridge_callback_backlog", queue="svc") == 11
    assert value(consumed, "batchbridge_callback_unacked", queue="svc") == 1
    assert value(consumed, "batchbridge_callback_dead_letters", queue="svc") == 0


def test_retries_count_every_request_sent_round_again(
    ctx: WorkerContext, collector: BatchbridgeCollector
) -> None:
    # Given a provider that fails about half its lines with a retryable error
    faults = Faults(line_error_rate=0.5, seed=11)

    def run_faulty_jobs(ctx: WorkerContext) -> None:
        provider = ctx.provider("local")
        assert isinstance(provider, LocalProvider)
        for job in provider.store.list_jobs():
            if not job.is_terminal:
                run_job(provider.store, job.id, EchoEngine(), faults=faults)

    # When 20 requests are run to their end (MAX_ATTEMPTS 3)
    submit(ctx, 20)
    drive_until_done(ctx, run_faulty_jobs)
    scraped = samples_of(scrape(collector))
    # Then each time a request went round again was counted: one fewer than its attempts
    with ctx.session() as session:
        attempts = list(session.exec(select(Request.attempts)))
        failed = session.exec(
            select(func.count()).select_from(Request).where(Request.state == "failed")
        ).one()
    retried = sum(n - 1 for n in attempts)
    assert retried > 0 and failed > 0  # the seed makes both happen
    assert value(scraped, "batchbridge_request_retries_total", provider="default", model="m-a") == (
        retried
    )
    assert sum(r.attempts - 1 for r in results_on(ctx, "svc")) == retried
    assert value(scraped, "batchbridge_requests_total", outcome="failed") == failed
    assert total(scraped, "batchbridge_requests_total") == 20
    assert total(scraped, "batchbridge_request_latency_seconds_count") == 20


class PaidEngine:
    """Answers as a real model would (no dry-run mark), with a fixed usage per request."""

    def complete(self, body: dict[str, object], custom_id: str) -> dict[str, object]:
        answer = EchoEngine().complete(body, custom_id)
        answer.pop("dry_run")
        answer["system_fingerprint"] = "fp_real_model"
        answer["usage"] = {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500}
        return answer


def test_cost_is_the_priced_tokens_at_batch_and_realtime_prices(
    ctx: WorkerContext, collector: BatchbridgeCollector
) -> None:
    priced = "meta-llama/Llama-3.3-70B-Instruct-Turbo"  # $0.88 in and out, 50% off in batch

    def run_paid_jobs(ctx: WorkerContext) -> None:
        run_local_jobs(ctx, PaidEngine())

    # Given 4 requests a "real" model answered, and 2 for a model with no price
    submit(ctx, 4, model=priced)
    submit(ctx, 2, model="m-unpriced")
    drive_until_done(ctx, run_paid_jobs)
    # ... and 3 more of the priced model that the echo engine answered (a dry run)
    submit(ctx, 3, model=priced)
    drive_until_done(ctx)
    scraped = samples_of(scrape(collector))
    # Then the cost is that of the 4 paid answers: 6,000 tokens at $0.88 per 1M, half off
    where = {"provider": "local", "model": priced}
    assert value(scraped, "batchbridge_realtime_cost_usd", **where) == pytest.approx(0.00528)
    assert value(scraped, "batchbridge_cost_usd", **where) == pytest.approx(0.00264)
    # ... as gauges: a price change reprices every token, so the value may fall
    types = {family.name: family.type for family in collector.collect()}
    assert types["batchbridge_cost_usd"] == types["batchbridge_realtime_cost_usd"] == "gauge"
    # ... and every family scraped is the one the README's table documents, of that type
    emitted = {name + ("_total" if kind == "counter" else ""): kind for name, kind in types.items()}
    assert emitted == documented_metrics()
    # ... the dry run's tokens are counted apart and cost nothing
    paid = value(scraped, "batchbridge_prompt_tokens_total", dry_run="false", **where)
    assert paid == 4000
    assert value(scraped, "batchbridge_prompt_tokens_total", dry_run="true", **where) > 0
    # ... and the unpriced model has tokens but no cost at all (never a cost of $0)
    unpriced = {"provider": "local", "model": "m-unpriced"}
    assert value(scraped, "batchbridge_prompt_tokens_total", dry_run="false", **unpriced) == 2000
    assert not any(
        name.endswith("cost_usd") and ("model", "m-unpriced") in labels for name, labels in scraped
    )


def test_provider_errors_are_counted_by_status_code(
    ctx: WorkerContext, collector: BatchbridgeCollector, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a local provider whose every call fails (429 or 500), each failure recorded
    monkeypatch.setenv("BATCHBRIDGE_LOCAL_FAIL_RATE", "1")
    monkeypatch.setenv("BATCHBRIDGE_LOCAL_FAULT_SEED", "5")
    injected: Counter[int] = Counter()
    real_draw = CallFaults.draw

    def draw(self: CallFaults) -> InjectedFailure | None:
        failure = real_draw(self)
        if failure is not None:
            injected[failure.status_code] += 1
        return failure

    monkeypatch.setattr(CallFaults, "draw", draw)
    # When requests are packed and their batches' uploads are tried
    submit(ctx, 25)
    drive_pipeline(ctx, collect=False)
    scraped = samples_of(scrape(collector))
    # Then every failed call is counted under its provider, call and status code
    assert sum(injected.values()) >= 3  # three batches, each upload refused
    for status, n in injected.items():
        assert (
            total(
                scraped,
                "batchbridge_provider_api_errors_total",
                provider="local",
                status_code=str(status),
            )
            == n
        )
    assert total(scraped, "batchbridge_provider_api_errors_total", operation="upload_file") == (
        sum(injected.values())
    )
    # ... and no request was counted as finished
    assert total(scraped, "batchbridge_requests_total") == 0


def test_an_instrumented_provider_counts_failures_without_a_status_and_only_once(
    ctx: WorkerContext, collector: BatchbridgeCollector
) -> None:
    class Stub:
        name = "together"

        def get_batch(self, batch_id: str) -> None:
            raise ProviderError("timed out", retryable=True)

        def delete_file(self, file_id: str) -> None:
            raise ValueError("not a provider error")

    counters = Counters(ctx.redis, ctx.keys)
    stub = instrument_provider(instrument_provider(Stub(), counters), counters)  # type: ignore[arg-type]
    for _ in range(2):
        with pytest.raises(ProviderError):
            stub.get_batch("b-1")
    with pytest.raises(ValueError):
        stub.delete_file("f-1")
    scraped = samples_of(scrape(collector))
    labels = {"provider": "together", "operation": "get_batch", "status_code": "none"}
    assert value(scraped, "batchbridge_provider_api_errors_total", **labels) == 2
    assert total(scraped, "batchbridge_provider_api_errors_total") == 2


def test_webhook_deliveries_are_counted_by_result_and_no_url_is_shown(
    ctx: WorkerContext, collector: BatchbridgeCollector
) -> None:
    # Given webhooks to an endpoint that answers 200, one that fails once, one that is gone,
    # and one the sender's SSRF guard refuses before connecting (the producer's allow-list
    # took 127.0.0.2, the sender's takes only 127.0.0.1)
    ctx.settings = ctx.settings.model_copy(
        update={
            "webhook_allow_cidrs": (ipaddress.ip_network("127.0.0.0/8"),),
            "webhook_secret": SecretStr(SECRET),
            "webhook_retry_schedule": (0.0, 0.1, 0.1),
        }
    )
    with serve_receiver(SECRET) as receiver:
        urls = [
            receiver.script("/ok-endpoint", 200),
            receiver.script("/flaky-endpoint", 500, 200),
            receiver.script("/gone-endpoint", 410),
            receiver.script("/gone-endpoint", 410).replace("127.0.0.1", "127.0.0.2"),
        ]
        producer = Producer(settings=ctx.settings, client=ctx.redis)
        for url in urls:
            handle = producer.submit(model="m-a", messages=PIPELINE_MESSAGES, webhook_url=url)
            assert producer.cancel(handle.id)
        outbox = samples_of(scrape(collector))
        assert value(outbox, "batchbridge_webhook_outbox") == 4
        ctx.settings = ctx.settings.model_copy(
            update={"webhook_allow_cidrs": (ipaddress.ip_network("127.0.0.1/32"),)}
        )
        # When the sender runs until the outbox is empty
        deadline = time.monotonic() + 15
        while ctx.redis.zcard(ctx.keys.webhook_queue):
            assert time.monotonic() < deadline
            asyncio.run(deliver_due(ctx, budget_seconds=2))
            time.sleep(0.05)
        _ = _wait_for(receiver)
    text = scrape(collector)
    scraped = samples_of(text)
    # Then two were delivered, one attempt is to be retried, two are dead; the refused one
    # was never sent, so it has no response counted (not even as "error")
    assert value(scraped, "batchbridge_webhook_deliveries_total", result="delivered") == 2
    assert value(scraped, "batchbridge_webhook_deliveries_total", result="retrying") == 1
    assert value(scraped, "batchbridge_webhook_deliveries_total", result="dead") == 2
    assert value(scraped, "batchbridge_webhook_responses_total", status_class="2xx") == 2
    assert value(scraped, "batchbridge_webhook_responses_total", status_class="5xx") == 1
    assert value(scraped, "batchbridge_webhook_responses_total", status_class="4xx") == 1
    assert total(scraped, "batchbridge_webhook_responses_total") == 4
    assert value(scraped, "batchbridge_webhook_outbox") == 0
    # ... and neither the endpoints nor the secret appear anywhere in the output
    for secret in ("-endpoint", "127.0.0.1", "127.0.0.2", "whsec_", SECRET):
        assert secret not in text


def _wait_for(receiver: Receiver) -> int:
    return len(receiver.at("/ok-endpoint")) + len(receiver.at("/flaky-endpoint"))


def test_two_collectors_report_the_same_numbers(ctx: WorkerContext) -> None:
    # Given a workload part-way through: some requests done, some still pending
    submit(ctx, 10)
    drive_pipeline(ctx)
    submit(ctx, 4, model="m-b")
    # When two metrics servers (collectors with their own connections) are scraped
    one, two = BatchbridgeCollector(ctx.settings), BatchbridgeCollector(ctx.settings)
    try:
        first, second = samples_of(scrape(one)), samples_of(scrape(two))
    finally:
        one.close()
        two.close()
    # Then they agree on every value (the pending age only to the time between scrapes)
    age = "batchbridge_oldest_pending_age_seconds"
    assert first.keys() == second.keys()
    for key, got in first.items():
        if key[0] == age:
            assert abs(second[key] - got) < 5
        else:
            assert second[key] == got, key
    assert value(first, "batchbridge_requests_total", outcome="completed") == 10
    assert value(first, "batchbridge_pending_requests", provider="default", model="m-b") == 4


def test_a_source_that_cannot_be_read_is_reported_down_not_raised(tmp_path: Path) -> None:
    # Given settings naming a Redis nobody listens on
    closed = make_settings(f"redis://127.0.0.1:{free_port()}/0", tmp_path)
    collector = BatchbridgeCollector(closed)
    try:
        # When scraped (twice: the second must not fail differently)
        for _ in range(2):
            scraped = samples_of(scrape(collector))
            # Then Redis is reported down, SQL up, and the Redis metrics are left out
            assert value(scraped, "batchbridge_metrics_source_up", source="redis") == 0
            assert value(scraped, "batchbridge_metrics_source_up", source="sql") == 1
            assert not any(name == "batchbridge_requests_total" for name, _ in scraped)
    finally:
        collector.close()


def test_the_http_endpoint_serves_the_collector(ctx: WorkerContext) -> None:
    # Given a metrics server on a free port, and a request waiting
    submit(ctx, 2)
    server = MetricsServer(ctx.settings, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        # When Prometheus scrapes /metrics
        answer = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=10)
    finally:
        server.shutdown()
        thread.join(5)
        server.close()
    # Then it gets the text format with our metrics, and only ours
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    scraped = samples_of(answer.text)
    assert value(scraped, "batchbridge_pending_requests", provider="default", model="m-a") == 2
    assert all(name.startswith("batchbridge_") for name, _ in scraped)
    assert "redis://" not in answer.text


def test_the_lua_histogram_buckets_are_the_declared_ones() -> None:
    match = re.search(r"BB_LATENCY_BUCKETS = \{([^}]*)\}", LUA.read_text())
    assert match is not None
    assert tuple(float(b) for b in match.group(1).split(",")) == LATENCY_BUCKETS


def metrics_app() -> typer.Typer:
    """The command as the CLI registers it: ``app.command("metrics")(cli_metrics.metrics)``."""
    app = typer.Typer(add_completion=False)
    app.command("metrics")(cli_metrics.metrics)
    app.command("other")(lambda: None)  # two commands, so "metrics" is a subcommand
    return app


def test_the_metrics_command_exits_2_in_one_line_when_the_port_is_taken(
    settings: Settings,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(
            metrics_app(), ["metrics", "--port", str(port)], env=settings_env(settings)
        )
    assert result.exit_code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.output
    assert "Traceback" not in result.output


def test_the_metrics_command_serves_until_interrupted(settings: Settings) -> None:
    # Given `batchbridge metrics` started as its own process
    port = free_port()
    code = (
        "import typer; from worker import cli_metrics; app = typer.Typer(); "
        "app.command('metrics')(cli_metrics.metrics); app.command('other')(lambda: None); app()"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHBRIDGE_")}
    env.update(settings_env(settings))
    process = subprocess.Popen(
        [sys.executable, "-c", code, "metrics", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        # When it answers a scrape and is then interrupted (Ctrl-C)
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, process.communicate()
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the metrics server did not start"
                time.sleep(0.1)
        assert answer.status_code == 200
        assert "batchbridge_metrics_source_up" in answer.text
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    # Then it exits 0 without a traceback
    assert process.returncode == 0, stderr.decode()
    assert b"Traceback" not in stderr
