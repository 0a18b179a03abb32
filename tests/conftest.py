"""Shared fixtures: a real redis-server per session, settings per test, optional PostgreSQL."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from redis import Redis
from sqlalchemy import create_engine, make_url, text

from producer import Producer
from shared.embedded_redis import EmbeddedRedis, child_environment, free_port
from shared.providers.local import EchoEngine, LocalProvider, run_job
from shared.providers.local.engines import Engine
from shared.settings import ENV_PREFIX, Settings
from worker.collection import collect_ready_batches
from worker.context import WorkerContext
from worker.lifecycle import submit_ready_batches
from worker.packing import pack_due_buffers
from worker.polling import poll_due_batches
from worker.processes import WorkerProcess

PG_URL = os.environ.get("BATCHBRIDGE_TEST_DATABASE_URL")


@pytest.fixture(autouse=True)
def _no_real_provider_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never reach a paid API, whatever the developer's shell exports."""
    for name in ("TOGETHER_API_KEY", "TOGETHER_BASE_URL", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server: BATCHBRIDGE_TEST_REDIS_URL, or one spawned on a free port."""
    url = os.environ.get("BATCHBRIDGE_TEST_REDIS_URL")
    if url:
        yield url
        return
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), persistent=False)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: str) -> Iterator[str]:
    """The test Redis, emptied before and after each test."""
    client = Redis.from_url(redis_server)
    client.flushdb()
    try:
        yield redis_server
    finally:
        client.flushdb()
        client.close()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[Redis]:
    """A client on the emptied test Redis."""
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


def _database_params() -> list[str]:
    return ["sqlite", "postgresql"] if PG_URL else ["sqlite"]


@pytest.fixture(params=_database_params())
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """SQLite in the test's folder, and PostgreSQL too when BATCHBRIDGE_TEST_DATABASE_URL is set.

    Each PostgreSQL test gets a database of its own, created here and dropped afterwards, so
    tests (and developers running suites side by side) never touch each other's tables.
    """
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.sqlite3'}"
        return
    assert PG_URL is not None
    with private_postgres_database(PG_URL) as url:
        yield url


@contextlib.contextmanager
def private_postgres_database(server_url: str) -> Iterator[str]:
    """A new, uniquely named database on the server of ``server_url``; dropped on exit."""
    name = f"bb_test_{os.getpid()}_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def run_at_once(work: Callable[[], None], threads: int, timeout: float = 60) -> list[BaseException]:
    """Run ``work`` in ``threads`` threads released together; the exceptions they raised."""
    go = threading.Barrier(threads)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            go.wait()
            work()
        except BaseException as exc:
            errors.append(exc)

    started = [threading.Thread(target=run) for _ in range(threads)]
    for thread in started:
        thread.start()
    for thread in started:
        thread.join(timeout)
    return errors


def settings_env(settings: Settings) -> dict[str, str]:
    """``settings`` as the ``BATCHBRIDGE_*`` variables a child process would read them from."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump(exclude_none=True).items():
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, tuple | list):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, dict):
            if not value:
                continue
            value = json.dumps(
                {
                    k: v.get_secret_value() if isinstance(v, SecretStr) else v
                    for k, v in value.items()
                }
            )
        env[f"{ENV_PREFIX}{name.upper()}"] = str(value)
    env[f"{ENV_PREFIX}DATABASE_URL"] = settings.sqlalchemy_url
    return env


def make_settings(redis_url: str, data_dir: Path, **overrides: object) -> Settings:
    """Settings for a test, isolated in ``data_dir``."""
    # The provider's files are kept: the ledgers of many tests count billed requests from the
    # input files of the provider's jobs. Tests of deleting them turn this off.
    base: dict[str, object] = {
        "redis_url": redis_url,
        "data_dir": data_dir,
        "provider": "local",
        "keep_provider_files": True,
    }
    base.update(overrides)
    return Settings.load(**base)


@pytest.fixture
def settings(redis_url: str, tmp_path: Path) -> Settings:
    """Settings on the test Redis with SQLite in the test's folder."""
    return make_settings(redis_url, tmp_path)


@pytest.fixture
def worker_context(redis_url: str, tmp_path: Path, database_url: str) -> Iterator[WorkerContext]:
    """A worker's context in this process, on the test Redis and database; local jobs wait."""
    ctx = WorkerContext.create(make_settings(redis_url, tmp_path, database_url=database_url))
    try:
        yield ctx
    finally:
        ctx.close()


@pytest.fixture
def ctx(worker_context: WorkerContext) -> WorkerContext:
    """A worker context whose batches are small (10) and polled at once, for pipeline steps."""
    worker_context.settings = worker_context.settings.model_copy(
        update={"max_batch_requests": 10, "poll_interval_seconds": 0.01}
    )
    return worker_context


