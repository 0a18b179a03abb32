"""Together's 3-step upload: reserve an id (302), PUT the bytes, then preprocess."""

from __future__ import annotations

import hashlib
import hmac
import re

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from shared.providers.local.api.errors import ApiError, json_response
from shared.providers.local.file_writer import FileWriter
from shared.providers.local.store import FILE_TYPES, LocalStore, NotFound

# The purposes the SDK lets a client upload with (its FilePurpose literal).
UPLOAD_PURPOSES = ("fine-tune", "calibration", "eval", "batch-api")
# The SDK sends one PUT for files up to 5 GiB (larger ones go multipart).
MAX_UPLOAD_BYTES = 5 * 1024**3
MAX_FILENAME_CHARS = 255
# Bytes gathered before each disk write, so the event loop never blocks on the disk.
_WRITE_BUFFER = 1 << 20
_SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")
_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def upload_routes(store: LocalStore, *, public_url: str | None) -> list[Route]:
    """The routes of the upload flow, over ``store``."""

    async def request_upload(request: Request) -> Response:
        """POST /v1/files: reserve a file id and answer 302 to a signed PUT URL."""
        fields = await _read_form(request)
        purpose = _field(fields, "purpose")
        if purpose not in UPLOAD_PURPOSES:
            allowed = ", ".join(UPLOAD_PURPOSES)
            raise ApiError(400, f"invalid purpose {purpose!r}; allowed: {allowed}")
        filename = _field(fields, "file_name")
        if not filename or len(filename) > MAX_FILENAME_CHARS:
            raise ApiError(400, f"file_name must have 1 to {MAX_FILENAME_CHARS} characters")
        file_type = _field(fields, "file_type", default=filename.rpartition(".")[2])
        if file_type not in FILE_TYPES:
            allowed = ", ".join(sorted(FILE_TYPES))
            raise ApiError(400, f"invalid file_type {file_type!r}; allowed: {allowed}")
        checksum = _field(fields, "checksum", default="") or None
        pending = await run_in_threadpool(
            store.reserve_upload,
            filename=filename,
            purpose=purpose,
            file_type=file_type,
            checksum=checksum,
        )
        base = (public_url or str(request.base_url)).rstrip("/")
        location = f"{base}/_upload/{pending.file_id}?sig={pending.token}"
        headers = {"Location": location, "X-Together-File-Id": pending.file_id}
        return Response(status_code=302, headers=headers)

    async def receive_bytes(request: Request) -> Response:
        """PUT /_upload/{id}?sig=...: stream the body to disk; exactly 200 on success."""
        file_id = request.path_params["file_id"]
        try:
            pending = await run_in_threadpool(store.get_upload, file_id)
        except NotFound:
            raise ApiError(404, f"no pending upload for {file_id!r} (done already?)") from None
        signature = request.query_params.get("sig", "")
        if not hmac.compare_digest(signature.encode(), pending.token.encode()):
            raise ApiError(403, "the upload URL's signature is missing or wrong")
        writer = await run_in_threadpool(store.open_upload, file_id)
        try:
            digest = await _stream_to(writer, request)
            expected = pending.checksum
            if expected and _SHA256_HEX.match(expected) and digest != expected.lower():
                raise ApiError(400, "the uploaded bytes do not match the announced checksum")
            await run_in_threadpool(writer.commit)
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is listening any more
        finally:
            writer.abort()
        return Response(status_code=200)

    async def preprocess(request: Request) -> Response:
        """POST /v1/files/{id}/preprocess: the finished file's FileResponse."""
        file_id = request.path_params["file_id"]
        try:
            stored = await run_in_threadpool(store.get_file, file_id)
        except NotFound:
            try:
                await run_in_threadpool(store.get_upload, file_id)
            except NotFound:
                raise ApiError(404, f"file {file_id!r} not found") from None
            raise ApiError(400, f"file {file_id!r} has no content yet: PUT it first") from None
        return json_response(stored.to_together())

    return [
        Route("/v1/files", request_upload, methods=["POST"]),
        Route("/_upload/{file_id}", receive_bytes, methods=["PUT"]),
        Route("/v1/files/{file_id}/preprocess", preprocess, methods=["POST"]),
    ]


async def _read_form(request: Request) -> FormData:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in _FORM_TYPES:
        raise ApiError(
            400,
            "POST /v1/files takes form fields (multipart/form-data or "
            "application/x-www-form-urlencoded): purpose, file_name, file_type, checksum",
        )
    try:
        # No file parts: the bytes come with the PUT, and a file part would be spooled to disk.
        return await request.form(max_files=0, max_fields=16, max_part_size=64 * 1024)
    except HTTPException as exc:
        raise ApiError(400, f"malformed form body: {exc.detail}") from None


def _field(fields: FormData, name: str, default: str | None = None) -> str:
    value = fields.get(name)
    if value is None:
        if default is None:
            raise ApiError(400, f"missing form field {name!r}")
        return default
    if not isinstance(value, str):
        raise ApiError(400, f"form field {name!r} must be text, not a file")
    return value


async def _stream_to(writer: FileWriter, request: Request) -> str:
    """Copy the request body into ``writer`` in bounded memory; returns its SHA-256 hex."""
    digest = hashlib.sha256()
    buffer = bytearray()
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > MAX_UPLOAD_BYTES:
            raise ApiError(413, f"upload exceeds {MAX_UPLOAD_BYTES} bytes")
        digest.update(chunk)
        buffer += chunk
        if len(buffer) >= _WRITE_BUFFER:
            await run_in_threadpool(writer.write, bytes(buffer))
            buffer.clear()
    if buffer:
        await run_in_threadpool(writer.write, bytes(buffer))
    return digest.hexdigest()
