"""Wake the aggregator when a buffer fills up, instead of waiting for its next beat."""

from __future__ import annotations

import logging
from typing import Any

from redis import Redis

from shared import task_names
from shared.redis_layout import Keys

log = logging.getLogger(__name__)
_DEBOUNCE_MS = 1000


class AggregatorWaker:
    """Sends at most one aggregate wake-up per buffer per second, over the Celery broker."""

    def __init__(self, client: Redis, keys: Keys, broker_url: str) -> None:
        self._client = client
        self._keys = keys
        self._broker_url = broker_url
        self._celery: Any = None

    def wake(self, bufs: set[str]) -> None:
        """Ask a worker to aggregate now; a lost wake-up only costs one beat of latency."""
        for buf in bufs:
            if self._app() is None:
                return
            if not self._client.set(self._keys.wake(buf), b"1", nx=True, px=_DEBOUNCE_MS):
                continue
            try:
                self._app().send_task(task_names.AGGREGATE, queue=task_names.QUEUE)
            except Exception:  # the beat catches up, so never fail a submit over this
                log.warning("could not send an aggregate wake-up", exc_info=True)

    def _app(self) -> Any:
        if self._celery is None:
            # Imported lazily: most submits never cross a threshold, and Celery is slow to import.
            try:
                from celery import Celery
            except ImportError:  # the producer-only install: the beat's next tick packs it
                log.info(
                    "no aggregate wake-ups without Celery (pip install 'batchbridge[worker]'): "
                    "a full buffer waits for the next aggregate tick"
                )
                self._celery = False
                return None
            self._celery = Celery("batchbridge-producer", broker=self._broker_url)
        return self._celery or None
