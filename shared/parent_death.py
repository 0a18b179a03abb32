"""Children that die with their parent, even when the parent is SIGKILLed."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int) -> Callable[[], None]:
    """A ``preexec_fn`` asking Linux to send ``signum`` to the child when its parent dies.

    ``batchbridge up`` may itself be SIGKILLed, when no code of its own runs to stop its
    children; the kernel's parent-death signal stops them anyway. Elsewhere it does nothing.
    """
    parent = os.getpid()

    def arrange() -> None:
        if sys.platform.startswith("linux"):
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
            if os.getppid() != parent:  # the parent died before prctl took effect
                os.kill(os.getpid(), signum)

    return arrange
