"""Standard Webhooks events: the exact body of one, and the headers that sign it.

The body is a pure function of the outbox entry (event type, event time, result JSON), so
every attempt and every replay sends identical bytes; only ``webhook-timestamp`` and the
signatures over it change from one attempt to the next.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import UTC, datetime
from typing import Final
from urllib.parse import SplitResult, urlsplit

from shared.settings import Settings, webhook_keys

EVENT_TYPES: Final = frozenset({"completed", "failed", "cancelled"})
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


def event_type_name(outcome: str) -> str:
    """The event ``type`` for a request outcome: ``request.completed`` and so on."""
    if outcome not in EVENT_TYPES:
        raise ValueError(f"event_type must be one of {sorted(EVENT_TYPES)}, got {outcome!r}")
    return f"request.{outcome}"


def iso_timestamp(at_ms: int) -> str:
    """ISO 8601 UTC with milliseconds, e.g. ``2026-12-02T07:30:00.123Z``."""
    seconds, millis = divmod(at_ms, 1000)
    moment = datetime.fromtimestamp(seconds, UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{millis:03d}Z"


def event_body(event_type: str, at_ms: int, result_json: bytes) -> bytes:
    """``{"type":"request.<outcome>","timestamp":"<ISO>","data":<result>}``, byte-exact.

    Built by concatenation, not by a JSON encoder, so ``data`` is the Result JSON verbatim
    (the same bytes the callback stream carried) and nothing can reorder or re-escape it.
    """
    head = f'{{"type":"{event_type_name(event_type)}","timestamp":"{iso_timestamp(at_ms)}","data":'
    return head.encode() + result_json + b"}"


def sign(msg_id: str, timestamp: int, body: bytes, keys: list[bytes]) -> str:
    """The ``webhook-signature`` value: ``v1,<base64 HMAC-SHA256>`` per key, space-separated."""
    if not keys:
        raise ValueError("keys must hold at least one signing key")
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        for key in keys
    )


def webhook_headers(msg_id: str, body: bytes, keys: list[bytes], now: float) -> dict[str, str]:
    """The headers of one attempt; ``now`` (seconds) becomes its ``webhook-timestamp``."""
    timestamp = int(now)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(msg_id, timestamp, body, keys),
        "content-type": "application/json",
    }


def secrets_for(url: str, settings: Settings) -> list[bytes]:
    """The signing keys for ``url``: its longest matching endpoint prefix, else the default.

    A prefix only matches URLs of its own origin (scheme, host and port): a prefix such as
    ``https://hooks.example.com`` must not lend its secret to ``https://hooks.example.com.evil``.
    Returns [] when no secret applies.
    """
    best: str | None = None
    for prefix in settings.webhook_endpoint_secrets:
        if _prefix_matches(prefix, url) and (best is None or len(prefix) > len(best)):
            best = prefix
    if best is not None:
        return webhook_keys(settings.webhook_endpoint_secrets[best])
    if settings.webhook_secret is not None:
        return webhook_keys(settings.webhook_secret)
    return []


def _prefix_matches(prefix: str, url: str) -> bool:
    return url.startswith(prefix) and _origin(urlsplit(prefix)) == _origin(urlsplit(url))


def _origin(parts: SplitResult) -> tuple[str, str, int | None]:
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:  # not a number: the URL guard refuses such URLs anyway
        port = None
    return scheme, (parts.hostname or "").lower(), port or _DEFAULT_PORTS.get(scheme)
