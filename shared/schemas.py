"""What a request and a result look like, with the rules a request must follow."""

from __future__ import annotations

import enum
import hashlib
import math
import os
import re
from collections.abc import Sequence
from ipaddress import IPv4Network, IPv6Network
from typing import Annotated, Any, Literal, NamedTuple, NotRequired

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from typing_extensions import TypedDict

ResultStatus = Literal["completed", "failed", "cancelled"]
Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
_ID_PATTERN = r"^[A-Za-z0-9_.:\-]{1,128}$"
# What a callback queue may be called (a consumer naming one checks the same rule).
CALLBACK_QUEUE_NAME = re.compile(_ID_PATTERN)
# No C0 control character (U+0000-U+001F) and no DEL: a model name is a name, not text.
_NO_CONTROL_PATTERN = r"^[^\x00-\x1f\x7f]+$"
_NO_CONTROL_RULE = "must not contain control characters (U+0000-U+001F, U+007F)"
# The JSONL line is b'{"custom_id":"' + id + b'","body":' + body + b'}\n'.
LINE_OVERHEAD = len(b'{"custom_id":"') + len(b'","body":') + len(b"}\n")
# A request id: 20 characters of [0-9a-v] (base32hex, lowercase), 5 random bits each: 100
# bits. Redis keeps each id three times per pending request (its hash's key, a field of the
# bodies hash, an entry of the pending list); at 20 characters the key and the field each
# fit an allocation 16 bytes smaller than 32 hex characters did (bench: memory).
REQUEST_ID_LENGTH = 20
# How deep metadata may nest: far below orjson's limit (254), which the envelopes a result
# is sent in (Result, cancel, webhook) would otherwise reach first, failing a cancel.
MAX_METADATA_DEPTH = 64
_ID_ALPHABET = b"0123456789abcdefghijklmnopqrstuv"
# Maps any byte to a character of the alphabet by its low 5 bits, so uniform random bytes
# give uniform characters (256 is a multiple of 32).
_ID_CHARS = bytes(_ID_ALPHABET[b & 31] for b in range(256))
# The provider part of the buffer of a request that names no provider. The producer never
# guesses the deployment's default (it would read its own environment, not the worker's);
# the packer resolves this to the worker's ``Settings.default_provider`` when it records the
# batch. Not a valid ``provider`` value, so no request can name it.
DEFAULT_PROVIDER = "default"
# What the local echo engine puts in every answer (shared/providers/local/engines.py).
DRY_RUN_FINGERPRINT = "batchbridge-echo-dry-run"
# orjson writes every JSON-native type plus these; dataclasses are not JSON, so refuse them.
_DUMPS_OPTIONS = orjson.OPT_PASSTHROUGH_DATACLASS
# The regex engine's literal search scans a 1 KB body in about 60% of the time that
# ``b"null" in body`` takes (CPython 3.11), and this runs once per submitted request.
_find_null = re.compile(rb"null").search


