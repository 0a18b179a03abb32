"""The asyncio producer: the same requests, scripts and guarantees as :class:`Producer`."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Iterable, Mapping
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from producer.client import PartialSubmitError
from producer.protocol import (
    STATE_FIELDS,
    CancelOutcome,
    RequestState,
    cancel_args,
    check_taken_keys,
    conflict_or_none,
    enqueue_args,
    keyed_requests,
    plain_requests,
    read_cancel_reply,
    read_enqueue_reply,
    read_state,
    request_dict,
)
from producer.record import ResultRecord
from producer.wakeup import AsyncAggregatorWaker
from shared.allocator import keep_freed_heap
from shared.embedded_redis import resolve_redis_url
from shared.redis_layout import Keys, script_source
from shared.schemas import (
    IdempotencyConflict,
    InvalidRequest,
    PreparedRequest,
    Result,
    prepare_many,
    prepare_request,
    single_field,
)
from shared.settings import Settings

_CHUNK = 500


class AsyncProducer:
    """Submits requests from asyncio code; create it inside the event loop that uses it.

    Like :class:`Producer`, it needs only the Redis URL: the worker picks the provider of a
    request that names none.
    """

    def __init__(self, redis_url: str | None = None, *, settings: Settings | None = None) -> None:
        self.settings = settings or Settings.load()
        keep_freed_heap(self.settings.malloc_top_pad_bytes)
        self._client = Redis.from_url(redis_url or resolve_redis_url(self.settings))
        self.keys = Keys(self.settings.key_prefix)
        self._enqueue = self._client.register_script(script_source("enqueue"))
        self._cancel = self._client.register_script(script_source("cancel"))
        self._record = ResultRecord(self.settings)
        self._waker = AsyncAggregatorWaker(self._client, self.keys)

    @classmethod
    def from_env(cls) -> AsyncProducer:
        """A producer configured from ``BATCHBRIDGE_*`` environment variables."""
        return cls()

    async def submit(
        self,
        model: str,
        messages: list[dict[str, Any]],
        *,
        max_tokens: int | None = None,
        callback_queue: str | None = None,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        provider: str | None = None,
        webhook_url: str | None = None,
        **body_fields: Any,
    ) -> AsyncRequestHandle:
        """Validate one request and enqueue it in one round trip (errors as Producer.submit)."""
        options = {
            "max_tokens": max_tokens,
            "callback_queue": callback_queue,
            "metadata": metadata,
            "idempotency_key": idempotency_key,
            "provider": provider,
            "webhook_url": webhook_url,
        }
        prepare = functools.partial(
            prepare_request,
            request_dict(model, messages, options, body_fields),
            max_line_bytes=self.settings.max_line_bytes,
            max_metadata_bytes=self.settings.max_metadata_bytes,
            webhook_allow=self.settings.webhook_allow_cidrs,
        )
        # The SSRF guard resolves a webhook URL's host: off the event loop.
        prepared = await asyncio.to_thread(prepare) if webhook_url else prepare()
        try:
            return (await self._send([prepared]))[0]
        except IdempotencyConflict as exc:
            raise exc.with_field(single_field(exc.field)) from None

    async def submit_many(self, requests: Iterable[Mapping[str, Any]]) -> list[AsyncRequestHandle]:
        """Validate and encode every request first, then enqueue them all.

        Errors are those of :meth:`Producer.submit_many`: InvalidRequest before anything is
        written, PartialSubmitError when a refused chunk leaves only some requests stored.
        """
        try:
            plain = plain_requests(requests)
            prepare = functools.partial(
                prepare_many,
                plain,
                max_line_bytes=self.settings.max_line_bytes,
                max_metadata_bytes=self.settings.max_metadata_bytes,
                webhook_allow=self.settings.webhook_allow_cidrs,
            )
            with_webhook = any(r.get("webhook_url") for r in plain)
            prepared = await asyncio.to_thread(prepare) if with_webhook else prepare()
            # One chunk is checked and stored atomically by the script; several need their
            # keys checked up front so that a conflict stores nothing.
            if len(prepared) > _CHUNK and (keyed := keyed_requests(prepared)):
                taken = await self._client.mget([self.keys.idempotency(k) for k in keyed])
                check_taken_keys(keyed, taken)
        except InvalidRequest as exc:
            raise exc.with_field(f"requests{exc.field}") from None
        handles: list[AsyncRequestHandle] = []
        for start in range(0, len(prepared), _CHUNK):
            try:
                handles += await self._send(prepared[start : start + _CHUNK], start)
            except (ResponseError, IdempotencyConflict) as exc:  # earlier chunks are stored
                failure: Exception = exc
                if isinstance(exc, IdempotencyConflict):
                    failure = exc.with_field(f"requests{exc.field}")
                missing: list[None] = [None] * (len(prepared) - start)
                conflict = conflict_or_none(failure, len(handles))
                if conflict is not None:
                    raise conflict from None
                raise PartialSubmitError([*handles, *missing], failure) from exc
        return handles

    async def cancel(self, request_id: str) -> bool:
        """Cancel a request in any state (see :meth:`Producer.cancel`)."""
        return (await self.try_cancel(request_id)).will_be_cancelled

    async def try_cancel(self, request_id: str) -> CancelOutcome:
        """Cancel a request in any state, saying what happened."""
        meta = await self._client.hget(self.keys.request(request_id), "meta")
        args = cancel_args(self.keys, self.settings.result_ttl_seconds, request_id, meta)
        outcome = read_cancel_reply(await self._cancel(keys=[self.keys.buffers], args=args))
        if outcome.kind == "unknown":
            recorded = await asyncio.to_thread(self._record.lookup, request_id)
            if recorded is not None:
                return CancelOutcome("finished", recorded.state)
        return outcome

    async def state(self, request_id: str) -> RequestState:
        """Where the request is now (from the SQL record once Redis has let it go)."""
        reply = await self._client.hmget(self.keys.request(request_id), STATE_FIELDS)
        state = read_state(reply)
        if state == "unknown":
            recorded = await asyncio.to_thread(self._record.lookup, request_id)
            if recorded is not None:
                return recorded.state  # type: ignore[return-value]
        return state

    async def result(self, request_id: str) -> Result | None:
        """The request's result once it has one (from the SQL record after its Redis TTL)."""
        raw: Any = await self._client.hget(self.keys.request(request_id), "result")
        if raw:
            return Result.from_json(raw)
        recorded = await asyncio.to_thread(self._record.lookup, request_id)
        return Result.from_json(recorded.result) if recorded and recorded.result else None

    async def aclose(self) -> None:
        """Close the Redis connections (and the record's, if it was read)."""
        await self._client.aclose()
        self._record.close()

    async def __aenter__(self) -> AsyncProducer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _send(
        self, prepared: list[PreparedRequest], offset: int = 0
    ) -> list[AsyncRequestHandle]:
        args = enqueue_args(self.keys, self.settings.idempotency_ttl_seconds, prepared)
        reply = await self._enqueue(keys=[self.keys.buffers], args=args)
        max_n = self.settings.max_batch_requests
        ids, full = read_enqueue_reply(prepared, reply, max_n, offset=offset)
        if full:
            await self._waker.wake(full)
        return [AsyncRequestHandle(request_id, self) for request_id in ids]


class AsyncRequestHandle:
    """A submitted request, asked after from asyncio code."""

    __slots__ = ("_producer", "id")

    def __init__(self, request_id: str, producer: AsyncProducer) -> None:
        self.id = request_id
        self._producer = producer

    async def status(self) -> RequestState:
        """pending, batched, cancelling, completed, failed, cancelled or unknown."""
        return await self._producer.state(self.id)

    async def result(self) -> Result | None:
        """The result if the request has finished, else None."""
        return await self._producer.result(self.id)

    async def wait(self, timeout: float | None = None) -> Result:
        """Wait until the request finishes; raises TimeoutError after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.02
        while (result := await self.result()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"request {self.id} has no result after {timeout} s")
            remaining = delay if deadline is None else deadline - time.monotonic()
            await asyncio.sleep(max(0.0, min(delay, remaining)))
            delay = min(delay * 1.5, 0.5)
        return result

    async def cancel(self) -> bool:
        """Cancel the request (see :meth:`Producer.cancel`)."""
        return await self._producer.cancel(self.id)

    def __repr__(self) -> str:
        return f"AsyncRequestHandle({self.id!r})"
