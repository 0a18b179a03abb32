"""A database created by an older version gains the columns a newer one added, on start-up."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlmodel import SQLModel

from shared.db import make_engine
from shared.migrations import current_revision
from tests.conftest import make_settings, run_at_once


def test_columns_added_since_a_table_was_created_are_added_with_their_defaults(
    redis_url: str, tmp_path: Path, database_url: str
) -> None:
    # Given the tables as a version before migrations left them (``create_all``, no
    # alembic_version): without two newer columns, with a row
    engine = create_engine(database_url)
    SQLModel.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(text('ALTER TABLE "batches" DROP COLUMN "ambiguous_creates"'))
        conn.execute(text('ALTER TABLE "requests" DROP COLUMN "result"'))
        conn.execute(
            text(
                "INSERT INTO batches (id, provider, model, state, request_count, bytes, "
                "flush_reason, file_path, submit_attempts, collect_failures, poll_count, "
                "not_found_polls, completed_count, failed_count, requeued_count, prompt_tokens, "
                "completion_tokens, created_at, updated_at) VALUES ('b1', 'local', 'm', "
                "'finished', 1, 10, 'count', '', 0, 0, 0, 0, 1, 0, 0, 0, 0, "
                "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
            )
        )
    engine.dispose()

    # When a worker of this version starts on it
    make_engine(make_settings(redis_url, tmp_path, database_url=database_url)).dispose()

    # Then the columns are back, and the old row reads the column's default
    check = create_engine(database_url)
    columns = {c["name"] for c in inspect(check).get_columns("batches")}
    assert "ambiguous_creates" in columns
    assert "result" in {c["name"] for c in inspect(check).get_columns("requests")}
    with check.connect() as conn:
        value = conn.execute(text("SELECT ambiguous_creates FROM batches WHERE id = 'b1'"))
        assert value.scalar_one() == 0
    check.dispose()
    # And the database is now under migrations, at the newest revision (the columns added the
    # old way stay nullable, with their defaults)
    assert (
        current_revision(make_engine(make_settings(redis_url, tmp_path, database_url=database_url)))
        == head_revision()
    )


def head_revision() -> str:
    """The newest revision the package ships."""
    from alembic.script import ScriptDirectory

    from shared.migrations import alembic_config

    return str(ScriptDirectory.from_config(alembic_config(None)).get_current_head())  # type: ignore[arg-type]


def schema_differences(database_url: str) -> list[object]:
    """What Alembic finds different between the database and the models (nothing, we hope)."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    engine = create_engine(database_url)
    with engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    engine.dispose()
    return list(diffs)


def test_a_new_database_is_migrated_to_exactly_the_models(
    redis_url: str, tmp_path: Path, database_url: str
) -> None:
    # Given an empty database / When a worker starts on it
    engine = make_engine(make_settings(redis_url, tmp_path, database_url=database_url))
    # Then it is at the newest revision, and its schema is the models' to the last index
    assert current_revision(engine) == head_revision()
    engine.dispose()
    assert schema_differences(database_url) == []
    # And starting again changes nothing
    make_engine(make_settings(redis_url, tmp_path, database_url=database_url)).dispose()
    assert schema_differences(database_url) == []


def test_workers_starting_at_once_migrate_once_without_failing(
    redis_url: str, tmp_path: Path, database_url: str
) -> None:
    # Given an empty database and four workers starting on it at the same moment
    settings = make_settings(redis_url, tmp_path, database_url=database_url)
    errors = run_at_once(lambda: make_engine(settings).dispose(), 4)

    # Then all of them started, and the schema is the models'
    assert errors == []
    assert schema_differences(database_url) == []


def test_starting_on_an_up_to_date_database_logs_nothing(
    redis_url: str, tmp_path: Path, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a database already migrated
    settings = make_settings(redis_url, tmp_path, database_url=database_url)
    make_engine(settings).dispose()
    # When another process starts on it / Then neither Alembic nor batchbridge says a word
    with caplog.at_level(logging.INFO):
        make_engine(settings).dispose()
    assert [r for r in caplog.records if r.name.startswith(("alembic", "shared"))] == []