class InvalidRequest(ValueError):
    """A request broke a rule; the message names the field and the rule."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule

    def with_field(self, field: str) -> InvalidRequest:
        """The same error (and class) naming the field as the caller knows it."""
        return type(self)(field, self.rule)


class IdempotencyConflict(InvalidRequest):
    """The idempotency key already stands for a different request; this one was not stored.

    As with Stripe's API, a key may be reused only to retry the identical request: the same
    provider, model, body fields, callback queue and metadata.
    """


class ErrorInfo(BaseModel):
    """Why a request failed."""

    model_config = ConfigDict(frozen=True)

    code: str
    message: str


class Result(BaseModel):
    """The one terminal outcome of a request, as delivered to its callback queue.

    ``dry_run`` is true when the answer came from the local echo engine (no model ran), so a
    consumer never mistakes dry-run text for a real completion.
    """

    model_config = ConfigDict(frozen=True)

    request_id: str
    status: ResultStatus
    response: dict[str, Any] | None = None
    error: ErrorInfo | None = None
    usage: dict[str, Any] | None = None
    batch_id: str | None = None
    attempts: int = 0
    metadata: dict[str, Any] | None = None
    dry_run: bool = False

    def to_json(self) -> bytes:
        """Serialise compactly for Redis (``dry_run`` only when true: it is rare)."""
        return orjson.dumps(
            self.model_dump(
                mode="json", exclude_none=True, exclude=None if self.dry_run else {"dry_run"}
            )
        )

    @staticmethod
    def encode(
        *,
        request_id: str,
        status: ResultStatus,
        response: dict[str, Any] | None = None,
        error: ErrorInfo | None = None,
        usage: dict[str, Any] | None = None,
        batch_id: str | None = None,
        attempts: int = 0,
        metadata: dict[str, Any] | None = None,
        dry_run: bool = False,
    ) -> bytes:
        """``Result(...).to_json()``, byte for byte, without building the model.

        The collector encodes one Result per request of a 50,000-line batch; skipping the
        model's validation and dump is most of what that costs. The values must already be
        what the model holds (a JSON object as response, usage and metadata).
        """
        if metadata is not None and not isinstance(metadata, dict):
            raise ValueError(f"metadata must be a JSON object, not {type(metadata).__name__}")
        out: dict[str, Any] = {"request_id": request_id, "status": status}
        if response is not None:
            out["response"] = response
        if error is not None:
            out["error"] = {"code": error.code, "message": error.message}
        if usage is not None:
            out["usage"] = usage
        if batch_id is not None:
            out["batch_id"] = batch_id
        out["attempts"] = attempts
        if metadata is not None:
            out["metadata"] = metadata
        if dry_run:
            out["dry_run"] = True
        return orjson.dumps(out)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Result:
        """Inverse of :meth:`to_json`."""
        # The validator itself: model_validate's Python wrapper costs a third as much again,
        # per result, on a consumer taking thousands a second. The validator's own JSON
        # parser (validate_json) is faster on one result parsed again and again, but slower
        # on distinct ones, as a stream holds: 6.1 against 4.9 us per 0.7 KB echo result,
        # over 20,000 of them (medians of 9 rounds, 2-core VM).
        return cls.__pydantic_validator__.validate_python(orjson.loads(raw))  # type: ignore[no-any-return]

    @staticmethod
    def is_dry_run(response: dict[str, Any] | None) -> bool:
        """Whether a provider response body is the echo engine's (a dry run)."""
        return response is not None and response.get("system_fingerprint") == DRY_RUN_FINGERPRINT


class _Message(TypedDict):
    # Strict: nothing is coerced, so the values validated are exactly the values sent.
    __pydantic_config__ = ConfigDict(extra="allow", strict=True)  # type: ignore[misc]

    role: Role
    content: NotRequired[str | list[dict[str, Any]] | None]


class _RequestFields(TypedDict):
    """A submitted request: producer options plus body fields (extra keys go in the body)."""

    # A TypedDict list adapter validates a whole submit_many in one call into pydantic-core.
    # Strict: "5", 5.0 and True are not a max_tokens, and bytes are not a model name.
    __pydantic_config__ = ConfigDict(extra="allow", strict=True)  # type: ignore[misc]

    model: Annotated[str, Field(min_length=1, max_length=256, pattern=_NO_CONTROL_PATTERN)]
    messages: Annotated[list[_Message], Field(min_length=1, max_length=10_000)]
    max_tokens: NotRequired[Annotated[int, Field(gt=0)] | None]
    callback_queue: NotRequired[Annotated[str, Field(pattern=_ID_PATTERN)] | None]
    idempotency_key: NotRequired[Annotated[str, Field(pattern=_ID_PATTERN)] | None]
    provider: NotRequired[Literal["local", "together"] | None]
    metadata: NotRequired[dict[str, Any] | None]
    webhook_url: NotRequired[Annotated[str, Field(min_length=1, max_length=2048)] | None]


_validate_many = TypeAdapter(list[_RequestFields]).validate_python
# Producer options: stored beside the body, never sent to the provider.
_NOT_IN_BATCH = frozenset({"stream"})
# Producer options: stored beside the body.
_OPTIONS = frozenset({"callback_queue", "idempotency_key", "provider", "metadata", "webhook_url"})
# Keys that mean a request needs more than "serialise it as it is".
_OPTIONS_AND_CHECKS = _OPTIONS | _NOT_IN_BATCH


class PreparedRequest(NamedTuple):
    """A validated request, serialised and ready for the enqueue script.

    A NamedTuple rather than a dataclass: submit_many builds one per request on its hot path.
    ``line_bytes`` is what the request weighs against the line and batch byte limits: its
    JSONL line plus its metadata, which every result carries back. ``digest`` identifies the
    request behind an idempotency key ('' without one). ``webhook_url`` has passed the SSRF
    guard ('' for none).
    """

    id: str
    provider: str
    model: str
    body: bytes
    callback_queue: str
    metadata: bytes
    idempotency_key: str
    line_bytes: int
    digest: str
    webhook_url: str = ""


def new_request_ids(n: int) -> list[str]:
    """Fresh request ids (they are also the lines' custom_ids, ≤ 64 chars)."""
    size = REQUEST_ID_LENGTH
    raw = os.urandom(size * n).translate(_ID_CHARS).decode()
    return [raw[i : i + size] for i in range(0, size * n, size)]


