"""Streaming validation of a batch input file against Together's rules."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from shared.limits import (
    MAX_CUSTOM_ID_CHARS,
    TOGETHER_MAX_BATCH_BYTES,
    TOGETHER_MAX_BATCH_REQUESTS,
)


@dataclass(frozen=True, slots=True)
class ValidationResult:
    """Outcome of validating an input file.

    ``line_count`` counts requests (non-blank lines). On failure ``error`` is a human message
    naming the line and the rule broken, and ``line_number`` the 1-based line, if any.
    """

    ok: bool
    model: str | None = None
    line_count: int = 0
    error: str | None = None
    line_number: int | None = None


class _Invalid(Exception):
    def __init__(self, message: str, line_number: int | None = None) -> None:
        super().__init__(message)
        self.message = message if line_number is None else f"line {line_number}: {message}"
        self.line_number = line_number


def validate_input_file(
    path: Path,
    *,
    max_requests: int = TOGETHER_MAX_BATCH_REQUESTS,
    max_bytes: int = TOGETHER_MAX_BATCH_BYTES,
    expected_model: str | None = None,
) -> ValidationResult:
    """Check a JSONL batch file line by line and stop at the first problem.

    ``expected_model``, when given, is the model the batch was created for; every line must
    use it.
    """
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise _Invalid(f"file is {size} bytes, over the limit of {max_bytes} bytes per batch")
        model, count = _scan(path, max_requests=max_requests, expected_model=expected_model)
    except _Invalid as exc:
        return ValidationResult(ok=False, error=exc.message, line_number=exc.line_number)
    return ValidationResult(ok=True, model=model, line_count=count)


def read_requests(path: Path) -> Iterator[tuple[int, str, dict[str, object]]]:
    """Yield ``(line_number, custom_id, body)`` for each request of a validated file."""
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if raw.strip():
                custom_id, body, _ = _parse_line(raw, number)
                yield number, custom_id, body


def _scan(path: Path, *, max_requests: int, expected_model: str | None) -> tuple[str, int]:
    # custom_id -> first line; bounded by max_requests, so memory stays bounded too.
    seen: dict[str, int] = {}
    model = expected_model
    model_line: int | None = None
    count = 0
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            count += 1
            if count > max_requests:
                raise _Invalid(f"over the limit of {max_requests} requests per batch", number)
            custom_id, _, line_model = _parse_line(raw, number)
            if custom_id in seen:
                raise _Invalid(
                    f"duplicate custom_id {custom_id!r} (first used on line {seen[custom_id]}); "
                    "custom_id must be unique in the file",
                    number,
                )
            seen[custom_id] = number
            if model is None:
                model, model_line = line_model, number
            elif line_model != model:
                where = f"model {model!r} of line {model_line}"
                if model_line is None:
                    where = f"the batch's model_id {model!r}"
                raise _Invalid(
                    f"model {line_model!r} differs from {where}; "
                    "a batch file must use exactly one model",
                    number,
                )
    if count == 0 or model is None:
        raise _Invalid("file has no requests")
    return model, count


def _parse_line(raw: bytes, number: int) -> tuple[str, dict[str, object], str]:
    try:
        record: Any = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _Invalid(f"not valid JSON ({_short(str(exc))})", number) from None
    if not isinstance(record, dict):
        raise _Invalid("not a JSON object", number)
    if "custom_id" not in record:
        raise _Invalid("missing custom_id", number)
    custom_id = record["custom_id"]
    if not isinstance(custom_id, str) or not custom_id:
        raise _Invalid("custom_id must be a non-empty string", number)
    if len(custom_id) > MAX_CUSTOM_ID_CHARS:
        raise _Invalid(
            f"custom_id is {len(custom_id)} characters, over the limit of {MAX_CUSTOM_ID_CHARS}",
            number,
        )
    if "body" not in record:
        raise _Invalid("missing body", number)
    body = record["body"]
    if not isinstance(body, dict):
        raise _Invalid("body must be a JSON object", number)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _Invalid("body.model must be a non-empty string", number)
    return custom_id, body, model


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
