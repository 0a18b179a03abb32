"""A database created by an older version gains the columns a newer one added, on start-up."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine, inspect, text

from shared.db import make_engine
from tests.conftest import make_settings


def test_columns_added_since_a_table_was_created_are_added_with_their_defaults(
    redis_url: str, tmp_path: Path, database_url: str
) -> None:
    # Given the tables as an older version left them: without two newer columns, with a row
    engine = make_engine(make_settings(redis_url, tmp_path, database_url=database_url))
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
