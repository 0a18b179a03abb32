"""Fault injection for the local Batch API: flaky calls, failing lines, expiry, slowness."""

from __future__ import annotations

import math
import os
import random
import threading
from collections.abc import Mapping
from dataclasses import dataclass

ENV_FAIL_RATE = "BATCHBRIDGE_LOCAL_FAIL_RATE"
ENV_LINE_ERROR_RATE = "BATCHBRIDGE_LOCAL_LINE_ERROR_RATE"
ENV_EXPIRE_AFTER = "BATCHBRIDGE_LOCAL_EXPIRE_AFTER"
ENV_LINE_DELAY = "BATCHBRIDGE_LOCAL_LINE_DELAY"
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
    """

    fail_rate: float = 0.0
    line_error_rate: float = 0.0
    expire_after: float | None = None
    line_delay: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        _check_rate("fail_rate", self.fail_rate)
        _check_rate("line_error_rate", self.line_error_rate)
        if self.expire_after is not None:
            _check_seconds("expire_after", self.expire_after)
        _check_seconds("line_delay", self.line_delay)

    @property
    def enabled(self) -> bool:
        """True if any fault is switched on."""
        return any((self.fail_rate, self.line_error_rate, self.line_delay)) or (
            self.expire_after is not None
        )

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


class CallFaults:
    """Draws, thread-safely, which API calls fail according to ``Faults.fail_rate``."""

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self._rng = random.Random(faults.seed)
        self._lock = threading.Lock()

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


def _check_rate(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a rate in [0, 1] (got {value!r})")


def _check_seconds(name: str, value: float) -> None:
    if not (value >= 0.0 and math.isfinite(value)):  # "not >=" rejects NaN too
        raise ValueError(f"{name} must be a finite number of seconds >= 0 (got {value!r})")


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
