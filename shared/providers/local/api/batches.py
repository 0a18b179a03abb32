"""Batch endpoints: create (201 + wrapper), list (bare array), retrieve and cancel."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from shared.providers.local.api.errors import ApiError, json_response
from shared.providers.local.api.jobs import JobExecutor
from shared.providers.local.faults import CallFaults, Faults
from shared.providers.local.records import BatchJob
from shared.providers.local.store import LocalStore, NotFound

MAX_JSON_BODY_BYTES = 64 * 1024
# A cancel waits this long for the runner to stop, so callers usually see CANCELLED at once.
CANCEL_WAIT_SECONDS = 2.0
_CANCEL_POLL_SECONDS = 0.05


def batch_routes(
    store: LocalStore,
    executor: JobExecutor,
    call_faults: CallFaults | None = None,
) -> list[Route]:
    """The batch routes over ``store``; created jobs run on ``executor``.

    ``call_faults`` may lose a create's answer (``lost_answer_rate``) and hide jobs from
    retrieve (``not_found_window``).
    """
    faults = call_faults or CallFaults(Faults())

    def get_job(job_id: str) -> BatchJob:
        try:
            return store.get_job(job_id)
        except NotFound:
            raise ApiError(404, f"batch job {job_id!r} not found") from None

    async def create_batch(request: Request) -> Response:
        """POST /v1/batches: a VALIDATING job, answered 201 ``{"job": ..., "warning": null}``.

        Only a malformed body or an unknown ``input_file_id`` is refused here (400). Everything
        else, including an ``endpoint`` other than /v1/chat/completions (which this emulator
        cannot run), is checked in the background as the real service does while VALIDATING:
        the job is created and then turns FAILED with an ``error`` saying why.
        """
        body = await _json_object(request)
        endpoint = _required_str(body, "endpoint")
        input_file_id = _required_str(body, "input_file_id")
        # Accepted for compatibility; the local window is always 24 h and there is one queue.
        _optional_str(body, "completion_window")
        _optional(body, "priority", int)
        model_id = _optional_str(body, "model_id")
        try:
            job = await run_in_threadpool(
                store.create_job, input_file_id, endpoint, model_id=model_id or None
            )
        except NotFound:
            raise ApiError(400, f"input file {input_file_id!r} not found") from None
        executor.submit(job.id)
        lost = faults.draw_lost_answer()
        if lost is not None:
            # After the job was created and queued: the effect stands, only the answer is lost.
            raise ApiError(lost.status_code, lost.message)
        return json_response({"job": job.to_together(), "warning": None}, status_code=201)

    def list_batches(request: Request) -> Response:
        """GET /v1/batches: every job, oldest first, as a bare JSON array."""
        return json_response([job.to_together() for job in store.list_jobs()])

    def retrieve_batch(request: Request) -> Response:
        """GET /v1/batches/{id}: the bare BatchJob."""
        job_id = request.path_params["batch_id"]
        if faults.hides_batches():
            # Only retrieve: list and file calls keep working, so a caller can tell that the
            # job still exists (and keeps running) behind the 404.
            raise ApiError(404, f"batch job {job_id!r} not found (injected by not_found_window)")
        return json_response(get_job(job_id).to_together())

    async def cancel_batch(request: Request) -> Response:
        """POST /v1/batches/{id}/cancel: the bare BatchJob; 400 if it already finished."""
        job_id = request.path_params["batch_id"]
        job = await run_in_threadpool(get_job, job_id)
        if job.is_terminal:
            raise ApiError(400, f"batch job {job_id!r} is already {job.status.value}")
        job = await run_in_threadpool(store.request_cancel, job_id)
        deadline = time.monotonic() + CANCEL_WAIT_SECONDS
        # A running job stops at its runner's next checkpoint; waiting a little spares most
        # callers a poll for a CANCELLING state Together's v3 API does not have.
        while not job.is_terminal and time.monotonic() < deadline:
            await asyncio.sleep(_CANCEL_POLL_SECONDS)
            job = await run_in_threadpool(get_job, job_id)
        return json_response(job.to_together())

    return [
        Route("/v1/batches", create_batch, methods=["POST"]),
        Route("/v1/batches", list_batches, methods=["GET"]),
        Route("/v1/batches/{batch_id}", retrieve_batch, methods=["GET"]),
        Route("/v1/batches/{batch_id}/cancel", cancel_batch, methods=["POST"]),
    ]


async def _json_object(request: Request) -> dict[str, Any]:
    raw = bytearray()
    try:
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_JSON_BODY_BYTES:
                raise ApiError(413, f"request body exceeds {MAX_JSON_BODY_BYTES} bytes")
    except ClientDisconnect:
        raise ApiError(400, "the client went away before sending the whole body") from None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def _required_str(body: dict[str, Any], name: str) -> str:
    value = _optional(body, name, str)
    if not value:
        raise ApiError(400, f"missing required field {name!r}")
    assert isinstance(value, str)
    return value


def _optional_str(body: dict[str, Any], name: str) -> str | None:
    value = _optional(body, name, str)
    assert value is None or isinstance(value, str)
    return value


def _optional(body: dict[str, Any], name: str, kind: type[str] | type[int]) -> object:
    value: object = body.get(name)
    # bool is an int subclass, but "priority": true is a type error all the same.
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise ApiError(400, f"field {name!r} must be of type {kind.__name__}")
    return value
