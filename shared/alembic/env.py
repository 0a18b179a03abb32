"""Alembic's environment: the record's metadata, on the connection batchbridge hands it.

Migrations run from ``shared.migrations.upgrade`` (at every worker start), never from a
command line that would need its own database URL.
"""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

import shared.models  # noqa: F401 - registers the tables on SQLModel.metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=SQLModel.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters by copying tables
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
