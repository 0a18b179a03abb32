"""Result lines regrouped by their request's line in the batch file, before they are applied.

Providers write output in their own order (Together's is not the input's), so applying lines
as they come updates request rows at random places in the record. Each outcome makes its row
grow by the whole result, and on SQLite random growth rewrites a page per row: measured with
SQLite alone on this project's 2-core VM, 50,000 UPDATEs writing ~1.2 KB results took 1.9 s in
random order against 0.56 s in runs of 2,000 neighbouring rows (the whole fan-out went from
5.4 s to 2.6 s with this module). So the collector first copies
every line into the bucket of its request's line number (a pass of sequential writes), then
applies bucket after bucket. Every line of a request lands in the same bucket, so "a success
wins over an error" is still decided with all of a request's lines at hand.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from worker.result_lines import LineProblems, parsed_line

# Neighbouring requests per bucket: one fan-out chunk (worker.fan_out.CHUNK_RESULTS).
BUCKET_LINES = 2000
_NO_LINE = -1  # rows packed before line numbers were recorded: one bucket of their own
_KEY = b'"custom_id"'


def leading_custom_id(raw: bytes) -> str | None:
    """The custom_id of a whole line that names it before any nested value; else None.

    Providers put ``custom_id`` near the start of each line, so most lines are bucketed
    without parsing a megabyte of response twice. The match is exact or nothing: a quote in
    a JSON string is always escaped, so ``"custom_id"`` followed by a colon is a key, and with
    no ``{`` or ``[`` before it that key is the line's own. The line is fully parsed when it
    is applied, so a line that is not JSON after all is still counted as such then.
    """
    if not raw.startswith(b"{") or not raw.endswith(b"\n"):
        return None
    at = raw.find(_KEY)
    if at < 0 or raw.find(b"{", 1, at) >= 0 or raw.find(b"[", 1, at) >= 0:
        return None
    i = _skip_blanks(raw, at + len(_KEY))
    if raw[i : i + 1] != b":":
        return None
    i = _skip_blanks(raw, i + 1)
    if raw[i : i + 1] != b'"':
        return None
    end = raw.find(b'"', i + 1)
    if end < 0 or raw.find(b"\\", i + 1, end) >= 0:
        return None
    try:
        return raw[i + 1 : end].decode()
    except UnicodeDecodeError:
        return None


def _skip_blanks(raw: bytes, i: int) -> int:
    while raw[i : i + 1] in (b" ", b"\t"):
        i += 1
    return i


class LineBuckets:
    """Bucket files under ``folder``: lines of requests ``lines[id] // BUCKET_LINES``."""

    def __init__(self, folder: Path, lines: dict[str, int | None], problems: LineProblems):
        self.folder = folder
        self.lines = lines
        self.problems = problems
        self._files: dict[int, IO[bytes]] = {}

    def add_file(self, path: Path) -> None:
        """Copy each line of ``path`` into its bucket (unreadable lines are counted, skipped)."""
        with open(path, "rb") as lines:
            for number, raw in enumerate(lines, 1):
                request_id = leading_custom_id(raw)
                if request_id is None or request_id not in self.lines:
                    # Not the usual shape: parse it all, which also says what is wrong with it.
                    line = parsed_line(raw, f"{path.name} line {number}", self.problems)
                    if line is None:
                        continue
                    request_id = line["custom_id"]
                if request_id not in self.lines:
                    self.problems.note(
                        "custom_ids not in this batch", repr(request_id), logging.WARNING
                    )
                    continue
                at = self.lines[request_id]
                bucket = _NO_LINE if at is None else at // BUCKET_LINES
                out = self._files.get(bucket)
                if out is None:
                    out = open(self._path(bucket), "wb", buffering=256 << 10)  # noqa: SIM115
                    self._files[bucket] = out
                out.write(raw if raw.endswith(b"\n") else raw + b"\n")

    def paths(self) -> Iterator[Path]:
        """The bucket files, in the order of the rows they cover (closed first)."""
        for out in self._files.values():
            out.close()
        for bucket in sorted(self._files):
            yield self._path(bucket)

    def close(self) -> None:
        """Close whatever is still open (after a failure)."""
        for out in self._files.values():
            with contextlib.suppress(OSError):
                out.close()

    def _path(self, bucket: int) -> Path:
        return self.folder / f"bucket-{bucket + 1:06d}.jsonl"
