"""Producer scenarios against a real Redis: enqueue, idempotency, validation, cancel, status."""

from __future__ import annotations

import re

import pytest
from redis import Redis

from producer import InvalidRequest, Producer
from shared.redis_layout import Keys, buffer_name
from shared.redis_layout import pending_ids as waiting_ids
from shared.schemas import DEFAULT_PROVIDER, keyed_request_id, new_request_ids
from shared.settings import Settings

MESSAGES = [{"role": "user", "content": "Is this review positive? 'Great kettle.'"}]


@pytest.fixture
def producer(settings: Settings) -> Producer:
    p = Producer(settings=settings)
    yield p
    p.close()


def pending_ids(client: Redis, provider: str, model: str) -> list[str]:
    return waiting_ids(client, Keys(), buffer_name(provider, model))


def test_submit_records_request_and_appends_to_its_model_buffer(
    producer: Producer, redis_client: Redis
) -> None:
    # Given a producer, when it submits one request
    handle = producer.submit("m-a", MESSAGES, max_tokens=5, callback_queue="svc", temperature=0)

    # Then the request is pending in the (default, m-a) buffer with its body stored
    assert handle.status() == "pending"
    assert pending_ids(redis_client, DEFAULT_PROVIDER, "m-a") == [handle.id]
    body = redis_client.hget(Keys().bodies(buffer_name(DEFAULT_PROVIDER, "m-a")), handle.id)
    assert body is not None and b'"temperature":0' in body and b'"max_tokens":5' in body
    assert int(redis_client.hget(Keys().buffers, buffer_name(DEFAULT_PROVIDER, "m-a"))) > len(body)


def test_same_idempotency_key_returns_same_id_and_enqueues_once(
    producer: Producer, redis_client: Redis
) -> None:
    first = producer.submit("m-a", MESSAGES, idempotency_key="order-17")
    again = producer.submit("m-a", MESSAGES, idempotency_key="order-17")
    many = producer.submit_many(
        [
            {"model": "m-a", "messages": MESSAGES, "idempotency_key": "order-17"},
            {"model": "m-a", "messages": MESSAGES, "idempotency_key": "order-18"},
            {"model": "m-a", "messages": MESSAGES, "idempotency_key": "order-18"},
        ]
    )
    assert again.id == first.id == many[0].id
    assert many[1].id == many[2].id != first.id
    assert sorted(pending_ids(redis_client, DEFAULT_PROVIDER, "m-a")) == sorted(
        {first.id, many[1].id}
    )


