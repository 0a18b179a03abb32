"""Shared fixtures: a real redis-server per session, settings per test, optional PostgreSQL."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis
from sqlalchemy import create_engine
from sqlmodel import SQLModel

from shared.embedded_redis import EmbeddedRedis
from shared.providers.local import EchoEngine, LocalProvider, run_job
from shared.settings import Settings
from worker.context import WorkerContext

PG_URL = os.environ.get("BATCHBRIDGE_TEST_DATABASE_URL")


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
    """SQLite in the test's folder, and PostgreSQL too when BATCHBRIDGE_TEST_DATABASE_URL is set."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.sqlite3'}"
        return
    assert PG_URL is not None
    engine = create_engine(PG_URL)
    SQLModel.metadata.drop_all(engine)
    engine.dispose()
    try:
        yield PG_URL
    finally:
        engine = create_engine(PG_URL)
        SQLModel.metadata.drop_all(engine)
        engine.dispose()


def make_settings(redis_url: str, data_dir: Path, **overrides: object) -> Settings:
    """Settings for a test, isolated in ``data_dir``."""
    base: dict[str, object] = {"redis_url": redis_url, "data_dir": data_dir, "provider": "local"}
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


def run_local_jobs(ctx: WorkerContext) -> None:
    """Run every local-provider job that is not finished, as the worker's task would."""
    provider = ctx.provider("local")
    assert isinstance(provider, LocalProvider)
    for job in provider.store.list_jobs():
        if not job.is_terminal:
            run_job(provider.store, job.id, EchoEngine())
