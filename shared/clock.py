"""The record's clock: deadlines written by one host and read by another must share a clock.

Every retry, poll and hold deadline in the database is compared against "now" by whichever
worker looks next. If each worker used its own clock, a host running five minutes fast would
write deadlines that every other host sees five minutes late (and read others' as due
early). So on PostgreSQL "now" is the database server's: the offset between it and the local
clock is sampled in one round trip and reused for a minute, which keeps a hot loop free of
extra queries while following any drift. SQLite lives on one host, so its clock is local.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import Engine, text

from shared.models import utcnow

# How long a sampled offset is trusted before it is measured again.
RESAMPLE_SECONDS = 60.0


class RecordClock:
    """Now, as the database server tells it (local on SQLite); timezone-aware UTC."""

    def __init__(
        self,
        engine: Engine,
        *,
        local: Callable[[], datetime] = utcnow,
        resample_seconds: float = RESAMPLE_SECONDS,
    ) -> None:
        self._engine = engine
        self._local = local
        self._resample_seconds = resample_seconds
        self._remote = engine.dialect.name == "postgresql"
        self._offset = timedelta(0)
        self._sampled_at: float | None = None
        self._lock = threading.Lock()

    def now(self) -> datetime:
        """The current time on the record's clock."""
        if self._remote:
            with self._lock:
                stale = self._sampled_at is None or (
                    time.monotonic() - self._sampled_at > self._resample_seconds
                )
                if stale:
                    self._offset = self._measure()
                    self._sampled_at = time.monotonic()
        return self._local() + self._offset

    @property
    def offset(self) -> timedelta:
        """How far the record's clock was ahead of the local one when last measured."""
        return self._offset

    def _measure(self) -> timedelta:
        # The server's reading is taken to fall midway through the round trip.
        before = self._local()
        with self._engine.connect() as conn:
            server: datetime = conn.execute(text("SELECT clock_timestamp()")).scalar_one()
        after = self._local()
        return server - (before + (after - before) / 2)
