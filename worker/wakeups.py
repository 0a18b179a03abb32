"""Producers' aggregator wake-ups, turned into aggregate tasks by every worker.

A producer that fills a buffer pushes its name onto ``{p}:wakeups`` (``producer/wakeup.py``).
Each worker's main process runs one watcher thread blocked on that list. The worker that pops
a name empties the list, since one aggregate packs every buffer that is due and the names
behind it say nothing new, and sends one aggregate task. With no worker running the newest
wake-ups wait in the list; one lost (Redis restarting, a send that fails) costs one
aggregate tick of latency, never a request.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from celery import bootsteps
from redis import Redis
from redis.exceptions import RedisError

from shared import task_names
from shared.embedded_redis import resolve_redis_url
from shared.redis_layout import Keys

log = logging.getLogger(__name__)
BLOCK_SECONDS = 1.0  # how long one BLPOP waits: also how soon a stop is noticed
RETRY_SECONDS = 1.0  # after a Redis error, before trying again


class WakeupWatcher:
    """A thread that calls ``send`` once per wake-up it pops, until stopped."""

    def __init__(self, client: Redis, keys: Keys, send: Callable[[], object]) -> None:
        self._client = client
        self._key = keys.wakeups
        self._send = send
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bb-wakeups", daemon=True)

    def start(self) -> None:
        """Start watching."""
        self._thread.start()

    def stop(self, timeout: float = BLOCK_SECONDS + 1.0) -> None:
        """Stop watching; waits at most ``timeout`` s for the BLPOP under way."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._client.close()

    def _run(self) -> None:
        failing = False
        while not self._stopping.is_set():
            try:
                if self._client.blpop([self._key], timeout=BLOCK_SECONDS) is None:
                    continue
                self._client.delete(self._key)
                self._send()
                failing = False
            except Exception:
                # Redis restarting or the broker away: the beat's ticks still aggregate, so
                # log the first failure of a run of them and keep trying.
                if not failing:
                    log.warning("aggregate wake-ups: watching failed; retrying", exc_info=True)
                failing = True
                self._stopping.wait(RETRY_SECONDS)


class WakeupStep(bootsteps.StartStopStep):  # type: ignore[misc]  # Celery ships no types
    """Runs a :class:`WakeupWatcher` in the worker's main process while the worker runs."""

    # After the pool: its processes are forked before the watcher's thread exists.
    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.watcher: WakeupWatcher | None = None

    def start(self, parent: Any) -> None:
        """Start the watcher on the worker's Redis."""
        app = parent.app
        settings = app.batchbridge_settings
        # A socket timeout beyond the BLPOP's own, so a dead connection is noticed.
        client = Redis.from_url(resolve_redis_url(settings), socket_timeout=BLOCK_SECONDS + 10.0)

        def send() -> None:
            app.send_task(task_names.AGGREGATE, queue=task_names.QUEUE)

        self.watcher = WakeupWatcher(client, Keys(settings.key_prefix), send)
        self.watcher.start()

    def stop(self, parent: Any) -> None:
        """Stop the watcher."""
        if self.watcher is not None:
            watcher, self.watcher = self.watcher, None
            try:
                watcher.stop()
            except RedisError:
                log.debug("closing the wake-up watcher's connection failed", exc_info=True)
