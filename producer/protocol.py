"""What the sync and async producers say to Redis, and how they read the answers."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any, Literal, NamedTuple, cast

import orjson

from shared.redis_layout import Keys, buffer_name, text
from shared.schemas import (
    ErrorInfo,
    IdempotencyConflict,
    InvalidRequest,
    PreparedRequest,
    Result,
    idempotency_conflict,
)

RequestState = Literal[
    "pending", "batched", "cancelling", "completed", "failed", "cancelled", "unknown"
]
# What a cancel did: finished it now ("cancelled"), marked it so that whatever ends its
# batch ends it cancelled ("marked"), nothing because it had finished ("finished"), or nothing
# because no such request is known ("unknown").
CancelKind = Literal["cancelled", "marked", "finished", "unknown"]
CANCEL_MESSAGE = "cancelled by the producer"


def request_dict(
    model: str, messages: Any, options: dict[str, Any], body_fields: dict[str, Any]
) -> dict[str, Any]:
    """One request as submit_many takes it; options left as None are omitted."""
    request = {"model": model, "messages": messages, **body_fields}
    request.update((name, value) for name, value in options.items() if value is not None)
    return request


def plain_requests(requests: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each request of a submit_many as a dict, or InvalidRequest naming ``[i]``."""
    plain = []
    for i, request in enumerate(requests):
        if type(request) is dict:
            plain.append(request)
        elif isinstance(request, Mapping):
            plain.append(dict(request))
        else:
            raise InvalidRequest(
                f"[{i}]",
                "must be a mapping of submit's arguments (model, messages, ...), "
                f"not {type(request).__name__}",
            )
    return plain


def enqueue_args(keys: Keys, idempotency_ttl: int, prepared: list[PreparedRequest]) -> list[Any]:
    """ARGV for ``enqueue.lua``.

    Every value is a str (model names are valid UTF-8: they passed orjson), bytes or int, so
    packing the command cannot fail after an earlier chunk was written.
    """
    args: list[Any] = [keys.base, int(time.time() * 1000), idempotency_ttl]
    for p in prepared:
        args += (
            p.id,
            buffer_name(p.provider, p.model),
            p.idempotency_key,
            p.body,
            p.callback_queue,
            p.metadata,
            p.digest,
            p.webhook_url,
        )
    return args


def read_enqueue_reply(
    prepared: list[PreparedRequest], reply: list[Any], full_at: int, *, offset: int = 0
) -> tuple[list[str], set[str]]:
    """The request ids (an idempotency repeat gets the first id) and the buffers now full.

    Raises IdempotencyConflict naming ``[offset + position].idempotency_key`` when the script
    refused the chunk (then it stored nothing of it).
    """
    # reply: B, B pairs (buf, count), then pairs (position, existing id) for repeats; or
    # -1, position, existing id for a key taken by a different request.
    n_bufs = int(reply[0])
    if n_bufs < 0:
        field = f"[{offset + int(reply[1]) - 1}].idempotency_key"
        raise idempotency_conflict(field, text(reply[2]))
    ids = [p.id for p in prepared]
    for i in range(1 + 2 * n_bufs, len(reply), 2):
        ids[int(reply[i]) - 1] = text(reply[i + 1])
    full = {text(reply[i]) for i in range(1, 1 + 2 * n_bufs, 2) if int(reply[i + 1]) >= full_at}
    return ids, full


def keyed_requests(prepared: list[PreparedRequest]) -> dict[str, tuple[int, str]]:
    """Idempotency key -> (position of its first request, digest), for a pre-flight check."""
    keyed: dict[str, tuple[int, str]] = {}
    for i, p in enumerate(prepared):
        if p.idempotency_key:
            keyed.setdefault(p.idempotency_key, (i, p.digest))
    return keyed


def check_taken_keys(keyed: dict[str, tuple[int, str]], values: list[Any]) -> None:
    """Raise IdempotencyConflict if a key (``MGET`` reply ``values``) is bound elsewhere.

    submit_many sends several chunks, each atomic on its own; checking every key first means
    a conflict is refused before any chunk is stored. (A concurrent producer can still take
    a key in between: the script then refuses that chunk, reported by PartialSubmitError.)
    """
    for (i, digest), raw in zip(keyed.values(), values, strict=True):
        if raw is None:
            continue
        held_id, sep, held_digest = text(raw).partition("/")
        if sep and held_digest != digest:
            raise idempotency_conflict(f"[{i}].idempotency_key", held_id)


def conflict_or_none(failure: Exception | None, stored: int) -> IdempotencyConflict | None:
    """The conflict to raise as is when a submit_many stored nothing because of it."""
    if stored == 0 and isinstance(failure, IdempotencyConflict):
        return failure
    return None


class CancelOutcome(NamedTuple):
    """What :meth:`Producer.try_cancel` did, and the outcome a finished request already had."""

    kind: CancelKind
    outcome: str | None = None

    @property
    def will_be_cancelled(self) -> bool:
        """True when the request's one outcome is (or will be) ``cancelled``."""
        return self.kind in ("cancelled", "marked")


def cancel_args(keys: Keys, result_ttl: int, request_id: str, metadata: Any) -> list[Any]:
    """ARGV for ``cancel.lua``.

    ``metadata`` is the request's stored ``meta`` field (JSON bytes, or None). The result is
    delivered now if the request is still in its buffer, or kept with the request and
    delivered when its batch ends (the collector then sends a fuller one when it can).
    """
    result = Result(
        request_id=request_id,
        status="cancelled",
        error=ErrorInfo(code="cancelled", message=CANCEL_MESSAGE),
        metadata=orjson.loads(metadata) if metadata else None,
    )
    return [keys.base, result_ttl, request_id, result.to_json()]


def read_cancel_reply(reply: Any) -> CancelOutcome:
    """``cancel.lua``'s reply as a CancelOutcome."""
    kind = cast(CancelKind, text(reply[0]))
    return CancelOutcome(kind, text(reply[1]) if len(reply) > 1 and reply[1] else None)


STATE_FIELDS = ["state", "outcome", "cx"]


def read_state(reply: Any) -> RequestState:
    """A request's state from ``HMGET`` of :data:`STATE_FIELDS`."""
    state, outcome, cancel_mark = reply
    if state is None:
        return "unknown"
    if state == b"done":
        return cast(RequestState, text(outcome))
    if state == b"batched" and cancel_mark:
        return "cancelling"
    return cast(RequestState, text(state))
