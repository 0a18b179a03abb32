"""The record's schema, brought up to date by Alembic migrations at every worker start.

Many workers may start at once: on PostgreSQL an advisory lock lets one migrate while the
others wait, then find nothing left to do; SQLite's write lock does the same for one host.
A database that an older batchbridge created with ``create_all`` (tables, no
``alembic_version``) gets its missing columns added, then is stamped at the first revision.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy.exc import OperationalError

if TYPE_CHECKING:
    from alembic.config import Config

_SCRIPTS = Path(__file__).parent / "alembic"
_BASELINE = "0001"  # the schema ``create_all`` made before migrations existed
_LOCK_ID = 0x62626462  # "bbdb": one advisory lock for everyone migrating this database
log = logging.getLogger(__name__)
# Alembic narrates every run at INFO (plugins, dialect, "will assume transactional DDL"),
# on every worker start and CLI command; only a migration that changed something is news.
# Set before Alembic is first imported (below, in the functions): it logs while importing.
logging.getLogger("alembic").setLevel(logging.WARNING)


def alembic_config(connection: Connection) -> Config:
    """An Alembic config for this package's migrations, on ``connection``."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(_SCRIPTS))
    config.attributes["connection"] = connection
    return config


def upgrade(engine: Engine) -> None:
    """Migrate the database to the newest revision (idempotent; safe from many processes)."""
    # Several workers starting at once on a new SQLite file can get "database is locked"
    # despite the busy timeout (seen in tests/test_schema_upgrade.py in full CI runs; the
    # exact lock race is not pinned down). The upgrade is idempotent, so try again.
    for attempt in range(10):
        try:
            _upgrade(engine)
            return
        except OperationalError as exc:
            if engine.dialect.name != "sqlite" or "database is locked" not in str(exc):
                raise
            if attempt == 9:
                raise
            time.sleep(0.1 * (attempt + 1))


def _upgrade(engine: Engine) -> None:
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _LOCK_ID})
        elif connection.dialect.name == "sqlite":
            connection.exec_driver_sql("BEGIN IMMEDIATE")  # take the write lock before looking
        config = alembic_config(connection)
        current = MigrationContext.configure(connection).get_current_revision()
        if current is None and inspect(connection).has_table("batches"):
            from shared.db import add_missing_columns

            add_missing_columns(connection)
            command.stamp(config, _BASELINE)
        command.upgrade(config, "head")
        now = MigrationContext.configure(connection).get_current_revision()
    if now != current:
        log.info("migrated the record's schema from %s to %s", current or "nothing", now)


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None before any migration ran)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
