"""The Together-compatible Batch API as a Starlette app over a LocalStore."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from shared.providers.local.api.batches import batch_routes
from shared.providers.local.api.errors import (
    ApiError,
    handle_api_error,
    handle_http_exception,
    handle_unexpected,
    json_response,
)
from shared.providers.local.api.files import file_routes
from shared.providers.local.api.guard import GuardMiddleware
from shared.providers.local.api.jobs import JobExecutor
from shared.providers.local.api.uploads import upload_routes
from shared.providers.local.engines import get_engine
from shared.providers.local.faults import CallFaults, Faults
from shared.providers.local.store import LocalStore

log = logging.getLogger(__name__)

# Reservations whose bytes never arrived are forgotten after this long.
STALE_UPLOAD_SECONDS = 24 * 3600


def create_app(
    root: Path,
    *,
    api_key: str | None = None,
    faults: Faults = Faults(),  # noqa: B008 - frozen, so sharing the default is safe
    concurrency: int = 2,
    engine: str = "echo",
    public_url: str | None = None,
) -> Starlette:
    """Build the API over the store at ``root``; jobs run in the background on startup.

    ``api_key`` switches bearer auth on for ``/v1/...``. ``faults`` injects failures.
    ``concurrency`` is how many jobs run at once, ``engine`` answers the requests, and
    ``public_url`` (e.g. ``http://host:8080``) is the base of upload URLs when clients reach
    the server under another address than the one in their Host header.
    """
    store = LocalStore(root)
    # One for the whole app: its clock starts the not_found_window, its seeded draws are shared.
    call_faults = CallFaults(faults)
    executor = JobExecutor(store, get_engine(engine), faults=faults, concurrency=concurrency)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await run_in_threadpool(store.prune_uploads, STALE_UPLOAD_SECONDS)
        resumed = await run_in_threadpool(executor.resume)
        if resumed:
            log.info("resumed %d unfinished batch job(s) from %s", resumed, root)
        try:
            yield
        finally:
            await run_in_threadpool(executor.close)

    def healthz(request: Request) -> Response:
        return json_response({"status": "ok"})

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        *upload_routes(store, public_url=public_url),
        *file_routes(store),
        *batch_routes(store, executor, call_faults),
    ]
    guard = Middleware(GuardMiddleware, api_key=api_key, call_faults=call_faults)
    return Starlette(
        routes=routes,
        middleware=[guard],
        exception_handlers={
            ApiError: handle_api_error,
            HTTPException: handle_http_exception,
            Exception: handle_unexpected,
        },
        lifespan=lifespan,
    )
