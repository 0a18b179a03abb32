"""What a request and a result look like, with the rules a request must follow."""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal, NamedTuple, NotRequired

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from typing_extensions import TypedDict

ResultStatus = Literal["completed", "failed", "cancelled"]
Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
_ID_PATTERN = r"^[A-Za-z0-9_.:\-]{1,128}$"
# The JSONL line is b'{"custom_id":"' + id + b'","body":' + body + b'}\n'.
LINE_OVERHEAD = len(b'{"custom_id":"') + len(b'","body":') + len(b"}\n")


class InvalidRequest(ValueError):
    """A request broke a rule; the message names the field and the rule."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


class ErrorInfo(BaseModel):
    """Why a request failed."""

    model_config = ConfigDict(frozen=True)

    code: str
    message: str


class Result(BaseModel):
    """The one terminal outcome of a request, as delivered to its callback queue."""

    model_config = ConfigDict(frozen=True)

    request_id: str
    status: ResultStatus
    response: dict[str, Any] | None = None
    error: ErrorInfo | None = None
    usage: dict[str, Any] | None = None
    batch_id: str | None = None
    attempts: int = 0
    metadata: dict[str, Any] | None = None

    def to_json(self) -> bytes:
        """Serialise compactly for Redis."""
        return orjson.dumps(self.model_dump(mode="json", exclude_none=True))

    @classmethod
    def from_json(cls, raw: bytes | str) -> Result:
        """Inverse of :meth:`to_json`."""
        return cls.model_validate(orjson.loads(raw))


class _Message(TypedDict):
    __pydantic_config__ = ConfigDict(extra="allow")  # type: ignore[misc]

    role: Role
    content: NotRequired[str | list[dict[str, Any]] | None]


class _RequestFields(TypedDict):
    """A submitted request: producer options plus body fields (extra keys go in the body)."""

    # A TypedDict list adapter validates a whole submit_many in one call into pydantic-core.
    __pydantic_config__ = ConfigDict(extra="allow")  # type: ignore[misc]

    model: Annotated[str, Field(min_length=1, max_length=256)]
    messages: Annotated[list[_Message], Field(min_length=1, max_length=10_000)]
    max_tokens: NotRequired[Annotated[int, Field(gt=0)] | None]
    callback_queue: NotRequired[Annotated[str, Field(pattern=_ID_PATTERN)] | None]
    idempotency_key: NotRequired[Annotated[str, Field(pattern=_ID_PATTERN)] | None]
    provider: NotRequired[Literal["local", "together"] | None]
    metadata: NotRequired[dict[str, Any] | None]


_validate_many = TypeAdapter(list[_RequestFields]).validate_python
# Producer options: stored beside the body, never sent to the provider.
_NOT_IN_BATCH = frozenset({"stream"})
# Keys that mean a request needs more than "serialise it as it is".
_OPTIONS_AND_CHECKS = frozenset(
    {"callback_queue", "idempotency_key", "provider", "metadata", *_NOT_IN_BATCH}
)


class PreparedRequest(NamedTuple):
    """A validated request, serialised and ready for the enqueue script.

    A NamedTuple rather than a dataclass: submit_many builds one per request on its hot path.
    """

    id: str
    provider: str
    model: str
    body: bytes
    callback_queue: str
    metadata: bytes
    idempotency_key: str
    line_bytes: int


def new_request_ids(n: int) -> list[str]:
    """Fresh request ids (32 hex chars: they are also the lines' custom_ids, ≤ 64 chars)."""
    raw = os.urandom(16 * n).hex()
    return [raw[i : i + 32] for i in range(0, 32 * n, 32)]


def prepare_many(
    requests: list[dict[str, Any]], *, default_provider: str, max_line_bytes: int
) -> list[PreparedRequest]:
    """Validate and serialise requests, or raise InvalidRequest naming ``[i].field``."""
    try:
        _validate_many(requests)
    except ValidationError as exc:
        raise _invalid_from(exc) from None
    prepared = []
    ids = new_request_ids(len(requests))
    overhead = LINE_OVERHEAD + 32
    for i, request in enumerate(requests):
        body = request
        callback_queue = idempotency_key = provider = metadata = None
        if not _OPTIONS_AND_CHECKS.isdisjoint(request) or request.get("max_tokens", 1) is None:
            body = dict(request)
            callback_queue = body.pop("callback_queue", None)
            idempotency_key = body.pop("idempotency_key", None)
            provider = body.pop("provider", None)
            metadata = body.pop("metadata", None)
            if "max_tokens" in body and body["max_tokens"] is None:
                del body["max_tokens"]
            for name in _NOT_IN_BATCH.intersection(body):
                raise InvalidRequest(f"[{i}].{name}", "is not allowed in a batch request")
        encoded = _dumps_checked(body, f"[{i}]")
        line_bytes = overhead + len(encoded)
        if line_bytes > max_line_bytes:
            raise InvalidRequest(
                f"[{i}].messages",
                f"the request's batch line would be {line_bytes} bytes, over the "
                f"{max_line_bytes}-byte limit per line",
            )
        prepared.append(
            PreparedRequest(
                ids[i],
                provider or default_provider,
                body["model"],
                encoded,
                callback_queue or "",
                b"" if metadata is None else _dumps_checked(metadata, f"[{i}].metadata"),
                idempotency_key or "",
                line_bytes,
            )
        )
    return prepared


def prepare_request(
    request: dict[str, Any], *, default_provider: str, max_line_bytes: int
) -> PreparedRequest:
    """Validate and serialise one request, or raise InvalidRequest naming the field."""
    try:
        return prepare_many(
            [request], default_provider=default_provider, max_line_bytes=max_line_bytes
        )[0]
    except InvalidRequest as exc:
        raise InvalidRequest(exc.field.removeprefix("[0]").lstrip("."), exc.rule) from None


def _dumps_checked(value: Any, field: str) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:
        if isinstance(value, dict):
            for key, item in value.items():
                try:
                    orjson.dumps(item)
                except TypeError as exc:
                    raise InvalidRequest(
                        f"{field}.{key}", f"must be JSON-serialisable ({exc})"
                    ) from None
        raise InvalidRequest(field, "must be JSON-serialisable") from None


def _invalid_from(exc: ValidationError) -> InvalidRequest:
    err = exc.errors()[0]
    # loc is (request index, field[, message index, message field]) plus, for unions, the
    # name of each member type tried, which means nothing to a caller: cut it off.
    loc = list(err["loc"])
    keep = 4 if len(loc) > 1 and loc[1] == "messages" else 2
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[:keep])
    rule = err["msg"]
    if err["type"] == "too_short" and field.endswith("].messages"):
        rule = "must be a non-empty list of messages"
    return InvalidRequest(field, f"{rule} (got {err.get('input')!r:.80})")
