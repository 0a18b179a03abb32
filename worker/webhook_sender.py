"""The webhook sender: a bounded async pass over the outbox that POSTs due deliveries.

One Celery task runs one pass (``deliver_due``); inside it up to ``webhook_concurrency``
deliveries are in flight at once, at most ``webhook_endpoint_concurrency`` per endpoint (the
claim script counts those across every process), so a slow or silent endpoint occupies only
its own slots and never holds up the others.

Every attempt is written to SQL (``WebhookAttempt``, and the ``WebhookDelivery`` it belongs
to) *before* Redis is told how it went, so a crash in between repeats the attempt with the
same ``webhook-id`` rather than losing it: delivery is at least once, and receivers dedupe
on ``webhook-id``.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import httpx
from sqlmodel import select

from shared.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from shared.redis_layout import text
from worker.context import WorkerContext
from worker.webhook_signing import event_body, event_type_name, secrets_for, webhook_headers
from worker.webhook_transport import WebhookAddressRefused, guarded_client

log = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 64 * 1024
MAX_RETRY_AFTER_SECONDS = 86_400.0
# A delivery with no signing key waits this long before it is looked at again.
NO_SECRET_DELAY_SECONDS = 60.0
_RETRY_STATUSES = frozenset({408, 429})
Verdict = Literal["delivered", "retry", "dead"]


@dataclass
class Delivery:
    """One claimed outbox entry."""

    request_id: str
    url: str
    outcome: str
    result: bytes
    at_ms: int
    attempts: int

    @property
    def msg_id(self) -> str:
        """The Standard Webhooks ``webhook-id``: stable across attempts and replays."""
        return f"msg_{self.request_id}"

    @property
    def body(self) -> bytes:
        """The exact bytes signed and sent on every attempt."""
        return event_body(self.outcome, self.at_ms, self.result)


@dataclass
class AttemptResult:
    """How one HTTP attempt went."""

    verdict: Verdict
    status: int | None = None
    error: str | None = None
    latency_ms: int = 0
    retry_after: float | None = None
    sent: bool = True


@dataclass
class SendReport:
    """What one pass did."""

    settled: int = 0
    delivered: int = 0
    retried: int = 0
    dead: int = 0
    unsigned: int = 0
    capped: int = 0  # due, but left waiting: their endpoint had its cap of sends in flight
    statuses: dict[int, int] = field(default_factory=dict)


async def deliver_due(
    ctx: WorkerContext, *, budget_seconds: float, client: httpx.AsyncClient | None = None
) -> SendReport:
    """Send due deliveries until none are due or ``budget_seconds`` have passed."""
    if not anything_due(ctx):
        # Most passes find nothing: building a client costs a TLS context (16 ms of CPU).
        return SendReport()
    own_client = client is None
    http = client or guarded_client(ctx.settings)
    sender = _Sender(ctx, http)
    try:
        await sender.run(budget_seconds)
    finally:
        if own_client:
            await http.aclose()
    return sender.report


def anything_due(ctx: WorkerContext) -> bool:
    """Whether the outbox holds a delivery due now (on Redis' clock, as due times are)."""
    pipe = ctx.redis.pipeline(transaction=False)
    pipe.zrange(ctx.keys.webhook_queue, 0, 0, withscores=True)
    pipe.time()
    first, (seconds, micros) = pipe.execute()
    return bool(first) and float(first[0][1]) <= seconds * 1000 + micros // 1000


class _Sender:
    def __init__(self, ctx: WorkerContext, client: httpx.AsyncClient) -> None:
        self.ctx = ctx
        self.client = client
        self.report = SendReport()
        self.token = f"{os.getpid()}-{os.urandom(6).hex()}"
        self.sql_lock = asyncio.Lock()
        self.disabled: dict[str, str] = {}
        self.warned_unsigned = False

    async def run(self, budget_seconds: float) -> None:
        settings = self.ctx.settings
        deadline = time.monotonic() + budget_seconds
        self.disabled = await asyncio.to_thread(self._disabled_endpoints)
        flights: set[asyncio.Task[None]] = set()
        while True:
            claimed = 0
            free = settings.webhook_concurrency - len(flights)
            if free > 0 and time.monotonic() < deadline:
                for delivery in self._claim(free):
                    flights.add(asyncio.create_task(self._handle(delivery)))
                    claimed += 1
            if not flights:
                return  # nothing due (or only deliveries whose endpoint is at its cap)
            if time.monotonic() >= deadline:
                await asyncio.gather(*flights)
                return
            # Wake when a slot frees up, or soon anyway to claim what has fallen due since.
            _, flights = await asyncio.wait(
                flights, timeout=0.1 if claimed else 0.5, return_when=asyncio.FIRST_COMPLETED
            )

    def _claim(self, limit: int) -> list[Delivery]:
        settings = self.ctx.settings
        # In flight for longer than any attempt can take, so only a dead sender's claims lapse.
        in_flight_ms = int((settings.webhook_timeout_seconds + 60) * 1000)
        reply: list[Any] = self.ctx.scripts.run(
            "claim_webhooks",
            [self.ctx.keys.webhook_queue],
            [
                self.ctx.keys.base,
                in_flight_ms,
                limit,
                settings.webhook_endpoint_concurrency,
                max(100, limit * 4),
                self.token,
            ],
        )
        self.report.capped = max(self.report.capped, int(reply[1]))
        out: list[Delivery] = []
        for i in range(2, len(reply), 6):
            rid, url, outcome, result, at, attempts = reply[i : i + 6]
            out.append(
                Delivery(
                    request_id=text(rid),
                    url=text(url),
                    outcome=text(outcome),
                    result=result if isinstance(result, bytes) else str(result).encode(),
                    at_ms=int(text(at) or 0),
                    attempts=int(text(attempts) or 0),
                )
            )
        return out

    async def _handle(self, delivery: Delivery) -> None:
        try:
            await self._handle_one(delivery)
        except Exception:
            # Left claimed: its in-flight time lapses and it is claimed again, same id.
            log.exception("webhook %s: sending failed unexpectedly", delivery.msg_id)

    async def _handle_one(self, delivery: Delivery) -> None:
        settings = self.ctx.settings
        if delivery.outcome not in ("completed", "failed", "cancelled"):
            log.error("webhook %s: unknown event type %r", delivery.msg_id, delivery.outcome)
            result = AttemptResult("dead", error=f"unknown event type {delivery.outcome!r}")
            result.sent = False
            await self._settle(delivery, result)
            return
        if delivery.url in self.disabled:
            reason = f"endpoint disabled: {self.disabled[delivery.url]}"
            await self._settle(delivery, AttemptResult("dead", error=reason, sent=False))
            return
        keys = secrets_for(delivery.url, settings)
        if not keys:
            self.report.unsigned += 1
            if not self.warned_unsigned:
                self.warned_unsigned = True
                log.error(
                    "webhooks are waiting unsent: no signing secret applies to %s; set "
                    "BATCHBRIDGE_WEBHOOK_SECRET (or BATCHBRIDGE_WEBHOOK_ENDPOINT_SECRETS)",
                    delivery.url,
                )
            self._put_back(delivery, NO_SECRET_DELAY_SECONDS)
            return
        outcome = await self._attempt(delivery, keys)
        if outcome.verdict == "delivered":
            self.ctx.crash_point("after_webhook_send")
        await self._settle(delivery, outcome)

    async def _attempt(self, delivery: Delivery, keys: list[bytes]) -> AttemptResult:
        timeout = self.ctx.settings.webhook_timeout_seconds
        headers = webhook_headers(delivery.msg_id, delivery.body, keys, time.time())
        started = time.monotonic()
        try:
            status, retry_after, location = await asyncio.wait_for(
                self._post(delivery.url, delivery.body, headers), timeout
            )
        except WebhookAddressRefused as exc:
            # Refused before any connection: no attempt was sent, so none is counted.
            return AttemptResult("dead", error=str(exc), sent=False)
        except TimeoutError:
            error = f"no answer within {timeout:g} s"
            return AttemptResult("retry", error=error, latency_ms=_ms_since(started))
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            return AttemptResult("retry", error=error, latency_ms=_ms_since(started))
        latency = _ms_since(started)
        if 200 <= status < 300:
            return AttemptResult("delivered", status=status, latency_ms=latency)
        if status == 410:
            return AttemptResult("dead", status=status, error="410 Gone", latency_ms=latency)
        if 300 <= status < 400:
            error = f"redirect to {location or '(no Location)'} not followed"
            return AttemptResult("dead", status=status, error=error, latency_ms=latency)
        verdict: Verdict = "retry" if status in _RETRY_STATUSES or status >= 500 else "dead"
        return AttemptResult(
            verdict,
            status=status,
            error=f"HTTP {status}",
            latency_ms=latency,
            retry_after=retry_after,
        )

    async def _post(
        self, url: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, float | None, str | None]:
        async with self.client.stream("POST", url, content=body, headers=headers) as response:
            read = 0
            async for chunk in response.aiter_raw():
                read += len(chunk)
                if read >= MAX_RESPONSE_BYTES:
                    break  # the answer is not used; a huge one must not tie up the sender
            return (
                response.status_code,
                parse_retry_after(response.headers.get("retry-after")),
                response.headers.get("location"),
            )

    async def _settle(self, delivery: Delivery, result: AttemptResult) -> None:
        schedule = self.ctx.settings.webhook_retry_schedule
        attempts = delivery.attempts + (1 if result.sent else 0)
        delay = 0.0
        if result.verdict == "retry":
            if attempts >= len(schedule):
                result.verdict = "dead"
                result.error = f"{result.error}; gave up after {attempts} attempts"
            else:
                delay = schedule[attempts]
                if result.retry_after is not None:
                    delay = max(delay, min(result.retry_after, MAX_RETRY_AFTER_SECONDS))
        async with self.sql_lock:
            await asyncio.to_thread(self._record, delivery, result, attempts, delay)
        if result.verdict == "dead" and result.status == 410:
            self.disabled[delivery.url] = "410 Gone"
        self._settle_redis(
            delivery, "retry" if result.verdict == "retry" else "done", attempts, delay
        )
        # After the record, as each counter is: a crash before this repeats the attempt anyway.
        counted = "retrying" if result.verdict == "retry" else result.verdict
        self.ctx.counters.webhook_attempt(counted, result.status, sent=result.sent)
        self.report.settled += 1
        if result.status is not None:
            self.report.statuses[result.status] = self.report.statuses.get(result.status, 0) + 1
        if result.verdict == "delivered":
            self.report.delivered += 1
        elif result.verdict == "retry":
            self.report.retried += 1
            log.info(
                "webhook %s: attempt %d failed (%s); retry in %gs",
                delivery.msg_id,
                attempts,
                result.error,
                delay,
            )
        else:
            self.report.dead += 1
            log.warning(
                "webhook %s to %s dead-lettered: %s", delivery.msg_id, delivery.url, result.error
            )

    def _put_back(self, delivery: Delivery, delay: float) -> None:
        self._settle_redis(delivery, "retry", delivery.attempts, delay)

    def _settle_redis(self, delivery: Delivery, how: str, attempts: int, delay: float) -> None:
        keys = self.ctx.keys
        self.ctx.scripts.run(
            "settle_webhook",
            [keys.webhook_queue, keys.webhook(delivery.request_id)],
            [keys.base, delivery.request_id, self.token, how, attempts, int(delay * 1000)],
        )

    def _disabled_endpoints(self) -> dict[str, str]:
        with self.ctx.session() as session:
            rows = session.exec(select(WebhookEndpoint)).all()
        return {row.url: row.reason or "410 Gone" for row in rows}

    def _record(
        self, delivery: Delivery, result: AttemptResult, attempts: int, delay: float
    ) -> None:
        now = self.ctx.now()
        with self.ctx.session() as session:
            row = session.get(WebhookDelivery, delivery.msg_id)
            if row is None:
                row = WebhookDelivery(
                    id=delivery.msg_id,
                    request_id=delivery.request_id,
                    url=delivery.url,
                    event_type=event_type_name(delivery.outcome),
                    body=delivery.body.decode(),
                    state="pending",
                )
            row.attempts = attempts
            if result.sent:
                row.last_status = result.status
                row.last_error = result.error
                session.add(
                    WebhookAttempt(
                        delivery_id=delivery.msg_id,
                        attempt=attempts,
                        at=now,
                        status_code=result.status,
                        latency_ms=result.latency_ms,
                        error=result.error,
                    )
                )
            elif result.error:
                row.last_error = result.error
            if result.verdict == "retry":
                row.state = "pending"
                row.next_attempt_at = now + timedelta(seconds=delay)
            else:
                row.state = result.verdict
                row.next_attempt_at = None
                row.finished_at = now
            session.add(row)
            gone = result.verdict == "dead" and result.status == 410
            if gone and session.get(WebhookEndpoint, delivery.url) is None:
                session.add(WebhookEndpoint(url=delivery.url, reason="410 Gone"))
            session.commit()


def parse_retry_after(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
