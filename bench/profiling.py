"""Seeing inside a timed step: Lua script time, the traced-memory peak and a profile."""

from __future__ import annotations

import cProfile
import pstats
import threading
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from bench.harness import ROOT


def time_scripts(spent: dict[str, float], scripts: Any) -> None:
    """Accumulate the seconds of each Lua script call (``script:finish``...) into ``spent``."""
    original: Callable[..., Any] = scripts.run

    def run(name: str, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(name, *args, **kwargs)
        finally:
            key = f"script:{name}"
            spent[key] = spent.get(key, 0.0) + time.perf_counter() - started

    scripts.run = run


class PeakTracer:
    """tracemalloc, plus a thread that keeps a snapshot from near the traced-memory peak."""

    # The peak of a step is usually a moment (a reply and its copies alive together) that no
    # snapshot taken after the step can show, so the thread polls the traced size and
    # snapshots whenever it is a new high. Sizes are Python allocations only (orjson's
    # over-allocated buffers count in full); RSS adds the allocator's and the C
    # libraries' own memory and leaves out pages never touched.

    def __init__(self, interval: float = 0.002, frames: int = 30) -> None:
        self.interval = interval
        self.frames = frames
        self.best = 0
        self.snapshot: tracemalloc.Snapshot | None = None
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="peak tracer")

    def __enter__(self) -> PeakTracer:
        tracemalloc.start(self.frames)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            current, _ = tracemalloc.get_traced_memory()
            if current > self.best * 1.03 + 1_000_000:
                self.snapshot = None  # its own traces must not count in the next one
                self.snapshot = tracemalloc.take_snapshot()
                self.best = current

    def report(self, top: int = 8) -> dict[str, Any]:
        """The traced peak, and the biggest allocation sites alive at the snapshot."""
        sites: list[dict[str, Any]] = []
        if self.snapshot is not None:
            for stat in self.snapshot.statistics("traceback")[:top]:
                # A Traceback runs from the oldest frame to the most recent (the allocation).
                frames = [f"{short_path(f.filename)}:{f.lineno}" for f in reversed(stat.traceback)]
                ours = [f for f in frames if f.startswith(("worker/", "shared/", "producer/"))]
                sites.append(
                    {
                        "mb": round(stat.size / 1e6, 1),
                        "blocks": stat.count,
                        "allocated_at": frames[0],
                        "project_frames": ours[:4],  # innermost first
                    }
                )
        return {
            "traced_peak_mb": round(self.peak / 1e6, 1),
            "snapshot_traced_mb": round(self.best / 1e6, 1),
            "sites": sites,
        }


def short_path(filename: str) -> str:
    """A source path relative to the repo (or to site-packages) for a report."""
    path = filename.replace("\\", "/")
    root = str(ROOT).replace("\\", "/") + "/"
    if path.startswith(root):
        return path[len(root) :]
    marker = "site-packages/"
    return path[path.index(marker) + len(marker) :] if marker in path else path


def profile_report(profiler: cProfile.Profile, top: int = 15) -> list[str]:
    """The functions with the most own time, as ``file:line(function) own s / cumulative s``."""
    stats = pstats.Stats(profiler)
    rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)  # type: ignore[attr-defined]
    lines = []
    for (filename, lineno, function), (_cc, calls, own, cumulative, _callers) in rows[:top]:
        lines.append(
            f"{short_path(filename)}:{lineno}({function}) {calls:,} calls, "
            f"{own:.2f} s own, {cumulative:.2f} s cumulative"
        )
    return lines
