"""Fault injection for the local Batch API: flaky calls, failing lines, expiry, slowness,
lost and late answers, and a window in which batches seem to vanish."""

from __future__ import annotations

import math
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

ENV_FAIL_RATE = "BATCHBRIDGE_LOCAL_FAIL_RATE"
ENV_LINE_ERROR_RATE = "BATCHBRIDGE_LOCAL_LINE_ERROR_RATE"
ENV_EXPIRE_AFTER = "BATCHBRIDGE_LOCAL_EXPIRE_AFTER"
ENV_LINE_DELAY = "BATCHBRIDGE_LOCAL_LINE_DELAY"
ENV_LOST_ANSWER_RATE = "BATCHBRIDGE_LOCAL_LOST_ANSWER_RATE"
ENV_ANSWER_DELAY = "BATCHBRIDGE_LOCAL_ANSWER_DELAY"
ENV_NOT_FOUND_WINDOW = "BATCHBRIDGE_LOCAL_NOT_FOUND_WINDOW"
ENV_NO_OUTPUT_RATE = "BATCHBRIDGE_LOCAL_NO_OUTPUT_RATE"
ENV_SEED = "BATCHBRIDGE_LOCAL_FAULT_SEED"

# Short enough that SDK retries stay fast, long enough to prove the client waited as told.
INJECTED_RETRY_AFTER_SECONDS = 0.05
# Errors with this code are retryable for the collector, like a real upstream rate limit.
INJECTED_LINE_ERROR_CODE = "rate_limit"


@dataclass(frozen=True, slots=True)
class Faults:
    """What to break on purpose; everything is off by default.

    ``fail_rate``: fraction of API calls answered 429 or 500 (50/50) with a short
    Retry-After. ``line_error_rate``: fraction of lines written to the error file as a
    retryable ``rate_limit`` error. ``expire_after``: seconds after a run starts at which the
    batch expires. ``line_delay``: seconds spent per line. ``seed`` makes the draws repeatable.

    ``lost_answer_rate``: fraction of batch *creates* that take effect (the job is created and
    runs as usual) but whose answer is lost: the caller gets a retryable 500 or 504 instead.
    Only create, the one call that is not idempotent, is affected: it is the call whose lost
    answer can cost a second, paid, job. ``answer_delay``: every call takes effect, then its
    answer waits this many seconds, so a client with a shorter timeout times out although the
    call happened. ``not_found_window``: ``(start, duration)`` in seconds since the server or
    provider started; inside it every batch *retrieve* answers 404 as if the job were unknown
    (a brief outage or a key change) while the job keeps running, and list and file calls
    keep working, so a caller can check that the job still exists. ``no_output_rate``:
    fraction of jobs that end COMPLETED naming no output or error file.
    """

    fail_rate: float = 0.0
    line_error_rate: float = 0.0
    expire_after: float | None = None
    line_delay: float = 0.0
    seed: int | None = None
    lost_answer_rate: float = 0.0
    answer_delay: float = 0.0
    not_found_window: tuple[float, float] | None = None
    no_output_rate: float = 0.0

    def __post_init__(self) -> None:
        _check_rate("fail_rate", self.fail_rate)
        _check_rate("line_error_rate", self.line_error_rate)
        if self.expire_after is not None:
            _check_seconds("expire_after", self.expire_after)
        _check_seconds("line_delay", self.line_delay)
        _check_rate("lost_answer_rate", self.lost_answer_rate)
        _check_rate("no_output_rate", self.no_output_rate)
        _check_seconds("answer_delay", self.answer_delay)
        if self.not_found_window is not None:
            _check_window("not_found_window", self.not_found_window)

    @property
    def enabled(self) -> bool:
        """True if any fault is switched on."""
        rates = (self.fail_rate, self.line_error_rate, self.lost_answer_rate, self.no_output_rate)
        delays = (self.line_delay, self.answer_delay)
        optional = (self.expire_after, self.not_found_window)
        return any(rates + delays) or any(value is not None for value in optional)

    def hides_batches(self, elapsed: float) -> bool:
        """True if, ``elapsed`` seconds after start, batch retrieves answer 404."""
        if self.not_found_window is None:
            return False
        start, duration = self.not_found_window
        return start <= elapsed < start + duration

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Faults:
        """Read the BATCHBRIDGE_LOCAL_* variables; a bad value raises ValueError naming it."""
        env = os.environ if environ is None else environ
        seconds = "a finite number of seconds >= 0"
        expire = _env_float(env, ENV_EXPIRE_AFTER, seconds, 0.0)
        seed_text = env.get(ENV_SEED, "").strip()
        try:
            seed = int(seed_text) if seed_text else None
        except ValueError:
            raise ValueError(f"{ENV_SEED} must be an integer (got {seed_text!r})") from None
        return cls(
            fail_rate=_env_float(env, ENV_FAIL_RATE, "a rate in [0, 1]", 0.0, 1.0) or 0.0,
            line_error_rate=_env_float(env, ENV_LINE_ERROR_RATE, "a rate in [0, 1]", 0.0, 1.0)
            or 0.0,
            expire_after=expire,
            line_delay=_env_float(env, ENV_LINE_DELAY, seconds, 0.0) or 0.0,
            seed=seed,
            lost_answer_rate=_env_float(env, ENV_LOST_ANSWER_RATE, "a rate in [0, 1]", 0.0, 1.0)
            or 0.0,
            answer_delay=_env_float(env, ENV_ANSWER_DELAY, seconds, 0.0) or 0.0,
            not_found_window=_env_window(env, ENV_NOT_FOUND_WINDOW),
            no_output_rate=_env_float(env, ENV_NO_OUTPUT_RATE, "a rate in [0, 1]", 0.0, 1.0) or 0.0,
        )


