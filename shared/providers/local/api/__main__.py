"""``python -m shared.providers.local.api``: serve the local Together-compatible Batch API."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from shared.providers.local.api.server import serve
from shared.providers.local.faults import Faults

API_KEY_ENV = "BATCHBRIDGE_LOCAL_API_KEY"


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and serve."""
    parser = argparse.ArgumentParser(
        prog="python -m shared.providers.local.api",
        description=(
            "Serve a Together-compatible Batch API. The API key, if any, is read from "
            f"{API_KEY_ENV}; faults from BATCHBRIDGE_LOCAL_FAIL_RATE, _LINE_ERROR_RATE, "
            "_EXPIRE_AFTER, _LINE_DELAY, _LOST_ANSWER_RATE, _ANSWER_DELAY, _NOT_FOUND_WINDOW "
            "and _FAULT_SEED."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8787)
    parser.add_argument("--root", type=Path, default=Path("local_api_data"))
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--engine", default="echo")
    parser.add_argument("--public-url", default=None)
    args = parser.parse_args(argv)
    try:
        faults = Faults.from_env()
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    serve(
        args.host,
        args.port,
        args.root,
        # The key comes from the environment so it never shows in `ps` or shell history.
        api_key=os.environ.get(API_KEY_ENV) or None,
        faults=faults,
        concurrency=args.concurrency,
        engine=args.engine,
        public_url=args.public_url,
    )


if __name__ == "__main__":
    main()
