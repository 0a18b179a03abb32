"""ASGI middleware guarding ``/v1/...``: bearer-key auth first, then injected failures."""

from __future__ import annotations

import asyncio
import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.providers.local.api.errors import error_response
from shared.providers.local.faults import CallFaults


class GuardMiddleware:
    """Refuses unauthenticated ``/v1/...`` calls (401) and fails a fraction of the rest.

    The upload PUT (authorised by its signed URL; the SDK never retries it) and ``/healthz``
    are left alone. A refused call never reaches a route, so it changes nothing. With
    ``answer_delay``, every ``/v1/...`` answer (refusals too) is held back that long after
    the call took effect.
    """

    def __init__(self, app: ASGIApp, *, api_key: str | None, call_faults: CallFaults) -> None:
        self.app = app
        self._key = None if api_key is None else api_key.encode()
        self._call_faults = call_faults

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the call, then pass it on or answer it here."""
        path: str = scope.get("path", "")
        if scope["type"] != "http" or not (path == "/v1" or path.startswith("/v1/")):
            await self.app(scope, receive, send)
            return
        delay = self._call_faults.faults.answer_delay
        if delay > 0:
            send = _late(send, delay)
        if not self._authorised(scope):
            response = error_response(
                path, 401, "invalid or missing API key (send Authorization: Bearer <key>)"
            )
            await response(scope, receive, send)
            return
        failure = self._call_faults.draw()
        if failure is not None:
            headers = {
                "Retry-After": f"{failure.retry_after:g}",
                "retry-after-ms": f"{failure.retry_after * 1000:g}",
            }
            response = error_response(path, failure.status_code, failure.message, headers)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorised(self, scope: Scope) -> bool:
        if self._key is None:
            return True
        header = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                header = value
                break
        scheme, _, token = header.strip().partition(b" ")
        # Constant time, so response timing does not leak how much of a guess was right.
        matches = hmac.compare_digest(token.strip(), self._key)
        return scheme.lower() == b"bearer" and matches


def _late(send: Send, delay: float) -> Send:
    """``send`` holding the response back ``delay`` seconds: the route has done its work by
    the time it starts answering, so a client that gives up sooner misses a call that happened.
    """

    async def late_send(message: Message) -> None:
        if message["type"] == "http.response.start":
            await asyncio.sleep(delay)
        await send(message)

    return late_send