def keyed_request_id(idempotency_key: str, digest: str) -> str:
    """The id of the request an idempotency key names: the same whenever it is resubmitted.

    Derived from the key and the request's digest rather than drawn at random, so that a
    resubmission finds its request even where Redis no longer maps the key (an OS crash cut
    the last second of its AOF, a failover to a lagging replica, the key's TTL passed): the
    record still knows the id, and a request it already holds is never made twice.
    """
    raw = b"\0".join((b"idempotency", idempotency_key.encode(), digest.encode()))
    digest_bytes = hashlib.blake2b(raw, digest_size=REQUEST_ID_LENGTH).digest()
    return digest_bytes.translate(_ID_CHARS).decode()


def prepare_many(
    requests: list[dict[str, Any]],
    *,
    max_line_bytes: int,
    max_metadata_bytes: int,
    webhook_allow: Sequence[IPv4Network | IPv6Network] = (),
) -> list[PreparedRequest]:
    """Validate and serialise requests, or raise InvalidRequest naming ``[i].field``.

    A ``webhook_url`` must pass the SSRF guard (``shared.webhook_urls``): its host is resolved
    and every address must be globally routable or inside ``webhook_allow``.

    Everything the enqueue script is sent is encoded here, before anything is written, so an
    encoding error can never leave part of a submit_many stored.
    """
    try:
        # Strict validation coerces nothing, so the input holds exactly the values checked and
        # is what gets serialised: the validator's copies would be slower to encode (their
        # keys are new strings without a cached hash). The names sent beside the body are
        # taken from the copies, which are plain str even where a str subclass was given.
        checked: list[dict[str, Any]] = _validate_many(requests)  # type: ignore[assignment]
    except ValidationError as exc:
        raise _invalid_from(exc) from None
    prepared = []
    ids = new_request_ids(len(requests))
    overhead = LINE_OVERHEAD + REQUEST_ID_LENGTH
    keys_used: dict[str, tuple[int, str]] = {}
    for i, body in enumerate(requests):
        callback_queue = idempotency_key = provider = None
        metadata = b""
        webhook_url = ""
        if not _OPTIONS_AND_CHECKS.isdisjoint(body) or body.get("max_tokens", 1) is None:
            options = checked[i]
            callback_queue = options.get("callback_queue")
            idempotency_key = options.get("idempotency_key")
            provider = options.get("provider")
            if options.get("webhook_url"):
                webhook_url = _checked_webhook_url(
                    options["webhook_url"], f"[{i}].webhook_url", webhook_allow
                )
            raw_metadata = body.get("metadata")
            body = {k: v for k, v in body.items() if k not in _OPTIONS}
            if "max_tokens" in body and body["max_tokens"] is None:
                del body["max_tokens"]
            for name in _NOT_IN_BATCH.intersection(body):
                raise InvalidRequest(f"[{i}].{name}", "is not allowed in a batch request")
            if raw_metadata is not None:
                metadata = _encode(raw_metadata, f"[{i}].metadata")
                # Counting brackets is a bound on the depth that costs one scan; only
                # metadata with that many is walked.
                if metadata.count(b"{") + metadata.count(b"[") > MAX_METADATA_DEPTH:
                    depth = _nesting_depth(raw_metadata)
                    if depth > MAX_METADATA_DEPTH:
                        raise InvalidRequest(
                            f"[{i}].metadata",
                            f"is nested {depth} levels deep, over the limit of "
                            f"{MAX_METADATA_DEPTH}: the Result that carries it back nests it "
                            "further, and must still encode",
                        )
                if len(metadata) > max_metadata_bytes:
                    raise InvalidRequest(
                        f"[{i}].metadata",
                        f"is {len(metadata)} bytes as JSON, over the {max_metadata_bytes}-byte "
                        "limit (BATCHBRIDGE_MAX_METADATA_BYTES)",
                    )
        encoded = _encode(body, f"[{i}]")
        line = overhead + len(encoded)
        line_bytes = line + len(metadata)
        if line_bytes > max_line_bytes:
            raise InvalidRequest(
                f"[{i}].messages" if line > max_line_bytes else f"[{i}].metadata",
                f"the request would take {line_bytes} bytes ({line} for its batch line, "
                f"{len(metadata)} of metadata), over the {max_line_bytes}-byte limit per "
                "request (BATCHBRIDGE_MAX_LINE_BYTES)",
            )
        provider = provider or DEFAULT_PROVIDER
        callback_queue = callback_queue or ""
        digest = ""
        if idempotency_key:
            digest = request_digest(provider, callback_queue, encoded, metadata, webhook_url)
            first = keys_used.setdefault(idempotency_key, (i, digest))
            if first[1] != digest:
                raise IdempotencyConflict(
                    f"[{i}].idempotency_key",
                    f"is also the key of [{first[0]}], a different request; reuse a key only "
                    "to retry the identical request",
                )
        prepared.append(
            PreparedRequest(
                keyed_request_id(idempotency_key, digest) if idempotency_key else ids[i],
                provider,
                checked[i]["model"],
                encoded,
                callback_queue,
                metadata,
                idempotency_key or "",
                line_bytes,
                digest,
                webhook_url,
            )
        )
    return prepared


