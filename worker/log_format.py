"""Logs: one JSON object per line when not on a terminal, and quiet while nothing happens.

Batch ids (28 hex digits) and request ids (20 characters of [0-9a-v]) in a message are also
given as ``batch_id`` and ``request_id`` fields, so a log pipeline can follow one of them
through its life.
"""

from __future__ import annotations

import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

_BATCH_ID = re.compile(r"(?<![0-9a-f])[0-9a-f]{28}(?![0-9a-f])")
_REQUEST_ID = re.compile(r"(?<![0-9a-z])[0-9a-v]{20}(?![0-9a-z])")
_PLAIN = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", "batch_id"?, "request_id"?, "exc"?}``."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        message = record.getMessage()
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        for field, pattern in (("batch_id", _BATCH_ID), ("request_id", _REQUEST_ID)):
            found = getattr(record, field, None) or _first(pattern, message)
            if found:
                entry[field] = found
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def _first(pattern: re.Pattern[str], text: str) -> str | None:
    match = pattern.search(text)
    return match.group(0) if match else None


class QuietTicks(logging.Filter):
    """Keeps Celery's per-tick INFO lines out while idle (they stay at DEBUG level).

    The beat's "Sending due task", each task's "received" and a tick whose result is
    ``idle`` would otherwise log several lines a second with nothing happening. A task that
    did something still logs its result ("packed 2 batches (...)").
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """False for the idle lines, unless the logger is at DEBUG."""
        if record.levelno != logging.INFO or logging.getLogger().isEnabledFor(logging.DEBUG):
            return True
        args = record.args if isinstance(record.args, dict) else {}
        if record.name == "celery.beat":
            return not record.msg.startswith("Scheduler: Sending due task")
        if record.name == "celery.worker.strategy":
            return not str(args.get("name", "")).startswith("batchbridge.")
        if record.name == "celery.app.trace":
            return args.get("return_value") != "'idle'"
        return True


def wants_json(stream: Any) -> bool:
    """JSON unless the stream is a terminal."""
    isatty = getattr(stream, "isatty", None)
    return not (callable(isatty) and isatty())


def adapt_handlers(logger: logging.Logger) -> None:
    """Give ``logger``'s handlers the quiet filter and, off a terminal, the JSON format."""
    for handler in logger.handlers:
        handler.addFilter(QuietTicks())
        stream = getattr(handler, "stream", None)
        if stream is not None and wants_json(stream):
            handler.setFormatter(JsonFormatter())


def configure_cli_logging(level: int = logging.INFO) -> None:
    """Logging for the ``batchbridge`` command (stderr; JSON when it is not a terminal)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if wants_json(sys.stderr) else logging.Formatter(_PLAIN))
    handler.addFilter(QuietTicks())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
