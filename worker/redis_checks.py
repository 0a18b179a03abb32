"""What the worker checks about its Redis: the eviction policy, and which dataset it is.

Redis is the buffer: a Redis that evicts keys under memory pressure drops pending requests
and undelivered results without telling anyone, so ``allkeys-*`` policies are refused and
``volatile-*`` ones (which evict finished results, idempotency keys and leases early) warned
about. The epoch, a random id kept under ``{p}:epoch`` and remembered in SQL, tells a worker
that its Redis was wiped or replaced since the record last looked, so the reconciler can
repair everything the record knows about instead of only recent changes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.exceptions import ResponseError
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError

from shared.models import RedisEpoch
from shared.redis_layout import text
from worker.context import WorkerContext

log = logging.getLogger(__name__)


class UnsafeRedisConfig(RuntimeError):
    """The Redis configuration would silently lose requests or results."""


def eviction_policy(client: Redis) -> str | None:
    """Redis' ``maxmemory-policy``, or None when the server will not say."""
    try:
        reply: Any = client.config_get("maxmemory-policy")
        value = reply.get("maxmemory-policy")
        if value:
            return text(value)
    except ResponseError:
        pass  # managed Redis often disables or renames CONFIG; INFO still reports the policy
    try:
        info: Any = client.info("memory")
    except ResponseError:
        return None
    policy = info.get("maxmemory_policy")
    return text(policy) if policy else None


def check_eviction_policy(client: Redis) -> str | None:
    """Refuse an ``allkeys-*`` policy, warn on ``volatile-*`` or an unknown one; the policy."""
    policy = eviction_policy(client)
    if policy is None:
        log.warning(
            "could not read Redis maxmemory-policy (CONFIG GET and INFO refused); batchbridge "
            "needs maxmemory-policy noeviction, please check it"
        )
    elif policy.startswith("allkeys-"):
        raise UnsafeRedisConfig(
            f"Redis maxmemory-policy is {policy}: under memory pressure Redis would evict "
            "pending requests and undelivered results. Set maxmemory-policy noeviction "
            "(CONFIG SET maxmemory-policy noeviction, redis.conf, or your provider's "
            "parameter group); batchbridge then refuses writes it cannot store instead"
        )
    elif policy.startswith("volatile-"):
        log.warning(
            "Redis maxmemory-policy is %s: under memory pressure Redis may evict finished "
            "results, idempotency keys and leases before they expire; noeviction is "
            "recommended",
            policy,
        )
    return policy


@dataclass(frozen=True, slots=True)
class EpochCheck:
    """What the record and Redis say about which Redis dataset this is."""

    current: str  # the epoch in Redis now
    known: str | None  # the epoch the record knew before this check (None: first sight)

    @property
    def replaced(self) -> bool:
        """Redis was wiped or replaced since the record last saw it."""
        return self.known is not None and self.known != self.current


def check_epoch(ctx: WorkerContext) -> EpochCheck:
    """Read (or start) this Redis' epoch and compare it with the record; log a loss loudly."""
    key = ctx.keys.epoch
    created = bool(ctx.redis.set(key, os.urandom(12).hex(), nx=True))
    current = text(ctx.redis.get(key))
    prefix = ctx.settings.key_prefix
    with ctx.session() as session:
        row = session.get(RedisEpoch, prefix)
        if row is None:
            try:
                session.add(RedisEpoch(key_prefix=prefix, epoch=current))
                session.commit()
                return EpochCheck(current, None)
            except IntegrityError:  # another worker recorded it first
                session.rollback()
                row = session.get(RedisEpoch, prefix)
                assert row is not None
    check = EpochCheck(current, row.epoch)
    if check.replaced:
        how = "has no epoch: it was wiped" if created else "has another epoch: it was replaced"
        log.error(
            "REDIS DATA LOST: Redis %s (record knows epoch %s, Redis now %s). Requests not yet "
            "packed are gone; the reconciler re-delivers what the record holds and fails "
            "requests whose bodies are gone with redis_data_lost",
            how,
            check.known,
            check.current,
        )
    return check


def accept_epoch(ctx: WorkerContext, check: EpochCheck) -> None:
    """Record Redis' current epoch, once the repair a replaced Redis needs has run."""
    with ctx.session() as session:
        session.execute(
            update(RedisEpoch)
            .where(RedisEpoch.key_prefix == ctx.settings.key_prefix)  # type: ignore[arg-type]
            .where(RedisEpoch.epoch == check.known)  # type: ignore[arg-type]
            .values(epoch=check.current, seen_at=ctx.now())
        )
        session.commit()
