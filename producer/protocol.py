"""What the sync and async producers say to Redis, and how they read the answers."""

from __future__ import annotations

import time
from typing import Any, Literal, cast

import orjson

from shared.redis_layout import Keys, buffer_name, text
from shared.schemas import ErrorInfo, PreparedRequest, Result

RequestState = Literal["pending", "batched", "completed", "failed", "cancelled", "unknown"]


def request_dict(
    model: str, messages: Any, options: dict[str, Any], body_fields: dict[str, Any]
) -> dict[str, Any]:
    """One request as submit_many takes it; options left as None are omitted."""
    request = {"model": model, "messages": messages, **body_fields}
    request.update((name, value) for name, value in options.items() if value is not None)
    return request


def enqueue_args(keys: Keys, idempotency_ttl: int, prepared: list[PreparedRequest]) -> list[Any]:
    """ARGV for ``enqueue.lua``."""
    args: list[Any] = [keys.base, int(time.time() * 1000), idempotency_ttl]
    for p in prepared:
        args += (
            p.id,
            buffer_name(p.provider, p.model),
            p.line_bytes,
            p.idempotency_key,
            p.body,
            p.callback_queue,
            p.metadata,
        )
    return args


def read_enqueue_reply(
    prepared: list[PreparedRequest], reply: list[Any], full_at: int
) -> tuple[list[str], set[str]]:
    """The request ids (an idempotency repeat gets the first id) and the buffers now full."""
    # reply: B, B pairs (buf, count), then pairs (position, existing id) for repeats.
    n_bufs = int(reply[0])
    ids = [p.id for p in prepared]
    for i in range(1 + 2 * n_bufs, len(reply), 2):
        ids[int(reply[i]) - 1] = text(reply[i + 1])
    full = {text(reply[i]) for i in range(1, 1 + 2 * n_bufs, 2) if int(reply[i + 1]) >= full_at}
    return ids, full


def cancel_args(keys: Keys, result_ttl: int, request_id: str, metadata: Any) -> list[Any]:
    """ARGV for ``finish.lua`` cancelling a request still in its buffer.

    ``metadata`` is the request's stored ``meta`` field (JSON bytes, or None).
    """
    result = Result(
        request_id=request_id,
        status="cancelled",
        error=ErrorInfo(code="cancelled", message="cancelled by the producer"),
        metadata=orjson.loads(metadata) if metadata else None,
    )
    return [keys.base, result_ttl, "", request_id, "cancelled", result.to_json()]


def read_state(reply: Any) -> RequestState:
    """A request's state from ``HMGET state outcome``."""
    state, outcome = reply
    if state is None:
        return "unknown"
    return cast(RequestState, text(outcome if state == b"done" else state))
