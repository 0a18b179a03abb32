"""Run the local Batch API under uvicorn."""

from __future__ import annotations

import logging
from pathlib import Path

import uvicorn

from shared.providers.local.api.app import create_app
from shared.providers.local.faults import Faults

log = logging.getLogger(__name__)


def serve(
    host: str,
    port: int,
    root: Path,
    *,
    api_key: str | None = None,
    faults: Faults = Faults(),  # noqa: B008 - frozen, so sharing the default is safe
    concurrency: int = 2,
    engine: str = "echo",
    public_url: str | None = None,
) -> None:
    """Serve the API until interrupted (Ctrl-C or SIGTERM stop it gracefully)."""
    app = create_app(
        root,
        api_key=api_key,
        faults=faults,
        concurrency=concurrency,
        engine=engine,
        public_url=public_url,
    )
    shown_host = f"[{host}]" if ":" in host else host
    log.warning(
        "Together-compatible Batch API on http://%s:%d (store %s, auth %s); point the SDK at "
        "base_url=http://%s:%d without /v1",
        shown_host,
        port,
        root,
        "on" if api_key else "off",
        shown_host,
        port,
    )
    if faults.enabled:
        log.warning("fault injection is on: %s", faults)
    uvicorn.run(app, host=host, port=port, log_level="info")
