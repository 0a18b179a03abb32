"""Error bodies in Together's two shapes, and the exception handlers that produce them."""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
}


class ApiError(Exception):
    """A request the API refuses; rendered in the error shape of the endpoint family."""

    def __init__(
        self, status_code: int, message: str, *, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.headers = dict(headers or {})


def json_response(
    body: object, status_code: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    """A JSON response serialised with orjson."""
    return Response(
        orjson.dumps(body), status_code=status_code, headers=headers, media_type="application/json"
    )


def error_body(path: str, status_code: int, message: str) -> dict[str, object]:
    """The error body Together uses for ``path``'s endpoint family.

    Batch endpoints answer ``{"error": "message"}``; everything else (file endpoints and
    unknown paths) the OpenAI-style ``{"error": {"message", "type", "param", "code"}}``.
    """
    if path == "/v1/batches" or path.startswith("/v1/batches/"):
        return {"error": message}
    error_type = _ERROR_TYPES.get(status_code, "server_error")
    return {"error": {"message": message, "type": error_type, "param": None, "code": None}}


def error_response(
    path: str, status_code: int, message: str, headers: Mapping[str, str] | None = None
) -> Response:
    """A JSON error response in the shape of ``path``'s endpoint family."""
    return json_response(error_body(path, status_code, message), status_code, headers)


async def handle_api_error(request: Request, exc: Exception) -> Response:
    """Render an ApiError."""
    assert isinstance(exc, ApiError)
    return error_response(request.url.path, exc.status_code, exc.message, exc.headers)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    """Render Starlette's own errors (unknown route, wrong method, bad form) in our shapes."""
    assert isinstance(exc, HTTPException)
    path = request.url.path
    message = exc.detail
    if exc.status_code == 404:
        message = f"no such endpoint: {request.method} {path}"
        if path.startswith("/v1/v1/"):
            # The docs' TOGETHER_BASE_URL ends in /v1, but the v3 SDK adds /v1 to each path.
            message += "; the client's base_url must not end in /v1 (use http://host:port)"
    headers = dict(exc.headers or {})
    return error_response(path, exc.status_code, message, headers)


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    """Answer a bug with a clean 500 JSON body; the traceback goes to the server's log only."""
    # Starlette re-raises the exception after this response so the server logs it once.
    return error_response(request.url.path, 500, "internal server error")
