"""Pausing the cyclic garbage collector while a batch is packed or fanned out."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic collection inside the block (reference counting still frees everything).

    Parsing 50,000 result lines allocates millions of containers, and every allocation
    threshold reached starts a collection that walks the objects a worker holds: measured on
    a 50,000-line fan-out, that was a fifth of its time. The lines, outcomes and results
    built there form no reference cycles, so nothing waits for the collector; what the
    block leaves behind is collected as usual once it ends.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
