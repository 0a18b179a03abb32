"""Fixtures of the reliability suite: a scenario with its worker, provider and ledger."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shared.db import make_engine
from tests.conftest import LocalApiFactory, make_settings
from tests.reliability.harness import CHAOS_SETTINGS, Scenario, local_api_store
from tests.reliability.ledger import LedgerSource

ScenarioFactory = Callable[..., Scenario]


@pytest.fixture
def scenario(
    redis_url: str, tmp_path: Path, start_local_api: LocalApiFactory
) -> Iterator[ScenarioFactory]:
    """Make a scenario: ``local-api`` started with ``api_args``, settings over the chaos ones,
    on the test Redis or the one at ``redis``.

    Nothing is started on the worker side: each test starts the workers and beats it kills.
    """
    made: list[Scenario] = []

    def make(
        name: str,
        *,
        api_args: tuple[str, ...] = (),
        api_env: dict[str, str] | None = None,
        worker_env: dict[str, str] | None = None,
        redis: str | None = None,
        data_dir: Path | None = None,
        **overrides: object,
    ) -> Scenario:
        api = start_local_api(*api_args, env_overrides=api_env)
        url = redis or redis_url
        folder = data_dir or tmp_path / "data"
        settings = make_settings(url, folder, **{**CHAOS_SETTINGS, **overrides})
        source = LedgerSource(
            redis_url=url,
            key_prefix=settings.key_prefix,
            stores=[local_api_store(tmp_path, len(made))],
            engine=make_engine(settings),
        )
        made.append(
            Scenario(name, settings, api, tmp_path, source, worker_env_extra=worker_env or {})
        )
        return made[-1]

    try:
        yield make
    finally:
        for each in made:
            each.close()
