"""Ctrl-C as a request to stop, for the CLI's long-running loops (``status --watch``, ``metrics``).

Python raises KeyboardInterrupt wherever the main thread happens to be, which may be inside a
database or Redis client call, or holding a lock that the way out needs: the process can then
hang instead of exiting. Here the first signal only marks the stop as asked, and the loop ends
at its next look; a second one raises KeyboardInterrupt at once, for a step that hangs.
"""

from __future__ import annotations

import signal
import time
from types import FrameType, TracebackType


class StopRequest:
    """While entered, SIGINT (and the other ``signals``) ask for a stop instead of raising."""

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGINT,)) -> None:
        self._signals = signals
        # A plain list, not an Event: a handler that took a lock the interrupted code holds
        # would deadlock.
        self._asked: list[bool] = []
        self._previous: dict[signal.Signals, object] = {}

    @property
    def asked(self) -> bool:
        """Whether a stop has been asked for."""
        return bool(self._asked)

    def sleep_until(self, deadline: float) -> None:
        """Sleep until ``deadline`` (monotonic) or until a stop is asked, whichever is first."""
        while not self._asked and time.monotonic() < deadline:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def _on_signal(self, _signum: int, _frame: FrameType | None) -> None:
        if self._asked:
            raise KeyboardInterrupt  # asked twice: stop now
        self._asked.append(True)

    def __enter__(self) -> StopRequest:
        self._previous = {sig: signal.signal(sig, self._on_signal) for sig in self._signals}
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
