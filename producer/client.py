"""The producer: services push single requests into the pending buffers and get handles back."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from redis import Redis
from redis.exceptions import NoScriptError, ResponseError

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
from producer.wakeup import AggregatorWaker
from shared.allocator import keep_freed_heap
from shared.embedded_redis import resolve_redis_url
from shared.redis_layout import Keys, Scripts
from shared.redis_wire import pack
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

# Requests per enqueue script call: small enough that Redis works on one chunk while the next is
# encoded, and that one call never blocks Redis for long.
_CHUNK = 100


class Producer:
    """Submits requests to batchbridge through Redis; cheap to create, safe to share by threads.

    A producer needs only the Redis URL: a request that names no provider goes to the
    deployment's default as the *worker* is configured (its buffer is ``default:{model}``),
    so no provider key or provider setting in the producer's environment changes anything.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        settings: Settings | None = None,
        client: Redis | None = None,
    ) -> None:
        self.settings = settings or Settings.load()
        keep_freed_heap(self.settings.malloc_top_pad_bytes)
        url = redis_url or resolve_redis_url(self.settings)
        self._client = client or Redis.from_url(url)
        self.keys = Keys(self.settings.key_prefix)
        self._scripts = Scripts(self._client)
        self._waker = AggregatorWaker(self._client, self.keys)
        self._max_line = self.settings.max_line_bytes
        self._max_metadata = self.settings.max_metadata_bytes
        self._webhook_allow = self.settings.webhook_allow_cidrs
        self._record = ResultRecord(self.settings)

    @classmethod
    def from_env(cls) -> Producer:
        """A producer configured from ``BATCHBRIDGE_*`` environment variables."""
        return cls()

    @property
    def redis(self) -> Redis:
        """The Redis client this producer writes with."""
        return self._client

    def submit(
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
    ) -> RequestHandle:
        """Validate one request and enqueue it in one round trip; returns its handle.

        Raises InvalidRequest naming the field and the rule (IdempotencyConflict when the key
        was used for a different request), having stored nothing. A ``webhook_url`` receives
        the terminal result as a signed POST; it must pass the SSRF guard.
        """
        options = {
            "max_tokens": max_tokens,
            "callback_queue": callback_queue,
            "metadata": metadata,
            "idempotency_key": idempotency_key,
            "provider": provider,
            "webhook_url": webhook_url,
        }
        request = request_dict(model, messages, options, body_fields)
        prepared = prepare_request(
            request,
            max_line_bytes=self._max_line,
            max_metadata_bytes=self._max_metadata,
            webhook_allow=self._webhook_allow,
        )
        # The same send as submit_many's: hiredis packs the command in C, where redis-py
        # would first encode each argument in Python.
        (reply,) = self._enqueue_chunks([[prepared]])
        if isinstance(reply, Exception):
            raise reply
        try:
            return self._handles([prepared], reply)[0]
        except IdempotencyConflict as exc:
            raise exc.with_field(single_field(exc.field)) from None

    def submit_many(self, requests: Iterable[Mapping[str, Any]]) -> list[RequestHandle]:
        """Validate and encode every request first, then enqueue them all, pipelined.

        Each request is a mapping of :meth:`submit`'s arguments (``model``, ``messages``, ...).
        Any InvalidRequest (IdempotencyConflict included) is raised before anything is
        written. Chunks are stored atomically one by one, so if Redis refuses one (or a
        concurrent producer takes one of its idempotency keys for a different request) the
        others may be stored: PartialSubmitError then says which.
        """
        try:
            prepared = prepare_many(
                plain_requests(requests),
                max_line_bytes=self._max_line,
                max_metadata_bytes=self._max_metadata,
                webhook_allow=self._webhook_allow,
            )
            chunks = [prepared[i : i + _CHUNK] for i in range(0, len(prepared), _CHUNK)]
            # One chunk is checked and stored atomically by the script; several need their
            # keys checked up front so that a conflict stores nothing.
            if len(chunks) > 1 and (keyed := keyed_requests(prepared)):
                taken = self._client.mget([self.keys.idempotency(k) for k in keyed])
                check_taken_keys(keyed, taken)
        except InvalidRequest as exc:
            raise exc.with_field(f"requests{exc.field}") from None
        handles: list[RequestHandle | None] = []
        failure: Exception | None = None
        for chunk, reply in zip(chunks, self._enqueue_chunks(chunks), strict=True):
            if not isinstance(reply, Exception):
                try:
                    handles.extend(self._handles(chunk, reply, len(handles)))
                    continue
                except IdempotencyConflict as exc:
                    reply = exc.with_field(f"requests{exc.field}")
            failure = failure or reply
            handles.extend([None] * len(chunk))
        if failure is not None:
            stored = sum(h is not None for h in handles)
            raise conflict_or_none(failure, stored) or PartialSubmitError(handles, failure)
        return handles  # type: ignore[return-value]  # no None left when nothing failed

    def _enqueue_chunks(self, chunks: list[list[PreparedRequest]]) -> list[Any]:
        """Send every chunk before reading any reply, on one connection.

        Redis runs a chunk's script while the next chunk is being encoded and sent, so the
        client's and the server's work overlap (a pipeline would encode everything first).
        """
        sha = self._scripts.sha("enqueue")
        pool = self._client.connection_pool
        conn = pool.get_connection()
        replies: list[Any] = []
        try:
            todo = list(range(len(chunks)))
            for attempt in range(2):
                for i in todo:
                    args = ("EVALSHA", sha, 1, self.keys.buffers, *self._args(chunks[i]))
                    conn.send_packed_command([pack(args)], check_health=False)  # type: ignore[no-untyped-call]
                missing = []
                for i in todo:
                    try:
                        reply = conn.read_response()
                    except NoScriptError:
                        missing.append(i)  # not run at all, so sending it again is safe
                        continue
                    except ResponseError as exc:
                        # Read on: later chunks may have been enqueued, and the caller must
                        # learn which (an error reply leaves the connection usable).
                        reply = exc
                    replies.append((i, reply))
                if not missing:
                    break
                if attempt == 1:
                    raise RuntimeError("Redis keeps forgetting the enqueue script")
                self._scripts.load("enqueue")
                todo = missing
        except BaseException:
            conn.disconnect()  # type: ignore[no-untyped-call]  # replies may be left unread
            raise
        finally:
            pool.release(conn)
        return [reply for _, reply in sorted(replies, key=lambda pair: pair[0])]

    def cancel(self, request_id: str) -> bool:
        """Cancel a request in any state; True if its one outcome is or will be ``cancelled``.

        A request still in its buffer is cancelled at once. One already in a batch is marked:
        its result is discarded when the batch ends and it is reported cancelled (the
        provider may still bill it). False when it had already finished, or is unknown.
        """
        return self.try_cancel(request_id).will_be_cancelled

    def try_cancel(self, request_id: str) -> CancelOutcome:
        """Cancel a request in any state, saying what happened (see :meth:`cancel`)."""
        meta = self._client.hget(self.keys.request(request_id), "meta")
        args = cancel_args(self.keys, self.settings.result_ttl_seconds, request_id, meta)
        outcome = read_cancel_reply(self._scripts.run("cancel", [self.keys.buffers], args))
        if outcome.kind == "unknown" and (recorded := self._record.lookup(request_id)):
            # Redis let go of it (its result expired): the record knows how it ended.
            return CancelOutcome("finished", recorded.state)
        return outcome

    def state(self, request_id: str) -> RequestState:
        """Where the request is now (from the SQL record once Redis has let it go)."""
        state = read_state(self._client.hmget(self.keys.request(request_id), STATE_FIELDS))
        if state == "unknown" and (recorded := self._record.lookup(request_id)):
            return recorded.state  # type: ignore[return-value]
        return state

    def result(self, request_id: str) -> Result | None:
        """The request's result once it has one (from the SQL record after its Redis TTL)."""
        raw: Any = self._client.hget(self.keys.request(request_id), "result")
        if raw:
            return Result.from_json(raw)
        recorded = self._record.lookup(request_id)
        return Result.from_json(recorded.result) if recorded and recorded.result else None

    def close(self) -> None:
        """Close the Redis connections (and the record's, if it was read)."""
        self._client.close()
        self._record.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _args(self, prepared: list[PreparedRequest]) -> list[Any]:
        return enqueue_args(self.keys, self.settings.idempotency_ttl_seconds, prepared)

    def _handles(
        self, prepared: list[PreparedRequest], reply: list[Any], offset: int = 0
    ) -> list[RequestHandle]:
        max_n = self.settings.max_batch_requests
        ids, full = read_enqueue_reply(prepared, reply, max_n, offset=offset)
        if full:
            self._waker.wake(full)
        return [RequestHandle(request_id, self) for request_id in ids]


