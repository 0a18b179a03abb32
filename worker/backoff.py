"""How long to wait before trying a provider call again."""

from __future__ import annotations

from datetime import timedelta

_BASE_SECONDS = 2.0
# Never sooner than this, whatever a Retry-After says: a short one must not burn every attempt
# within seconds of an outage.
FLOOR_SECONDS = 2.0
# Never later than this by our own choice (a longer Retry-After is still honoured, up to a day).
CEILING_SECONDS = 600.0
_RETRY_AFTER_LIMIT_SECONDS = 86_400.0


def backoff(
    attempts: int,
    retry_after: float | None = None,
    *,
    floor: float = FLOOR_SECONDS,
    ceiling: float = CEILING_SECONDS,
) -> timedelta:
    """The wait after ``attempts`` failures: exponential within [floor, ceiling], or Retry-After."""
    exponential = _BASE_SECONDS * 2 ** min(max(attempts, 0), 30)
    seconds = min(max(exponential, floor), max(ceiling, floor))
    if retry_after is not None and retry_after > seconds:
        seconds = min(retry_after, _RETRY_AFTER_LIMIT_SECONDS)
    return timedelta(seconds=seconds)
