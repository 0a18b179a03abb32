"""What the worker's plain functions operate on: settings, Redis, the database, providers."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from redis import Redis
from sqlalchemy import Engine
from sqlmodel import Session

from shared.allocator import keep_freed_heap
from shared.clock import RecordClock
from shared.counters import Counters, instrument_provider
from shared.crash_points import CrashPlan
from shared.db import make_engine
from shared.embedded_redis import resolve_redis_url
from shared.providers.base import BatchProvider
from shared.providers.registry import build_provider
from shared.redis_layout import Keys, Scripts
from shared.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    """Per-process resources; build one per process (connections do not survive fork)."""

    settings: Settings
    redis: Redis
    engine: Engine
    dispatch_local: Callable[[str], None] | None = None
    keys: Keys = field(init=False)
    scripts: Scripts = field(init=False)
    counters: Counters = field(init=False)
    clock: RecordClock = field(init=False)
    _providers: dict[str, BatchProvider] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self) -> None:
        self.keys = Keys(self.settings.key_prefix)
        self.scripts = Scripts(self.redis)
        self.counters = Counters(self.redis, self.keys)
        self.clock = RecordClock(self.engine)

    @classmethod
    def create(
        cls, settings: Settings, *, dispatch_local: Callable[[str], None] | None = None
    ) -> WorkerContext:
        """Connect to Redis and the database named by ``settings``."""
        keep_freed_heap(settings.malloc_top_pad_bytes)
        # Timeouts, so a half-open connection cannot hang a task (or a lease's renewer).
        redis = Redis.from_url(
            resolve_redis_url(settings),
            socket_timeout=30,
            socket_connect_timeout=10,
            health_check_interval=30,
        )
        return cls(settings, redis, make_engine(settings), dispatch_local)

    def provider(self, name: str) -> BatchProvider:
        """The provider called ``name``, built once per process, its failures counted."""
        with self._lock:
            if name not in self._providers:
                provider = build_provider(name, self.settings, dispatch=self.dispatch_local)
                self._providers[name] = instrument_provider(provider, self.counters)
            return self._providers[name]

    def now(self) -> datetime:
        """Now on the record's clock (the database server's), for every deadline it stores."""
        return self.clock.now()

    def crash_point(self, step: str) -> None:
        """Die here if the test-only crash plan (``BATCHBRIDGE_CRASH_AT``) names ``step``."""
        if step in self.settings.crash_at:
            CrashPlan(self.settings.crash_at, self.settings.crash_dir).reached(step)

    def session(self) -> Session:
        """A new database session."""
        return Session(self.engine, expire_on_commit=False)

    @property
    def batch_dir(self) -> Path:
        """Where packed input files are written."""
        return self.settings.data_dir / "batches"

    @property
    def results_dir(self) -> Path:
        """Where downloaded output and error files are kept while being fanned out."""
        return self.settings.data_dir / "results"

    @contextlib.contextmanager
    def lease(self, name: str, seconds: float | None = None) -> Iterator[bool]:
        """A best-effort single-flight lease: yields False if someone else holds it.

        While held it is renewed in the background, so it can be short: a worker that dies
        (even by SIGKILL) stops renewing and its work is free again within ``seconds``.
        """
        key = self.keys.lock(name)
        token = f"{os.getpid()}-{threading.get_ident()}-{os.urandom(4).hex()}".encode()
        ttl_ms = int((seconds or self.settings.lease_seconds) * 1000)
        acquired = bool(self.redis.set(key, token, nx=True, px=ttl_ms))
        if not acquired:
            yield False
            return
        done = threading.Event()
        renewer = threading.Thread(
            target=self._renew, args=(key, token, ttl_ms, done), daemon=True, name=f"lease {name}"
        )
        renewer.start()
        try:
            yield True
        finally:
            done.set()
            renewer.join(timeout=5)
            try:
                self.scripts.run("release_lease", [key], [token])
            except Exception:  # it expires by itself; never let cleanup fail the work
                log.warning("could not release lease %s", key, exc_info=True)

    def _renew(self, key: str, token: bytes, ttl_ms: int, done: threading.Event) -> None:
        while not done.wait(ttl_ms / 3000):
            try:
                if not self.scripts.run("renew_lease", [key], [token, ttl_ms]):
                    log.warning("lease %s was lost while held", key)
                    return
            except Exception:  # Redis blips: try again at the next interval
                log.warning("could not renew lease %s", key, exc_info=True)

    def close(self) -> None:
        """Release connections."""
        self.redis.close()
        self.engine.dispose()
