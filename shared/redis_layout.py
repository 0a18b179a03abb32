"""Where batchbridge keeps things in Redis, and the Lua scripts that change them atomically.

Every key starts with the configured prefix (default ``bb``):

``{p}:req:{id}``            hash    request: state, buf, enq (ms), seq, size, cbq, meta, batch ...
``{p}:bodies:{buf}``        hash    request id -> body JSON, until the request has an outcome
``{p}:idem:{key}``          string  idempotency key -> "{request id}/{request digest}" (expires)
``{p}:pending:{buf}``       zset    the pending buffer of one (provider, model), by enqueue seq
``{p}:seq``                 string  enqueue sequence counter (keeps buffers first-in first-out)
``{p}:buffers``             hash    buf -> bytes waiting (lines + metadata); fields list buffers
``{p}:claim:{batch}``       hash    an uncommitted claim: buf, count, bytes, at
``{p}:claim:{batch}:ids``   list    the request ids of that claim, in file order
``{p}:claims``              zset    batch ids of uncommitted claims, by claim time
``{p}:cb:{queue}``          stream  a callback queue (consumer group ``consumers``)
``{p}:cbdead:{queue}``      stream  results of that queue delivered too often without an ack:
                                    id, request_id, deliveries, reason, result
``{p}:lock:{name}``         string  short leases that keep periodic work single-flight
``{p}:wake:{buf}``          string  debounces aggregator wake-ups sent by producers
``{p}:epoch``               string  random id of this Redis dataset; SQL remembers it, so a
                                    wiped or replaced Redis is noticed (worker/redis_checks.py)

A request's state in Redis moves ``pending -> batched -> done``; ``batched -> pending`` when a
claim is abandoned or a retryable failure sends it round again; ``pending -> done`` on cancel.
``buf`` is ``"{provider}:{model}"``; provider names never contain a colon. A request that
names no provider waits in ``"default:{model}"``; the packer sends it to the worker's
default provider.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis import Redis
from redis.commands.core import Script

CALLBACK_GROUP = "consumers"
_SCRIPT_NAMES = (
    "enqueue",
    "claim",
    "unclaim",
    "requeue",
    "finish",
    "release_lease",
    "renew_lease",
    "reclaim_callback",
    "restore_done",
    "reclaim_batch",
)


def buffer_name(provider: str, model: str) -> str:
    """The name of the pending buffer for one (provider, model)."""
    return f"{provider}:{model}"


def split_buffer_name(buf: str) -> tuple[str, str]:
    """Inverse of :func:`buffer_name`."""
    provider, _, model = buf.partition(":")
    return provider, model


@dataclass(frozen=True, slots=True)
class Keys:
    """Builds the key names for one prefix."""

    prefix: str = "bb"

    @property
    def base(self) -> str:
        """The prefix with its trailing colon, as the Lua scripts expect it."""
        return f"{self.prefix}:"

    def request(self, request_id: str) -> str:
        """Hash holding one request."""
        return f"{self.prefix}:req:{request_id}"

    def bodies(self, buf: str) -> str:
        """Hash of request id -> body JSON for one buffer."""
        return f"{self.prefix}:bodies:{buf}"

    def idempotency(self, key: str) -> str:
        """String mapping an idempotency key to its request id."""
        return f"{self.prefix}:idem:{key}"

    def pending(self, buf: str) -> str:
        """Sorted set of request ids waiting in one buffer."""
        return f"{self.prefix}:pending:{buf}"

    @property
    def buffers(self) -> str:
        """Hash of buffer name -> pending bytes."""
        return f"{self.prefix}:buffers"

    def claim(self, batch_id: str) -> str:
        """Hash describing an uncommitted claim."""
        return f"{self.prefix}:claim:{batch_id}"

    def claim_ids(self, batch_id: str) -> str:
        """List of the request ids in an uncommitted claim."""
        return f"{self.prefix}:claim:{batch_id}:ids"

    @property
    def claims(self) -> str:
        """Sorted set of uncommitted claims by claim time."""
        return f"{self.prefix}:claims"

    def callback(self, queue: str) -> str:
        """Stream backing one callback queue."""
        return f"{self.prefix}:cb:{queue}"

    def callback_dead(self, queue: str) -> str:
        """Dead-letter stream of one callback queue."""
        return f"{self.prefix}:cbdead:{queue}"

    def lock(self, name: str) -> str:
        """A short lease."""
        return f"{self.prefix}:lock:{name}"

    def wake(self, buf: str) -> str:
        """Debounce marker for aggregator wake-ups of one buffer."""
        return f"{self.prefix}:wake:{buf}"

    @property
    def epoch(self) -> str:
        """The random id naming this Redis dataset."""
        return f"{self.prefix}:epoch"


def script_source(name: str) -> str:
    """The text of one Lua script from ``shared/redis_scripts``."""
    return (resources.files("shared") / "redis_scripts" / f"{name}.lua").read_text("utf-8")


class Scripts:
    """The Lua scripts, read from their ``.lua`` files once and registered on a client."""

    def __init__(self, client: Redis) -> None:
        self._scripts: dict[str, Script] = {
            name: client.register_script(script_source(name)) for name in _SCRIPT_NAMES
        }

    def sha(self, name: str) -> str:
        """The SHA1 of a script, for sending EVALSHA by hand."""
        return str(self._scripts[name].sha)

    def load(self, name: str) -> None:
        """Load a script into Redis (after a restart or SCRIPT FLUSH forgot it)."""
        script = self._scripts[name]
        script.registered_client.script_load(script.script)

    def run(self, name: str, keys: list[str], args: list[Any], client: Any | None = None) -> Any:
        """Run one script (EVALSHA, loading it on first use) on ``client`` or a pipeline."""
        return self._scripts[name](keys=keys, args=args, client=client)


def text(value: Any) -> str:
    """A Redis reply value as str (replies are bytes; typed stubs also allow str)."""
    return value.decode() if isinstance(value, bytes) else str(value)
