"""The pending buffers as the aggregator sees them, and when and why each one will flush."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis import Redis

from shared.redis_layout import Keys, pending_heads, split_buffer_name, text
from shared.settings import ENV_PREFIX, Settings
from worker.packing import FlushDecision, flush_decision

# A due buffer still waiting this many aggregate ticks later (at least this many seconds)
# means nobody is packing: the beat or the worker is not running.
_OVERDUE_TICKS = 5
_OVERDUE_FLOOR_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class BufferState:
    """One pending buffer: what ``claim.lua`` looks at when deciding to flush it."""

    buf: str
    count: int
    bytes: int
    oldest_enq_ms: int | None
    now_ms: int

    @property
    def provider(self) -> str:
        """The buffer's provider (``default`` follows the worker's setting)."""
        return split_buffer_name(self.buf)[0]

    @property
    def model(self) -> str:
        """The buffer's model."""
        return split_buffer_name(self.buf)[1]

    @property
    def oldest_age_seconds(self) -> float:
        """Seconds the oldest pending request has waited (0 for an empty buffer)."""
        if self.oldest_enq_ms is None:
            return 0.0
        return max(0.0, (self.now_ms - self.oldest_enq_ms) / 1000)

    def decision(self, settings: Settings) -> FlushDecision:
        """When and why the aggregator packs this buffer."""
        return flush_decision(settings, self.count, self.bytes, self.oldest_enq_ms, self.now_ms)


def read_buffers(client: Redis, keys: Keys, now_ms: int) -> list[BufferState]:
    """Every non-empty pending buffer, by name (two pipelined round trips after the list)."""
    sizes: dict[Any, Any] = client.hgetall(keys.buffers)
    names = sorted(text(raw) for raw in sizes)
    states = _read(client, keys, names, now_ms, {text(k): int(v) for k, v in sizes.items()})
    return [state for state in states if state.count]


def read_buffer(client: Redis, keys: Keys, buf: str, now_ms: int) -> BufferState:
    """One pending buffer (empty when it holds nothing)."""
    raw: Any = client.hget(keys.buffers, buf)
    return _read(client, keys, [buf], now_ms, {buf: int(raw or 0)})[0]


def _read(
    client: Redis, keys: Keys, names: list[str], now_ms: int, sizes: dict[str, int]
) -> list[BufferState]:
    heads = pending_heads(client, keys, names)
    return [
        BufferState(buf, count, sizes.get(buf, 0), oldest, now_ms)
        for buf, (count, oldest) in zip(names, heads, strict=True)
    ]


def flush_text(state: BufferState, settings: Settings, *, name_variables: bool = False) -> str:
    """E.g. ``in 4m 12s (age limit 300 s)`` or ``at the next aggregate tick (count 10 ≥ 10)``.

    With ``name_variables`` the thresholds are named by their environment variables.
    """
    d = state.decision(settings)
    if d.reason is None:
        limit = (
            f"{ENV_PREFIX}MAX_WAIT_SECONDS={d.max_wait_seconds:g}"
            if name_variables
            else f"{d.max_wait_seconds:g} s"
        )
        return f"in {human_seconds(d.wait_seconds)} (age limit {limit})"
    if d.reason == "count":
        why = _limit(name_variables, "MAX_BATCH_REQUESTS", f"count {state.count}", d.max_requests)
    elif d.reason == "bytes":
        why = _limit(name_variables, "MAX_BATCH_BYTES", f"bytes {state.bytes:,}", d.max_bytes)
    else:
        age = human_seconds(state.oldest_age_seconds)
        why = _limit(name_variables, "MAX_WAIT_SECONDS", f"age {age}", f"{d.max_wait_seconds:g} s")
    said = f"at the next aggregate tick ({why})"
    overdue = state.oldest_age_seconds - d.max_wait_seconds
    patience = max(_OVERDUE_FLOOR_SECONDS, _OVERDUE_TICKS * settings.aggregate_interval_seconds)
    if d.reason == "age" and overdue > patience:
        said += f"; overdue by {human_seconds(overdue)}: is a worker with its beat running?"
    return said


def _limit(name_variables: bool, variable: str, seen: str, limit: object) -> str:
    shown = f"{limit:,}" if isinstance(limit, int) else str(limit)
    return f"{seen} ≥ {ENV_PREFIX}{variable}={shown}" if name_variables else f"{seen} ≥ {shown}"


def buffer_report(state: BufferState, settings: Settings) -> dict[str, Any]:
    """One buffer as ``status --json`` shows it."""
    d = state.decision(settings)
    return {
        "provider": state.provider,
        "model": state.model,
        "count": state.count,
        "bytes": state.bytes,
        "oldest_age_seconds": round(state.oldest_age_seconds, 1),
        "flush": {
            "due": d.reason is not None,
            "reason": d.reason,
            "in_seconds": round(d.wait_seconds, 1),
            "text": flush_text(state, settings),
            "max_requests": d.max_requests,
            "max_bytes": d.max_bytes,
            "max_wait_seconds": d.max_wait_seconds,
        },
    }


def human_seconds(seconds: float) -> str:
    """A duration as ``4.2s``, ``4m 12s``, ``3h 05m`` or ``2d 4h``."""
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds + 0.5)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m {whole % 60:02d}s"
    if whole < 86_400:
        return f"{whole // 3600}h {whole % 3600 // 60:02d}m"
    return f"{whole // 86_400}d {whole % 86_400 // 3600}h"
