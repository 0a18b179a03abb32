"""Reading a provider's output and error files: one line at a time, each line on its own.

A line that cannot be read (not UTF-8, not JSON, not an object, no ``custom_id``, cut short at
the end of the file) is counted as that line's problem and skipped; it never stops the lines
after it. Its request then has no result line and is treated as not executed.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from shared.schemas import ErrorInfo

log = logging.getLogger(__name__)
# Per-line error codes worth another attempt in a later batch.
RETRYABLE_CODES = frozenset(
    {
        "rate_limit",
        "rate_limit_exceeded",
        "timeout",
        "server_error",
        "internal_error",
        "overloaded",
        "service_unavailable",
        "expired",
        "batch_expired",
        "missing_result",
        "batch_lost",
        "batch_no_output",
        "batch_unsent",
        "batch_requeued",
        "http_408",
        "http_429",
    }
)
# A request of a batch the operator cancelled with --requeue that had not run yet.
REQUEUED_CODE = "batch_requeued"
_CODE_CHARS = 64  # Request.error_code's width
_LOGGED_PER_KIND = 5  # a file of 50,000 bad lines must not flood the log


@dataclass(frozen=True, slots=True)
class LineOutcome:
    """What one result line (or its absence) says about one request."""

    request_id: str
    status: str  # completed | failed | cancelled
    response: dict[str, Any] | None = None
    error: ErrorInfo | None = None
    size: int = 0  # bytes of the line it came from: what holding it in memory roughly costs

    @property
    def retryable(self) -> bool:
        """Whether a failure could succeed in a later batch."""
        if self.error is None:
            return False
        code = self.error.code
        return code in RETRYABLE_CODES or (code.startswith("http_5") and len(code) == 8)


@dataclass
class LineProblems:
    """What was wrong with the lines of one batch's result files: counts and a few samples."""

    batch_id: str
    counts: Counter[str] = field(default_factory=Counter)
    samples: dict[str, str] = field(default_factory=dict)

    def note(self, kind: str, where: str, level: int = logging.ERROR) -> None:
        """Count one problem of ``kind`` at ``where`` (file and line, or the custom_id)."""
        self.counts[kind] += 1
        self.samples.setdefault(kind, where[:120])
        if self.counts[kind] <= _LOGGED_PER_KIND:
            log.log(level, "batch %s: %s: %s; skipped", self.batch_id, where, kind)

    def summary(self) -> str | None:
        """One line for the batch's record, e.g. ``2 result lines skipped: 1 not JSON (...)``."""
        if not self.counts:
            return None
        parts = [f"{n} {kind} (first: {self.samples[kind]})" for kind, n in self.counts.items()]
        return f"{self.counts.total()} result lines skipped: " + "; ".join(parts)


def read_result_lines(path: Path, problems: LineProblems) -> Iterator[tuple[int, LineOutcome]]:
    """Parse an output or error file (Together's or OpenAI's shape): (line offset, outcome)."""
    offset = 0
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, 1):
            outcome = _outcome_of(raw, f"{path.name} line {number}", problems)
            if outcome is not None:
                yield offset, outcome
            offset += len(raw)


def reread_result_lines(
    path: Path, offsets: Iterable[int], problems: LineProblems
) -> Iterator[LineOutcome]:
    """Parse again the lines that start at ``offsets`` (in file order)."""
    with open(path, "rb") as lines:
        for offset in sorted(offsets):
            lines.seek(offset)
            outcome = _outcome_of(lines.readline(), f"{path.name} at byte {offset}", problems)
            if outcome is not None:
                yield outcome


def _outcome_of(raw: bytes, where: str, problems: LineProblems) -> LineOutcome | None:
    line = parsed_line(raw, where, problems)
    if line is None:
        return None
    return parse_result_line(line["custom_id"], line, size=len(raw))


def parsed_line(raw: bytes, where: str, problems: LineProblems) -> dict[str, Any] | None:
    """One raw line as a JSON object with a custom_id, or None (counted in ``problems``)."""
    if not raw or raw.isspace():
        return None
    try:
        line = orjson.loads(raw)
    except orjson.JSONDecodeError:
        problems.note(_why_not_json(raw), where)
        return None
    if not isinstance(line, dict):
        problems.note("not a JSON object", where)
        return None
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        problems.note("no custom_id", where)
        return None
    return line


def _why_not_json(raw: bytes) -> str:
    # Only the last line of a file can lack its newline: a download or write that was cut.
    if not raw.endswith(b"\n"):
        return "truncated last line"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return "not valid UTF-8"
    return "not JSON"


def parse_result_line(custom_id: str, line: dict[str, Any], size: int = 0) -> LineOutcome:
    """One line → the outcome it reports: error set, or a non-200 response, means failure."""
    error = line.get("error")
    response = line.get("response") or {}
    body = response.get("body") if isinstance(response, dict) else None
    if error:
        info = error if isinstance(error, dict) else {"message": str(error)}
        return LineOutcome(
            custom_id,
            "failed",
            error=ErrorInfo(
                code=str(info.get("code") or "provider_error")[:_CODE_CHARS],
                message=str(info.get("message") or "the provider reported an error"),
            ),
            size=size,
        )
    status_code = response.get("status_code", 200) if isinstance(response, dict) else 0
    if status_code != 200 or not isinstance(body, dict):
        detail = (body or {}).get("error") if isinstance(body, dict) else None
        message = detail.get("message") if isinstance(detail, dict) else None
        return LineOutcome(
            custom_id,
            "failed",
            error=ErrorInfo(
                code=f"http_{status_code}"[:_CODE_CHARS],
                message=str(message or f"the provider answered {status_code}"),
            ),
            size=size,
        )
    return LineOutcome(custom_id, "completed", response=body, size=size)
