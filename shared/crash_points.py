"""Test-only crash points: a worker that kills itself at a named step boundary.

The reliability suite proves that a crash between any two steps loses and repeats nothing.
Rather than hoping a random SIGKILL lands in a window a few microseconds wide, the worker
itself dies (SIGKILL, so no cleanup runs) the first N times it reaches a step that
``BATCHBRIDGE_CRASH_AT`` names. Each crash first leaves a marker file in
``BATCHBRIDGE_CRASH_DIR``; the markers count the crashes across the process restarts they
cause, and tell the test that the windows really were hit.

Unset (the default) the plan is empty and each crash point is one dict lookup.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import orjson

log = logging.getLogger(__name__)

# Each name is the boundary just after the step it names.
CRASH_STEPS = {
    "after_claim": "the packer claimed requests from a buffer (claim in Redis, nothing written)",
    "after_file_write": "the batch file is written (not yet recorded in SQL)",
    "after_pack_commit": "the batch is recorded in SQL (its claim keys not yet dropped)",
    "after_upload": "the input file is at the provider (its file id not yet recorded)",
    "after_create": "the provider job exists (its id not yet recorded)",
    "after_download": "a result file is downloaded (nothing fanned out yet)",
    "after_fanout_delivery": "a chunk of results is in Redis (not yet recorded in SQL)",
    "after_fanout_chunk": "a chunk of results is delivered and recorded",
    "after_webhook_send": "the receiver accepted a webhook (its delivery not yet recorded)",
}


def parse_crash_plan(value: object) -> dict[str, int]:
    """``step`` or ``step*N`` items, comma-separated (or a JSON object), as step -> N."""
    if isinstance(value, Mapping):
        items = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, str) and value.strip().startswith("{"):
        items = list(orjson.loads(value).items())
    elif isinstance(value, str):
        items = []
        for part in (p.strip() for p in value.split(",")):
            if part:
                step, _, times = part.partition("*")
                items.append((step.strip(), times.strip() or "1"))
    else:
        raise ValueError("must be a comma-separated list of step or step*N")
    plan: dict[str, int] = {}
    for step, times in items:
        if step not in CRASH_STEPS:
            raise ValueError(f"unknown step {step!r}; the steps are {', '.join(CRASH_STEPS)}")
        try:
            count = int(times)
        except (TypeError, ValueError):
            raise ValueError(f"{step}*{times}: N must be a whole number") from None
        if count < 1:
            raise ValueError(f"{step}*{count}: N must be at least 1")
        plan[step] = count
    return plan


@dataclass(frozen=True)
class CrashPlan:
    """The steps to die at, and where the crashes so far are counted."""

    steps: Mapping[str, int]
    marker_dir: Path | None = None

    def reached(self, step: str) -> None:
        """Kill this process if ``step`` is planned and has crashes left; else return."""
        times = self.steps.get(step)
        if not times or self.marker_dir is None:
            return
        for n in range(times):
            marker = self.marker_dir / f"{step}.{n}"
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                continue
            os.write(fd, f"{os.getpid()}\n".encode())
            os.close(fd)
            log.warning(
                "crash point %s (%d of %d): killing process %d", step, n + 1, times, os.getpid()
            )
            for handler in logging.getLogger().handlers:
                handler.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def crashes_so_far(marker_dir: Path, step: str | None = None) -> int:
    """How many planned crashes have happened (at ``step``, or at any step)."""
    if not marker_dir.is_dir():
        return 0
    pattern = f"{step}.*" if step else "*.*"
    return sum(1 for _ in marker_dir.glob(pattern))
