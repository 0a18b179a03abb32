"""File endpoints other than upload: list, retrieve, delete and content."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import BinaryIO

from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from shared.providers.local.api.errors import ApiError, json_response
from shared.providers.local.records import StoredFile
from shared.providers.local.store import LocalStore, NotFound

_CHUNK = 1 << 20


def file_routes(store: LocalStore) -> list[Route]:
    """The routes reading and deleting files in ``store``."""

    def get_file(file_id: str) -> StoredFile:
        try:
            return store.get_file(file_id)
        except NotFound:
            raise ApiError(404, f"file {file_id!r} not found") from None

    def list_files(request: Request) -> Response:
        """GET /v1/files: every file, as ``{"data": [FileResponse, ...]}``."""
        return json_response({"data": [f.to_together() for f in store.list_files()]})

    def retrieve_file(request: Request) -> Response:
        """GET /v1/files/{id}: one FileResponse."""
        return json_response(get_file(request.path_params["file_id"]).to_together())

    def delete_file(request: Request) -> Response:
        """DELETE /v1/files/{id}: ``{"id": ..., "deleted": true}``."""
        file_id = request.path_params["file_id"]
        try:
            store.delete_file(file_id)
        except NotFound:
            raise ApiError(404, f"file {file_id!r} not found") from None
        return json_response({"id": file_id, "deleted": True})

    async def file_content(request: Request) -> Response:
        """GET /v1/files/{id}/content: the raw bytes, streamed from disk."""
        file_id = request.path_params["file_id"]
        try:
            # Opened before answering: a concurrent delete then cannot break the stream.
            fh = await run_in_threadpool(_open_content, store, file_id)
        except (NotFound, FileNotFoundError):
            raise ApiError(404, f"file {file_id!r} not found") from None
        size = os.fstat(fh.fileno()).st_size
        return StreamingResponse(
            _chunks(fh),
            media_type="application/octet-stream",
            headers={"Content-Length": str(size)},
            # Closes the file even if the body was never iterated (client went away).
            background=BackgroundTask(fh.close),
        )

    # Sync handlers run in Starlette's thread pool, off the event loop (they fsync).
    return [
        Route("/v1/files", list_files, methods=["GET"]),
        Route("/v1/files/{file_id}", retrieve_file, methods=["GET"]),
        Route("/v1/files/{file_id}", delete_file, methods=["DELETE"]),
        Route("/v1/files/{file_id}/content", file_content, methods=["GET"]),
    ]


def _open_content(store: LocalStore, file_id: str) -> BinaryIO:
    # Closed by the response (see file_content), not here.
    return open(store.file_path(file_id), "rb")


def _chunks(fh: BinaryIO) -> Iterator[bytes]:
    with fh:
        while chunk := fh.read(_CHUNK):
            yield chunk