PIPELINE_MESSAGES = [{"role": "user", "content": "Is 'great value' positive?"}]


def force_claim(
    ctx: WorkerContext, buf: str, batch_id: str, *, max_requests: int = 100, intact_seconds: int = 0
) -> Any:
    """Run ``claim.lua`` on ``buf`` for ``batch_id`` now, as a forced flush: its reply.

    With ``intact_seconds`` 0 the claim leaves no intact mark, as before marks existed.
    """
    now_ms = int(time.time() * 1000)
    args = [ctx.keys.base, buf, batch_id, max_requests, 10**9, 0, now_ms, "1", intact_seconds]
    return ctx.scripts.run("claim", ctx.keys.claim_script_keys(buf, batch_id), args)


def submit_requests(ctx: WorkerContext, n: int = 10) -> list[str]:
    """Submit ``n`` requests for model m-a to callback queue ``svc``; their ids, in order."""
    producer = Producer(settings=ctx.settings, client=ctx.redis)
    requests = [
        {
            "model": "m-a",
            "messages": PIPELINE_MESSAGES,
            "callback_queue": "svc",
            "metadata": {"i": i},
        }
        for i in range(n)
    ]
    return [h.id for h in producer.submit_many(requests)]


def run_local_jobs(ctx: WorkerContext, engine: Engine | None = None) -> None:
    """Run every local-provider job that is not finished, as the worker's task would."""
    provider = ctx.provider("local")
    assert isinstance(provider, LocalProvider)
    for job in provider.store.list_jobs():
        if not job.is_terminal:
            run_job(provider.store, job.id, engine or EchoEngine())


def drive_pipeline(ctx: WorkerContext, *, collect: bool = True) -> None:
    """One pass of every periodic step, the local jobs run between submit and poll."""
    pack_due_buffers(ctx, force=True)
    submit_ready_batches(ctx)
    run_local_jobs(ctx)
    time.sleep(0.02)
    poll_due_batches(ctx)
    if collect:
        collect_ready_batches(ctx)


WorkerFactory = Callable[..., WorkerProcess]


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[WorkerFactory]:
    """Start Celery workers (with beat) configured through the environment, as deployed."""
    started: list[WorkerProcess] = []

    def start(settings: Settings, **env_overrides: str) -> WorkerProcess:
        assert settings.configured_redis_url is not None
        env = child_environment(settings, settings.configured_redis_url)
        env.update(settings_env(settings))
        env.update(env_overrides)
        n = len(started)
        process = WorkerProcess(
            env,
            log_path=tmp_path / f"worker-{n}.log",
            schedule_path=tmp_path / f"beat-schedule-{n}",
            loglevel="INFO",
        ).start()
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            process.stop()


@dataclasses.dataclass
class LocalApiServer:
    """A ``batchbridge local-api`` process."""

    url: str
    api_key: str
    process: subprocess.Popen[bytes]


LocalApiFactory = Callable[..., LocalApiServer]


@pytest.fixture
def start_local_api(tmp_path: Path) -> Iterator[LocalApiFactory]:
    """Start ``batchbridge local-api`` processes on free ports; extra args go to the CLI."""
    started: list[LocalApiServer] = []

    def start(
        *args: str, api_key: str = "test-key", env_overrides: dict[str, str] | None = None
    ) -> LocalApiServer:
        port = free_port()
        n = len(started)
        env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHBRIDGE_")}
        env["BATCHBRIDGE_DATA_DIR"] = str(tmp_path / f"local-api-{n}")
        env.update(env_overrides or {})
        log = open(tmp_path / f"local-api-{n}.log", "wb")  # noqa: SIM115 - the process owns it
        cmd = [sys.executable, "-m", "worker.cli", "local-api", "--port", str(port)]
        process = subprocess.Popen(
            [*cmd, "--api-key", api_key, *args], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        server = LocalApiServer(f"http://127.0.0.1:{port}", api_key, process)
        started.append(server)
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, (tmp_path / f"local-api-{n}.log").read_text()
            try:
                if httpx.get(f"{server.url}/healthz", timeout=1).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "local-api did not become healthy"
            time.sleep(0.1)

    try:
        yield start
    finally:
        for server in started:
            server.process.terminate()
            try:
                server.process.wait(15)
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait()


RedisFactory = Callable[..., EmbeddedRedis]


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisFactory]:
    """Private persistent redis-servers for tests that kill or restart Redis; all stopped after."""
    started: list[EmbeddedRedis] = []

    def start(name: str = "redis", **options: object) -> EmbeddedRedis:
        server = EmbeddedRedis(tmp_path / name, **options)  # type: ignore[arg-type]
        server.start()
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()
