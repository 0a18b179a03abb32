"""The beat scheduler: Celery's persistent scheduler, sleeping until the next entry is due.

Celery's scheduler asks to be woken 10 ms before an entry is due (``Scheduler.adjust``'s
drift) and, once less than 10 ms remain, returns no sleep at all: beat then calls ``tick``
back to back until the entry is due, on every entry, every period. With batchbridge's
sub-second to few-second wake-ups that spinning was most of what beat did: measured with
``celery.beat.Service`` on this project's 2-core VM over 10 s, 6,650 ticks and 0.18 s of CPU
with the default intervals (33,808 ticks and 0.92 s at the benchmark's 0.2 s ones), against
tens of ticks that the entries' periods call for. A wake-up a millisecond late costs nothing
here; the entries are wake-ups, not deadlines.
"""

from __future__ import annotations

from celery.beat import PersistentScheduler

# What ``beat_scheduler`` names (Celery loads the class by this path).
PATH = "worker.beat_scheduler:SleepUntilDueScheduler"


class SleepUntilDueScheduler(PersistentScheduler):  # type: ignore[misc]  # Celery ships no types
    """``PersistentScheduler`` whose sleeps last until the next entry is due, not 10 ms less."""

    def adjust(self, n: float | None, drift: float = -0.010) -> float | None:
        """The seconds beat sleeps before the next tick: all of ``n``, never 0 while some remain."""
        return n