def _checked_webhook_url(url: str, field: str, allow: Sequence[IPv4Network | IPv6Network]) -> str:
    # Imported here: only requests with a webhook pay for the guard (and its DNS lookup).
    from shared.webhook_urls import check_webhook_url

    return check_webhook_url(url, allow, field=field)


def prepare_request(
    request: dict[str, Any],
    *,
    max_line_bytes: int,
    max_metadata_bytes: int,
    webhook_allow: Sequence[IPv4Network | IPv6Network] = (),
) -> PreparedRequest:
    """Validate and serialise one request, or raise InvalidRequest naming the field."""
    try:
        return prepare_many(
            [request],
            max_line_bytes=max_line_bytes,
            max_metadata_bytes=max_metadata_bytes,
            webhook_allow=webhook_allow,
        )[0]
    except InvalidRequest as exc:
        raise exc.with_field(single_field(exc.field)) from None


def single_field(field: str) -> str:
    """``[0].x`` as a single submit names it: ``x``."""
    return field.removeprefix("[0]").lstrip(".")


def request_digest(
    provider: str, callback_queue: str, body: bytes, metadata: bytes, webhook_url: str = ""
) -> str:
    """What an idempotency key is bound to: everything that makes the request what it is."""
    # NUL cannot occur inside any part (JSON escapes it; names are pattern-checked, URLs
    # refuse control characters), so joining on it is unambiguous. The webhook joins only
    # when given, so digests of requests without one are those earlier versions stored.
    fields = [provider.encode(), callback_queue.encode(), body, metadata]
    if webhook_url:
        fields.append(webhook_url.encode())
    parts = b"\0".join(fields)
    return hashlib.blake2b(parts, digest_size=16).hexdigest()


def idempotency_conflict(field: str, existing_id: str) -> IdempotencyConflict:
    """The error for a key already bound to a different request."""
    return IdempotencyConflict(
        field,
        f"was already used for a different request ({existing_id}); reuse a key only to retry "
        "the identical request (same provider, model, body fields, callback_queue, webhook_url "
        "and metadata)",
    )


def _nesting_depth(value: Any) -> int:
    """How many arrays and objects deep ``value`` goes (0 for a scalar); not recursive."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _encode(value: Any, field: str) -> bytes:
    try:
        encoded = orjson.dumps(value, option=_DUMPS_OPTIONS)
    except TypeError:
        if isinstance(value, dict):
            for key, item in value.items():
                try:
                    orjson.dumps(item, option=_DUMPS_OPTIONS)
                except TypeError as exc:
                    raise InvalidRequest(
                        f"{field}.{key}", f"must be JSON-serialisable ({exc})"
                    ) from None
        raise InvalidRequest(field, "must be JSON-serialisable") from None
    # orjson writes NaN and ±Infinity as null. Both are rare, so the bytes are searched (one
    # fast scan) and the value walked only on a hit, which a real null also causes.
    if _find_null(encoded):
        found = _non_finite(value, field)
        if found is not None:
            path, number = found
            rule = f"must be a finite number (got {number!r}: JSON has no NaN or Infinity)"
            raise InvalidRequest(path, rule)
    return encoded


def _non_finite(value: Any, path: str) -> tuple[str, float] | None:
    """Where the first NaN or ±Infinity inside ``value`` is, and which it is."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, value)
    if isinstance(value, dict):
        for key, item in value.items():
            found = _non_finite(item, f"{path}.{key}")
            if found is not None:
                return found
    elif isinstance(value, list | tuple):
        for j, item in enumerate(value):
            found = _non_finite(item, f"{path}[{j}]")
            if found is not None:
                return found
    elif isinstance(value, enum.Enum):
        return _non_finite(value.value, path)
    return None


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
    elif err["type"] == "string_pattern_mismatch" and field.endswith("].model"):
        rule = _NO_CONTROL_RULE
    if field.endswith(".webhook_url"):
        # Its credentials check comes after these rules: the URL may still hold a password.
        return InvalidRequest(field, f"{rule} (value not shown: a URL may hold credentials)")
    return InvalidRequest(field, f"{rule} (got {err.get('input')!r:.80})")