class PartialSubmitError(RuntimeError):
    """Redis refused part of a submit_many; ``handles`` has None where a request was not stored.

    Requests with a handle were enqueued; resubmitting the others (with idempotency keys, to
    be safe) completes the call. The cause is Redis' error, or an IdempotencyConflict when a
    concurrent producer took a key of a later chunk for a different request.
    """

    def __init__(self, handles: Sequence[Any], cause: Exception) -> None:
        stored = sum(h is not None for h in handles)
        super().__init__(f"{stored} of {len(handles)} requests were enqueued; refused: {cause}")
        self.handles = list(handles)
        self.cause = cause


class RequestHandle:
    """A submitted request: its id, and ways to ask after it."""

    __slots__ = ("_producer", "id")

    def __init__(self, request_id: str, producer: Producer) -> None:
        self.id = request_id
        self._producer = producer

    def status(self) -> RequestState:
        """pending, batched, cancelling, completed, failed, cancelled or unknown."""
        return self._producer.state(self.id)

    def result(self) -> Result | None:
        """The result if the request has finished, else None."""
        return self._producer.result(self.id)

    def wait(self, timeout: float | None = None) -> Result:
        """Block until the request finishes; raises TimeoutError after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.02
        while True:
            result = self.result()
            if result is not None:
                return result
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"request {self.id} has no result after {timeout} s")
            time.sleep(
                delay if deadline is None else max(0.0, min(delay, deadline - time.monotonic()))
            )
            delay = min(delay * 1.5, 0.5)

    def cancel(self) -> bool:
        """Cancel the request (see :meth:`Producer.cancel`)."""
        return self._producer.cancel(self.id)

    def __repr__(self) -> str:
        return f"RequestHandle({self.id!r})"
