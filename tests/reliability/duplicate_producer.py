"""One of several producers submitting the same idempotency keys at once (run as a process).

``python -m tests.reliability.duplicate_producer sync|async KEYS OUT`` submits requests
``key-0`` .. ``key-{KEYS-1}`` in a shuffled order, in chunks, with settings from the
environment, and writes ``{key: request id}`` to OUT as JSON.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
from pathlib import Path
from typing import Any

import orjson

from producer import AsyncProducer, Producer
from shared.settings import Settings

CHUNK = 200


def bodies(keys: list[str]) -> list[dict[str, Any]]:
    """The requests for ``keys``: the same body for the same key, whoever sends it."""
    return [
        {
            "model": "m-x",
            "messages": [{"role": "user", "content": f"request for {key}"}],
            "callback_queue": "svc",
            "idempotency_key": key,
        }
        for key in keys
    ]


def chunks(count: int) -> list[list[str]]:
    """The keys in an order of this process's own, chunked."""
    keys = [f"key-{i}" for i in range(count)]
    random.Random(os.getpid()).shuffle(keys)
    return [keys[i : i + CHUNK] for i in range(0, count, CHUNK)]


def run_sync(settings: Settings, count: int) -> dict[str, str]:
    """Submit with the blocking producer, one ``submit_many`` per chunk."""
    ids: dict[str, str] = {}
    with Producer(settings=settings) as producer:
        for keys in chunks(count):
            for key, handle in zip(keys, producer.submit_many(bodies(keys)), strict=True):
                ids[key] = handle.id
    return ids


async def run_async(settings: Settings, count: int) -> dict[str, str]:
    """Submit with the asyncio producer, several chunks in flight at once."""
    ids: dict[str, str] = {}
    producer = AsyncProducer(settings=settings)
    try:

        async def one(keys: list[str]) -> None:
            for key, handle in zip(keys, await producer.submit_many(bodies(keys)), strict=True):
                ids[key] = handle.id

        await asyncio.gather(*(one(keys) for keys in chunks(count)))
    finally:
        await producer.aclose()
    return ids


def main() -> None:
    """Submit, then write the ids."""
    mode, count, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    settings = Settings.load()
    ids = run_sync(settings, count) if mode == "sync" else asyncio.run(run_async(settings, count))
    out.write_bytes(orjson.dumps(ids))


if __name__ == "__main__":
    main()
