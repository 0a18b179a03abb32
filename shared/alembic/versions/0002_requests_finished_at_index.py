"""Index the finished requests by their finish time, for retention.

The reaper's retention step looks for requests finished before its cutoff on every pass; with
no index on ``finished_at`` each pass read the whole ``requests`` table. The index is partial:
a request that has not finished has no time to find, and leaving it out spares the insert a
pack would otherwise make per request.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_FINISHED = sa.text("finished_at IS NOT NULL")


def upgrade() -> None:
    """Apply this revision."""
    op.create_index(
        "ix_requests_finished_at",
        "requests",
        ["finished_at"],
        unique=False,
        # A database that create_all made with this version's models has it already.
        if_not_exists=True,
        sqlite_where=_FINISHED,
        postgresql_where=_FINISHED,
    )


def downgrade() -> None:
    """Undo this revision."""
    op.drop_index("ix_requests_finished_at", table_name="requests")