@pytest.mark.parametrize(
    ("kwargs", "field", "rule"),
    [
        ({"messages": []}, "messages", "non-empty"),
        ({"messages": "hello"}, "messages", "valid list"),
        ({"messages": [{"content": "x"}]}, "messages[0].role", "required"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "'user'"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", ""),
        ({"max_tokens": 0}, "max_tokens", "greater than 0"),
        ({"max_tokens": -5}, "max_tokens", "greater than 0"),
        ({"temperature": object()}, "temperature", "JSON-serialisable"),
        ({"metadata": {"when": object()}}, "metadata.when", "JSON-serialisable"),
        ({"idempotency_key": "k" * 129}, "idempotency_key", "pattern"),
        ({"idempotency_key": "has space"}, "idempotency_key", "pattern"),
        ({"callback_queue": "bad/queue"}, "callback_queue", "pattern"),
        ({"provider": "openai"}, "provider", "'local'"),
        ({"stream": True}, "stream", "not allowed"),
        ({"messages": [{"role": "user", "content": "x" * 2_000_000}]}, "messages", "limit"),
    ],
)
def test_invalid_request_names_field_and_rule_and_writes_nothing(
    producer: Producer, redis_client: Redis, kwargs: dict[str, object], field: str, rule: str
) -> None:
    request: dict[str, object] = {"model": "m-a", "messages": MESSAGES, **kwargs}
    with pytest.raises(InvalidRequest) as err:
        producer.submit(**request)  # type: ignore[arg-type]
    assert err.value.field == field
    assert rule in err.value.rule
    assert redis_client.dbsize() == 0


def test_submit_many_validates_everything_before_writing_anything(
    producer: Producer, redis_client: Redis
) -> None:
    good = {"model": "m-a", "messages": MESSAGES}
    bad = {"model": "m-a", "messages": [], "idempotency_key": "x"}
    with pytest.raises(InvalidRequest) as err:
        producer.submit_many([good, good, bad])
    assert err.value.field == "requests[2].messages"
    assert redis_client.dbsize() == 0


@pytest.mark.parametrize("item", [None, "m-a", ["model", "m-a"], 7])
def test_submit_many_refuses_an_item_that_is_not_a_mapping_naming_it(
    producer: Producer, redis_client: Redis, item: object
) -> None:
    # Given a good request and, after it, something that is not a request's mapping
    good = {"model": "m-a", "messages": MESSAGES}
    # When they are submitted together / Then the error names the item and nothing is stored
    with pytest.raises(InvalidRequest) as err:
        producer.submit_many([good, item])  # type: ignore[list-item]
    assert err.value.field == "requests[1]"
    assert err.value.rule.startswith("must be a mapping of submit's arguments")
    assert redis_client.dbsize() == 0


def test_submit_many_spreads_over_buffers_per_provider_and_model(
    producer: Producer, redis_client: Redis
) -> None:
    handles = producer.submit_many(
        [{"model": f"m-{i % 3}", "messages": MESSAGES} for i in range(2500)]
    )
    assert len({h.id for h in handles}) == 2500
    for model in ("m-0", "m-1", "m-2"):
        assert len(pending_ids(redis_client, DEFAULT_PROVIDER, model)) in (833, 834)


def test_cancel_pending_request_delivers_cancelled_result_once(
    producer: Producer, redis_client: Redis
) -> None:
    handle = producer.submit("m-a", MESSAGES, callback_queue="svc")
    assert producer.cancel(handle.id) is True
    assert producer.cancel(handle.id) is False
    assert handle.status() == "cancelled"
    result = handle.wait(timeout=1)
    assert result.status == "cancelled" and result.error is not None
    assert pending_ids(redis_client, DEFAULT_PROVIDER, "m-a") == []
    # ... and the emptied buffer is no longer listed
    assert redis_client.hget(Keys().buffers, buffer_name(DEFAULT_PROVIDER, "m-a")) is None
    assert redis_client.xlen(Keys().callback("svc")) == 1


def test_wait_times_out_for_a_request_without_result(producer: Producer) -> None:
    handle = producer.submit("m-a", MESSAGES)
    with pytest.raises(TimeoutError):
        handle.wait(timeout=0.2)
    assert producer.state("no-such-id") == "unknown"


def test_a_key_redis_forgot_still_names_the_request_it_holds(
    producer: Producer, redis_client: Redis
) -> None:
    # Given a keyed request whose key mapping is gone (its TTL passed, or Redis lost it)
    first = producer.submit("m-a", MESSAGES, idempotency_key="order-41")
    redis_client.delete(Keys().idempotency("order-41"))
    # When the identical request is submitted again under the same key
    again = producer.submit("m-a", MESSAGES, idempotency_key="order-41")
    # Then it is the same request, enqueued once; a different request under it is new
    assert again.id == first.id
    assert pending_ids(redis_client, DEFAULT_PROVIDER, "m-a") == [first.id]
    redis_client.delete(Keys().idempotency("order-41"))
    other = producer.submit(
        "m-a", [{"role": "user", "content": "else"}], idempotency_key="order-41"
    )
    assert other.id != first.id


def test_request_ids_are_short_distinct_and_keyed_ones_stable() -> None:
    # Given many fresh ids and the ids of two idempotency keys
    fresh = new_request_ids(20_000)
    keyed = keyed_request_id("order-17", "d" * 32)

    # Then every id is 20 characters of [0-9a-v] (100 random bits), none repeats, all 32
    # characters occur, and a key always names the same id (another key another one)
    assert all(re.fullmatch(r"[0-9a-v]{20}", i) for i in [*fresh, keyed])
    assert len(set(fresh)) == len(fresh)
    assert set("".join(fresh)) == set("0123456789abcdefghijklmnopqrstuv")
    assert keyed == keyed_request_id("order-17", "d" * 32) != keyed_request_id("order-18", "d" * 32)
