"""Validation means what it says: the values checked are the values sent, bad input stores nothing.

Every scenario runs through the sync and the async producer alike.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from redis import Redis

from producer import (
    AsyncProducer,
    IdempotencyConflict,
    InvalidRequest,
    PartialSubmitError,
    Producer,
)
from producer import aio as async_client
from producer import client as sync_client
from shared.redis_layout import Keys, buffer_name, pending_ids
from shared.schemas import DEFAULT_PROVIDER, LINE_OVERHEAD
from shared.settings import Settings
from tests.conftest import make_settings

MESSAGES = [{"role": "user", "content": "Positive or negative: 'sturdy lid'"}]
Submit = Callable[..., Any]
SubmitMany = Callable[[list[dict[str, Any]]], Any]


@dataclasses.dataclass
class Stamp:
    """Not JSON: orjson would turn it into an object, so it must be refused."""

    at: float


class Clients:
    """One producer flavour (sync or async) behind plain blocking calls."""

    def __init__(self, settings: Settings, flavour: str) -> None:
        self.settings = settings
        self.flavour = flavour

    def submit(self, **request: Any) -> Any:
        if self.flavour == "sync":
            with Producer(settings=self.settings) as producer:
                return producer.submit(**request)

        async def run() -> Any:
            async with AsyncProducer(settings=self.settings) as producer:
                return await producer.submit(**request)

        return asyncio.run(run())

    def submit_many(self, requests: list[dict[str, Any]]) -> list[Any]:
        if self.flavour == "sync":
            with Producer(settings=self.settings) as producer:
                return producer.submit_many(requests)

        async def run() -> list[Any]:
            async with AsyncProducer(settings=self.settings) as producer:
                return await producer.submit_many(requests)

        return asyncio.run(run())

    @property
    def chunk(self) -> int:
        """Requests per enqueue script call (one atomic step)."""
        return 100 if self.flavour == "sync" else 500


@pytest.fixture(params=["sync", "async"])
def clients(request: pytest.FixtureRequest, settings: Settings) -> Clients:
    return Clients(settings, request.param)


def pending(redis_client: Redis, model: str = "m-a") -> list[str]:
    return pending_ids(redis_client, Keys(), buffer_name(DEFAULT_PROVIDER, model))


NAN, INF = float("nan"), float("inf")


def nested(depth: int) -> Any:
    """Metadata ``depth`` objects and arrays deep (an object outermost, as metadata is)."""
    value: Any = "leaf"
    for level in range(depth):
        value = {"a": value} if (depth - level) % 2 else [value]
    return value


@pytest.mark.parametrize(
    ("fields", "field", "rule"),
    [
        # max_tokens must be a real integer: nothing is coerced, so what is checked is sent
        ({"max_tokens": "5"}, "max_tokens", "valid integer"),
        ({"max_tokens": 5.0}, "max_tokens", "valid integer"),
        ({"max_tokens": True}, "max_tokens", "valid integer"),
        # NaN and ±Infinity are refused wherever they are, never sent as null
        ({"temperature": NAN}, "temperature", "finite number"),
        ({"top_p": INF}, "top_p", "finite number"),
        ({"temperature": -INF}, "temperature", "finite number"),
        ({"logit_bias": {"50256": NAN}}, "logit_bias.50256", "finite number"),
        (
            {"messages": [{"role": "user", "content": "x", "weight": NAN}]},
            "messages[0].weight",
            "finite number",
        ),
        ({"metadata": {"score": NAN}}, "metadata.score", "finite number"),
        ({"metadata": {"scores": [1.0, INF]}}, "metadata.scores[1]", "finite number"),
        # no control characters in the model name (or any producer-level string)
        ({"model": "m-a\x00"}, "model", "control characters"),
        ({"model": "m-a\nm-b"}, "model", "control characters"),
        ({"model": "m\x7fa"}, "model", "control characters"),
        ({"model": b"m-a"}, "model", "valid string"),
        ({"provider": "default"}, "provider", "'local'"),
        ({"callback_queue": "svc\n"}, "callback_queue", "pattern"),
        ({"callback_queue": b"svc"}, "callback_queue", "valid string"),
        # idempotency keys are str, and pattern-restricted
        ({"idempotency_key": 17}, "idempotency_key", "valid string"),
        ({"idempotency_key": b"order-17"}, "idempotency_key", "valid string"),
        ({"idempotency_key": bytearray(b"order-17")}, "idempotency_key", "valid string"),
        ({"idempotency_key": "order\x0017"}, "idempotency_key", "pattern"),
        # metadata is JSON, and has a size limit of its own
        ({"metadata": {"when": Stamp(1.0)}}, "metadata.when", "JSON-serialisable"),
        ({"metadata": {"blob": "x" * 20_000}}, "metadata", "16384-byte limit"),
        # ... and a depth limit: a cancel nests it further, which failed past orjson's limit
        ({"metadata": nested(65)}, "metadata", "65 levels deep, over the limit of 64"),
        ({"metadata": nested(254)}, "metadata", "254 levels deep, over the limit of 64"),
    ],
)
def test_invalid_values_are_refused_naming_field_and_rule_and_store_nothing(
    clients: Clients, redis_client: Redis, fields: dict[str, Any], field: str, rule: str
) -> None:
    # Given a request with one bad value
    request: dict[str, Any] = {"model": "m-a", "messages": MESSAGES, **fields}

    # When it is submitted alone, or last of a submit_many
    with pytest.raises(InvalidRequest) as err:
        clients.submit(**request)
    with pytest.raises(InvalidRequest) as many_err:
        clients.submit_many([{"model": "m-a", "messages": MESSAGES}, request])

    # Then the error names the field and the rule, and Redis is untouched
    assert (err.value.field, many_err.value.field) == (field, f"requests[1].{field}")
    assert rule in err.value.rule and rule in many_err.value.rule
    assert redis_client.dbsize() == 0


def test_metadata_at_the_depth_limit_is_delivered_back_and_can_be_cancelled(
    clients: Clients, redis_client: Redis
) -> None:
    # Given a request whose metadata is nested as deep as allowed
    handle = clients.submit(model="m-a", messages=MESSAGES, metadata=nested(64))
    # When it is cancelled / Then its cancelled result carries that metadata back
    with Producer(settings=clients.settings) as producer:
        assert producer.cancel(handle.id)
        result = producer.result(handle.id)
    assert result is not None and result.status == "cancelled"
    assert result.metadata == nested(64)


def test_a_webhook_url_refused_for_its_length_is_not_shown(clients: Clients) -> None:
    # Given a webhook URL over 2,048 characters that holds a password
    url = "https://user:s3cret-pw@hooks.example.com/" + "a" * 2100
    # When it is submitted / Then it is refused for its length, and its text is not shown
    with pytest.raises(InvalidRequest) as err:
        clients.submit(model="m-a", messages=MESSAGES, webhook_url=url)
    assert err.value.field == "webhook_url" and "2048" in err.value.rule
    assert "s3cret-pw" not in str(err.value)


def test_messages_may_carry_newlines_tabs_and_nul_and_are_sent_as_given(
    clients: Clients, redis_client: Redis
) -> None:
    # Given message text with newlines, tabs and even NUL (JSON carries all of them exactly)
    text = "line one\n\tline two\x00end"
    handle = clients.submit(model="m-a", messages=[{"role": "user", "content": text}])

    # Then it is stored with exactly that content
    body = redis_client.hget(Keys().bodies(buffer_name(DEFAULT_PROVIDER, "m-a")), handle.id)
    assert body is not None and b'"line one\\n\\tline two\\u0000end"' in body


def test_a_real_null_in_the_body_is_not_mistaken_for_nan(
    clients: Clients, redis_client: Redis
) -> None:
    messages = [{"role": "assistant", "content": None, "name": "null"}, *MESSAGES]
    handle = clients.submit(model="m-a", messages=messages, metadata={"note": None, "x": 1.5})
    assert pending(redis_client) == [handle.id]


def test_submit_many_encodes_everything_before_writing_anything(
    clients: Clients, redis_client: Redis
) -> None:
    # Given more requests than one enqueue chunk, the very last with NaN in its metadata
    n = clients.chunk * 2 + 50
    requests: list[dict[str, Any]] = [
        {"model": "m-a", "messages": MESSAGES, "metadata": {"i": i}} for i in range(n)
    ]
    requests[-1]["metadata"] = {"i": NAN}

    # When they are submitted together
    with pytest.raises(InvalidRequest) as err:
        clients.submit_many(requests)

    # Then the error names that request and nothing at all was stored
    assert err.value.field == f"requests[{n - 1}].metadata.i"
    assert redis_client.dbsize() == 0


def test_metadata_counts_toward_the_line_limit_and_the_stored_size(
    redis_url: str, tmp_path: Path, redis_client: Redis
) -> None:
    # Given lines of at most 1,000 bytes and a request whose line alone fits
    settings = make_settings(redis_url, tmp_path, max_line_bytes=1000)
    producer = Producer(settings=settings)
    small = producer.submit("m-a", MESSAGES, metadata={"pad": "x" * 200})
    body = redis_client.hget(Keys().bodies(buffer_name(DEFAULT_PROVIDER, "m-a")), small.id)
    assert body is not None

    # Then the buffer weighs it at its JSONL line plus its metadata
    meta = redis_client.hget(Keys().request(small.id), "meta")
    assert meta is not None
    expected = LINE_OVERHEAD + len(small.id) + len(body) + len(meta)
    buf = buffer_name(DEFAULT_PROVIDER, "m-a")
    assert int(redis_client.hget(Keys().buffers, buf)) == expected  # type: ignore[arg-type]

    # When metadata within its own limit takes the request over the line limit
    before = redis_client.dbsize()
    with pytest.raises(InvalidRequest) as err:
        producer.submit("m-a", MESSAGES, metadata={"pad": "x" * 900})

    # Then it is refused naming metadata and the per-request limit, and nothing is stored
    assert err.value.field == "metadata"
    assert "1000-byte limit per request" in err.value.rule
    assert redis_client.dbsize() == before
    producer.close()


@pytest.mark.parametrize(
    "change",
    [
        {"messages": [{"role": "user", "content": "a different question"}]},
        {"max_tokens": 9},
        {"temperature": 0.5},
        {"model": "m-b"},
        {"provider": "local"},
        {"callback_queue": "other"},
        {"metadata": {"order": 18}},
    ],
    ids=["messages", "max_tokens", "body-field", "model", "provider", "queue", "metadata"],
)
def test_reusing_an_idempotency_key_for_a_different_request_is_refused(
    clients: Clients, redis_client: Redis, change: dict[str, Any]
) -> None:
    # Given a stored request with an idempotency key
    original = {
        "model": "m-a",
        "messages": MESSAGES,
        "max_tokens": 5,
        "callback_queue": "svc",
        "metadata": {"order": 17},
        "idempotency_key": "order-17",
    }
    first = clients.submit(**original)
    before = redis_client.dbsize()

    # When the same key comes with a different request, alone or in a submit_many
    with pytest.raises(IdempotencyConflict) as err:
        clients.submit(**{**original, **change})
    with pytest.raises(IdempotencyConflict) as many_err:
        clients.submit_many([{"model": "m-a", "messages": MESSAGES}, {**original, **change}])

    # Then both are refused, naming the key and the first request, and nothing is stored
    assert isinstance(err.value, InvalidRequest)
    assert err.value.field == "idempotency_key"
    assert many_err.value.field == "requests[1].idempotency_key"
    assert "different request" in err.value.rule and first.id in err.value.rule
    assert redis_client.dbsize() == before
    assert pending(redis_client) == [first.id]
    # and retrying the identical request still answers with the first id
    assert clients.submit(**original).id == first.id


def test_one_key_for_two_different_requests_in_one_call_stores_nothing(
    clients: Clients, redis_client: Redis
) -> None:
    requests = [
        {"model": "m-a", "messages": MESSAGES, "idempotency_key": "k-1"},
        {"model": "m-a", "messages": MESSAGES, "idempotency_key": "k-1", "max_tokens": 3},
    ]
    with pytest.raises(IdempotencyConflict) as err:
        clients.submit_many(requests)
    assert err.value.field == "requests[1].idempotency_key"
    assert "[0]" in err.value.rule
    assert redis_client.dbsize() == 0


def test_a_conflict_in_a_later_chunk_stores_nothing_of_the_call(
    clients: Clients, redis_client: Redis
) -> None:
    # Given a key already used, and a call of three chunks reusing it in the third
    taken = clients.submit(model="m-a", messages=MESSAGES, idempotency_key="taken")
    before = redis_client.dbsize()
    requests: list[dict[str, Any]] = [
        {"model": "m-a", "messages": MESSAGES, "idempotency_key": f"k-{i}"}
        for i in range(clients.chunk * 2 + 10)
    ]
    conflict_at = clients.chunk * 2 + 5
    requests[conflict_at]["max_tokens"] = 7
    requests[conflict_at]["idempotency_key"] = "taken"

    # When the call is made, then it is refused before any chunk is written
    with pytest.raises(IdempotencyConflict) as err:
        clients.submit_many(requests)
    assert err.value.field == f"requests[{conflict_at}].idempotency_key"
    assert taken.id in err.value.rule
    assert redis_client.dbsize() == before


def test_a_chunk_with_a_conflict_is_refused_whole_by_the_enqueue_script(
    clients: Clients, redis_client: Redis
) -> None:
    # Given a key taken, and one chunk (checked and stored in one script call) reusing it
    taken = clients.submit(model="m-a", messages=MESSAGES, idempotency_key="taken")
    before = redis_client.dbsize()
    requests = [{"model": "m-a", "messages": MESSAGES} for _ in range(20)]
    requests[12] = {**requests[12], "idempotency_key": "taken", "temperature": 1}

    # Then the script refuses the whole chunk and the error names the request
    with pytest.raises(IdempotencyConflict) as err:
        clients.submit_many(requests)
    assert err.value.field == "requests[12].idempotency_key"
    assert redis_client.dbsize() == before
    assert pending(redis_client) == [taken.id]


def test_a_key_taken_concurrently_refuses_its_chunk_and_says_what_was_stored(
    clients: Clients, redis_client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given another producer that takes a key after this call checked its keys (simulated
    # by skipping the up-front check), for a request in the second of three chunks
    taken = clients.submit(model="m-a", messages=MESSAGES, idempotency_key="taken")
    monkeypatch.setattr(sync_client, "check_taken_keys", lambda *_args: None)
    monkeypatch.setattr(async_client, "check_taken_keys", lambda *_args: None)
    chunk = clients.chunk
    requests: list[dict[str, Any]] = [
        {"model": "m-a", "messages": MESSAGES, "idempotency_key": f"k-{i}"}
        for i in range(chunk * 2 + 50)
    ]
    requests[chunk + 50] = {**requests[chunk + 50], "idempotency_key": "taken", "max_tokens": 2}

    # When the call is made
    with pytest.raises(PartialSubmitError) as err:
        clients.submit_many(requests)

    # Then that chunk was refused whole, the cause names the request, and the handles say
    # exactly what was stored (the sync producer has sent the later chunks already; the
    # async one stops at the refused chunk)
    handles = err.value.handles
    refused = range(chunk, 2 * chunk) if clients.flavour == "sync" else range(chunk, len(handles))
    assert [i for i, h in enumerate(handles) if h is None] == list(refused)
    assert isinstance(err.value.cause, IdempotencyConflict)
    assert err.value.cause.field == f"requests[{chunk + 50}].idempotency_key"
    stored = {h.id for h in handles if h is not None}
    assert set(pending(redis_client)) == stored | {taken.id}


def test_a_key_stored_without_a_digest_still_answers_with_its_request(
    clients: Clients, redis_client: Redis
) -> None:
    # Given a key written before digests were kept (its value is the bare request id)
    redis_client.set(Keys().idempotency("old-key"), "0123456789abcdef0123456789abcdef")

    # Then a request with that key is taken as its repeat
    handle = clients.submit(model="m-a", messages=MESSAGES, idempotency_key="old-key")
    assert handle.id == "0123456789abcdef0123456789abcdef"
    assert pending(redis_client) == []