@dataclass(frozen=True, slots=True)
class InjectedFailure:
    """One call picked to fail: the HTTP status to answer and the Retry-After to send."""

    status_code: int
    retry_after: float

    @property
    def message(self) -> str:
        """A human explanation that makes clear the failure is deliberate."""
        kind = "rate limit exceeded" if self.status_code == 429 else "internal server error"
        return f"{kind} (injected by the local API's fail_rate; retry after {self.retry_after}s)"


@dataclass(frozen=True, slots=True)
class LostAnswer:
    """A create that took effect but whose answer is lost: the status the caller gets."""

    status_code: int

    @property
    def message(self) -> str:
        """Says what happened, so nobody mistakes the deliberate failure for a bug."""
        return (
            f"{'gateway timeout' if self.status_code == 504 else 'internal server error'} "
            "(injected by the local API's lost_answer_rate: the batch WAS created, but this "
            "answer is lost)"
        )


class CallFaults:
    """Draws, thread-safely, which API calls fail (``fail_rate``) or lose their answer
    (``lost_answer_rate``), and knows when batches are hidden (``not_found_window``).

    The window is measured from this object's creation: the server's or provider's start.
    """

    def __init__(self, faults: Faults, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.faults = faults
        self._rng = random.Random(faults.seed)
        self._lock = threading.Lock()
        self._clock = clock
        self._started = clock()

    def draw(self) -> InjectedFailure | None:
        """None if this call goes through, else how it should fail."""
        if self.faults.fail_rate <= 0:
            return None
        with self._lock:
            fails = self._rng.random() < self.faults.fail_rate
            status = 429 if self._rng.random() < 0.5 else 500
        if not fails:
            return None
        return InjectedFailure(status_code=status, retry_after=INJECTED_RETRY_AFTER_SECONDS)

    def draw_lost_answer(self) -> LostAnswer | None:
        """None if this (successful) create is answered, else the status that replaces it."""
        # No draw at all while off, so existing seeds keep giving the same fail_rate draws.
        if self.faults.lost_answer_rate <= 0:
            return None
        with self._lock:
            lost = self._rng.random() < self.faults.lost_answer_rate
            status = 500 if self._rng.random() < 0.5 else 504
        return LostAnswer(status_code=status) if lost else None

    def hides_batches(self) -> bool:
        """True while the not_found_window is open."""
        return self.faults.hides_batches(self._clock() - self._started)


def _check_rate(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a rate in [0, 1] (got {value!r})")


def _check_seconds(name: str, value: float) -> None:
    if not (value >= 0.0 and math.isfinite(value)):  # "not >=" rejects NaN too
        raise ValueError(f"{name} must be a finite number of seconds >= 0 (got {value!r})")


WINDOW_RULE = "START:DURATION in seconds since start, START >= 0 and DURATION > 0 (e.g. 10:5)"


def _check_window(name: str, window: tuple[float, float]) -> None:
    start, duration = window
    finite = math.isfinite(start) and math.isfinite(duration)
    if not (finite and start >= 0.0 and duration > 0.0):
        raise ValueError(f"{name} must be {WINDOW_RULE} (got {window!r})")


def parse_window(text: str, name: str) -> tuple[float, float]:
    """Parse ``START:DURATION`` (seconds); a bad value raises ValueError naming ``name``."""
    start_text, colon, duration_text = text.strip().partition(":")
    try:
        if not colon:
            raise ValueError
        window = (float(start_text), float(duration_text))
        _check_window(name, window)
    except ValueError:
        raise ValueError(f"{name} must be {WINDOW_RULE} (got {text!r})") from None
    return window


def _env_window(env: Mapping[str, str], name: str) -> tuple[float, float] | None:
    text = env.get(name, "").strip()
    return parse_window(text, name) if text else None


def _env_float(
    env: Mapping[str, str],
    name: str,
    rule: str,
    lower: float,
    upper: float | None = None,
) -> float | None:
    text = env.get(name, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name} must be {rule} (got {text!r})") from None
    # "not (a <= v)" so that NaN is rejected too.
    if not (lower <= value and math.isfinite(value) and (upper is None or value <= upper)):
        raise ValueError(f"{name} must be {rule} (got {text!r})")
    return value
