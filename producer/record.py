"""Reading a request's outcome from the SQL record once Redis has let it go.

Redis keeps a result for ``RESULT_TTL_SECONDS``; the record keeps it until
``SQL_RETENTION_DAYS`` prune it. A producer that asks after an older request reads it here.
The engine is made on first use only, so a producer that never looks that far back never
imports or connects to a database.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, NamedTuple

from shared.settings import Settings

log = logging.getLogger(__name__)
# The record's request states as a producer reports them.
_STATE_NAMES = {"requeued": "pending", "batched": "batched"}


class RecordedRequest(NamedTuple):
    """A request as the record has it: its state (producer names) and result JSON, if any."""

    state: str
    result: str | None


class ResultRecord:
    """Looks requests up in the record (the database the workers write)."""

    def __init__(self, settings: Settings) -> None:
        self._url = settings.sqlalchemy_url
        self._engine: Any = None
        self._lock = threading.Lock()

    def lookup(self, request_id: str) -> RecordedRequest | None:
        """The recorded request, or None when the record has no such row (or no database)."""
        engine = self._get_engine()
        if engine is None:
            return None
        from sqlalchemy import text
        from sqlalchemy.exc import OperationalError, ProgrammingError

        try:
            with engine.connect() as conn:
                row = conn.execute(
                    text("SELECT state, result FROM requests WHERE id = :id"), {"id": request_id}
                ).first()
        except (OperationalError, ProgrammingError):
            return None  # no tables yet: no worker has written a record
        if row is None:
            return None
        state, result = str(row[0]), row[1]
        return RecordedRequest(_STATE_NAMES.get(state, state), result)

    def close(self) -> None:
        """Release the database connections, if any were made."""
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def _get_engine(self) -> Any:
        with self._lock:
            if self._engine is None:
                if self._url.startswith("sqlite"):
                    # Connecting would create an empty database file where none exists.
                    path = self._url.split("///", 1)[-1]
                    if not Path(path).exists():
                        return None
                try:
                    from sqlalchemy import create_engine
                except ImportError:  # the base install: results live only as long as in Redis
                    log.warning(
                        "reading results older than BATCHBRIDGE_RESULT_TTL_SECONDS needs "
                        "the SQL record: pip install 'batchbridge[postgres]'"
                    )
                    return None
                self._engine = create_engine(self._url, pool_pre_ping=True)
            return self._engine
