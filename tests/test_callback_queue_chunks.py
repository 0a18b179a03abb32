"""Consuming a callback queue in chunks: get_many/ack_many keep get()'s guarantees."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import pytest
from redis import Redis

from producer import AsyncCallbackQueue, CallbackQueue
from shared.redis_layout import CALLBACK_GROUP
from shared.schemas import Result
from shared.settings import Settings
from tests.conftest import run_at_once
from tests.test_callback_queue import cancelled_results, pending_request_ids

KEY = "bb:cb:svc"
VT = 0.2  # visibility timeout (s) of the redelivery scenarios: short, to keep them fast


def put_results(client: Redis, n: int, key: str = KEY, start: int = 0) -> list[str]:
    """Put n results on a callback stream as _terminal.lua does (one field: result)."""
    pipe = client.pipeline(transaction=False)
    ids = [f"r{i}" for i in range(start, start + n)]
    for request_id in ids:
        pipe.xadd(key, {"result": Result(request_id=request_id, status="completed").to_json()})
    pipe.execute()
    return ids


def command_calls(client: Redis) -> Counter[str]:
    """How many times the server has run each command (scripts' own calls included)."""
    stats: Any = client.info("commandstats")
    return Counter(
        {name.removeprefix("cmdstat_"): int(row["calls"]) for name, row in stats.items()}
    )


def commands_run(client: Redis, before: Counter[str]) -> Counter[str]:
    """Commands the server ran since ``before``, leaving out the INFO calls that measure."""
    delta = command_calls(client) - before
    del delta["info"]
    return delta


def test_get_many_returns_up_to_max_results_in_order(
    settings: Settings, redis_client: Redis
) -> None:
    # Given seven results on a queue
    ids = put_results(redis_client, 7)
    queue = CallbackQueue("svc", settings=settings)

    # When a consumer takes chunks of at most three, then asks for more than are left
    first = queue.get_many(3, timeout=1)
    rest = queue.get_many(10, timeout=1)
    then = queue.get_many(10, timeout=0.1)
    queue.close()

    # Then it gets them in order, each a first delivery, and nothing once they are all out
    assert [d.result.request_id for d in first] == ids[:3]
    assert [d.result.request_id for d in rest] == ids[3:]
    assert all(not d.redelivered and d.deliveries == 1 for d in first + rest)
    assert then == []


def test_draining_a_thousand_results_costs_round_trips_per_chunk_not_per_result(
    settings: Settings, redis_client: Redis
) -> None:
    # Given a thousand results and a consumer that has made its group and loaded its script
    put_results(redis_client, 1000)
    queue = CallbackQueue("svc", settings=settings)
    assert queue.get_many(1, timeout=0) != []

    # When it drains the queue in chunks of 500, acking each chunk at once
    before = command_calls(redis_client)
    chunks = []
    while chunk := queue.get_many(500, timeout=0):
        chunks.append(len(chunk))
        assert queue.ack_many(chunk) == len(chunk)
    drain = commands_run(redis_client, before)

    # Then each chunk took one read and one MULTI (no redelivery scan was due, so no script
    # call), and the server ran a handful of commands per chunk, not a handful per result
    assert chunks == [500, 499]
    assert drain["xreadgroup"] == 3  # two chunks, then the read that found the queue empty
    assert drain["evalsha"] == 0
    assert drain["exec"] == 2 and drain["xack"] == 2 and drain["xdel"] == 2
    assert sum(drain.values()) <= 20, drain
    assert redis_client.xlen(KEY) == 1  # the result taken before measuring, never acked

    # And the same counting sees one-at-a-time consumption cost commands per result
    put_results(redis_client, 50, start=1000)
    before = command_calls(redis_client)
    while (delivery := queue.get(timeout=0)) is not None:
        delivery.ack()
    assert commands_run(redis_client, before)["xreadgroup"] >= 50
    queue.close()


def test_unacked_results_come_back_after_the_visibility_timeout_counted(
    settings: Settings, redis_client: Redis
) -> None:
    # Given a consumer that took three results and died without acking, and two new results
    ids = put_results(redis_client, 3)
    crashed = CallbackQueue("svc", settings=settings, visibility_timeout=VT)
    assert len(crashed.get_many(10, timeout=1)) == 3
    crashed.close()
    later = put_results(redis_client, 2, start=3)
    survivor = CallbackQueue("svc", settings=settings, visibility_timeout=VT)

    # When another consumer asks before the timeout, handles the new ones, and asks again after
    early = survivor.get_many(10, timeout=0.05)
    survivor.ack_many(early)
    time.sleep(VT)
    again = survivor.get_many(10, timeout=1)

    # Then only the new results came early; the three came back after, oldest first, marked
    # redelivered and counted as second deliveries
    assert [(d.result.request_id, d.redelivered, d.deliveries) for d in early] == [
        (request_id, False, 1) for request_id in later
    ]
    assert [(d.result.request_id, d.redelivered, d.deliveries) for d in again] == [
        (request_id, True, 2) for request_id in ids
    ]

    # And left unacked once more, they come back a third time
    time.sleep(VT)
    third = survivor.get_many(10, timeout=1)
    assert [(d.result.request_id, d.deliveries) for d in third] == [(r, 3) for r in ids]
    survivor.close()


def test_due_results_come_before_new_ones_in_a_chunk(
    settings: Settings, redis_client: Redis
) -> None:
    # Given two results a dead consumer held past the timeout, and three new ones behind them
    held = put_results(redis_client, 2)
    crashed = CallbackQueue("svc", settings=settings, visibility_timeout=VT)
    assert len(crashed.get_many(2, timeout=1)) == 2
    fresh = put_results(redis_client, 3, start=2)
    time.sleep(VT)

    # When a new consumer takes a chunk of four
    queue = CallbackQueue("svc", settings=settings, visibility_timeout=VT)
    chunk = queue.get_many(4, timeout=1)
    queue.close()

    # Then the due ones come first, and the chunk is filled with new ones
    assert [(d.result.request_id, d.redelivered) for d in chunk] == [
        (held[0], True),
        (held[1], True),
        (fresh[0], False),
        (fresh[1], False),
    ]


def test_results_delivered_too_often_dead_letter_exactly_once_under_chunked_consumers(
    settings: Settings, redis_client: Redis
) -> None:
    # Given a queue that hands a result out at most 3 times, two results no consumer can
    # handle and three ordinary ones
    settings = settings.model_copy(update={"callback_max_deliveries": 3})
    ids = cancelled_results(settings, 5)
    poison = {ids[0], ids[3]}
    handed_out: list[str] = []  # list.extend is atomic: safe from both threads

    # When two consumers take chunks concurrently, acking all but the poison ones
    def consume() -> None:
        queue = CallbackQueue("svc", settings=settings, visibility_timeout=0.05)
        deadline = time.monotonic() + 1.2
        while time.monotonic() < deadline:
            chunk = queue.get_many(10, timeout=0.1)
            handed_out.extend(d.result.request_id for d in chunk if d.result.request_id in poison)
            queue.ack_many(d for d in chunk if d.result.request_id not in poison)
        queue.close()

    assert run_at_once(consume, 2) == []

    # Then each poison result was handed out 3 times, and is in the dead-letter stream once
    assert Counter(handed_out) == dict.fromkeys(poison, 3)
    assert redis_client.xlen(KEY) == 0
    assert redis_client.xpending(KEY, CALLBACK_GROUP)["pending"] == 0
    reader = CallbackQueue("svc", settings=settings)
    letters = reader.dead_letters()
    reader.close()
    assert sorted(letter.request_id for letter in letters) == sorted(poison)
    assert {(letter.deliveries, letter.reason) for letter in letters} == {(3, "max_deliveries")}


def test_ack_many_removes_exactly_the_acked_results(
    settings: Settings, redis_client: Redis
) -> None:
    # Given six results delivered to one consumer
    ids = put_results(redis_client, 6)
    queue = CallbackQueue("svc", settings=settings)
    chunk = queue.get_many(6, timeout=1)

    # When it acks three of them, two as deliveries and one by its id, and then one again
    acked = queue.ack_many([chunk[0], chunk[2], chunk[4].delivery_id])
    again = queue.ack_many([chunk[0]])
    nothing = queue.ack_many([])
    queue.close()

    # Then those three are gone from the stream and the pending list, and only they are
    assert (acked, again, nothing) == (3, 0, 0)
    assert redis_client.xlen(KEY) == 3
    assert pending_request_ids(redis_client) == [ids[1], ids[3], ids[5]]
    remaining: Any = redis_client.xrange(KEY)
    assert [entry_id.decode() for entry_id, _ in remaining] == [
        chunk[1].delivery_id,
        chunk[3].delivery_id,
        chunk[5].delivery_id,
    ]


def test_get_many_carries_on_after_redis_lost_its_group(
    settings: Settings, redis_client: Redis
) -> None:
    # Given a consumer that has read its queue once (so it knows its group exists)
    queue = CallbackQueue("svc", settings=settings, client=redis_client)
    assert queue.get_many(timeout=0.05) == []

    # When Redis is wiped and results are delivered anew (as the reconciler does)
    redis_client.flushdb()
    ids = put_results(redis_client, 3)

    # Then the consumer makes its group again and gets them all
    chunk = queue.get_many(10, timeout=1.0)
    assert [d.result.request_id for d in chunk] == ids
    assert redis_client.xpending(KEY, CALLBACK_GROUP)["pending"] == 3


def test_get_many_on_an_empty_queue_returns_nothing_once_the_timeout_is_up(
    settings: Settings,
) -> None:
    # Given a queue with no results
    queue = CallbackQueue("svc", settings=settings)
    assert queue.get_many(timeout=0) == []

    # When a consumer waits 0.3 s, and then not at all
    started = time.monotonic()
    waited = queue.get_many(10, timeout=0.3)
    elapsed = time.monotonic() - started
    started = time.monotonic()
    at_once = queue.get_many(10, timeout=0)
    no_wait = time.monotonic() - started
    queue.close()

    # Then both get [], after the time they allowed (with scheduling slack) and no longer
    assert waited == [] and at_once == []
    assert 0.3 <= elapsed < 0.6
    assert no_wait < 0.1


def test_get_many_waits_longer_than_the_socket_timeout(
    settings: Settings, redis_url: str, redis_client: Redis
) -> None:
    # Given a client that gives up on a socket read after one second, and a result that
    # arrives only after two
    client = Redis.from_url(redis_url, socket_timeout=1.0)
    queue = CallbackQueue("slow", settings=settings, client=client)
    assert queue.get_many(timeout=0.1) == []
    late = threading.Timer(2.0, lambda: put_results(redis_client, 1, key=queue.key))
    late.start()
    try:
        # When a consumer waits three seconds / Then it gets it, no TimeoutError
        chunk = queue.get_many(10, timeout=3.0)
    finally:
        late.cancel()
        late.join()
        queue.close()
    assert [d.result.request_id for d in chunk] == ["r0"]


def test_iterating_fetches_in_chunks_and_each_result_is_acked(
    settings: Settings, redis_client: Redis
) -> None:
    # Given 250 results
    ids = put_results(redis_client, 250)
    queue = CallbackQueue("svc", settings=settings)
    assert queue.get_many(1, timeout=0) != []  # makes the group and loads the script
    before = command_calls(redis_client)

    # When a consumer iterates the queue, acking each result
    seen = []
    for delivery in queue:
        seen.append(delivery.result.request_id)
        delivery.ack()
        if len(seen) == 249:
            break
    run = commands_run(redis_client, before)
    queue.close()

    # Then it saw each in order, fetched a chunk at a time, and acked each one
    assert seen == ids[1:]
    assert run["xreadgroup"] + run["evalsha"] <= 3 and run["exec"] == 249
    assert redis_client.xlen(KEY) == 1  # only the one taken before iterating


def test_iteration_hands_out_no_result_that_waited_half_its_timeout(
    settings: Settings, redis_client: Redis
) -> None:
    # Given ten results and a consumer with a 0.6 s visibility timeout that takes 0.12 s
    # over each
    ids = put_results(redis_client, 10)
    vt = 0.6
    queue = CallbackQueue("svc", settings=settings, visibility_timeout=vt)

    # When it iterates the queue, acking each result after handling it
    seen: list[tuple[str, bool]] = []
    idle_when_handed: list[int] = []
    for delivery in queue:
        row: Any = redis_client.xpending_range(
            KEY, CALLBACK_GROUP, delivery.delivery_id, delivery.delivery_id, 1
        )
        idle_when_handed.append(row[0]["time_since_delivered"])
        time.sleep(0.12)
        delivery.ack()
        seen.append((delivery.result.request_id, delivery.redelivered))
        if redis_client.xlen(KEY) == 0:
            break
    queue.close()

    # Then every result was handled once, none with less than half its timeout left: those
    # that waited too long in the fetched chunk came back as redeliveries instead
    assert sorted(request_id for request_id, _ in seen) == sorted(ids)
    assert max(idle_when_handed) < vt * 1000 / 2
    assert any(redelivered for _, redelivered in seen)


def test_a_delivery_acked_on_another_queue_is_refused_and_deletes_nothing(
    settings: Settings, redis_client: Redis
) -> None:
    # Given two queues holding an entry of the same id each, as one collect writes them
    entry_id = "1700000000000-0"
    for key, request_id in ((KEY, "for-svc"), ("bb:cb:other", "for-other")):
        result = Result(request_id=request_id, status="completed").to_json()
        redis_client.xadd(key, {"result": result}, id=entry_id)
    svc, other = CallbackQueue("svc", settings=settings), CallbackQueue("other", settings=settings)
    (taken,) = svc.get_many(10, timeout=1)

    # When svc's delivery is acked on the other queue
    try:
        other.ack_many([taken])
    except ValueError as exc:
        refused = str(exc)
    else:
        refused = ""

    # Then that is refused naming the delivery and both queues, and nothing was deleted:
    # the other queue's result, never handed out, is still there; svc's is acked on svc
    assert "deliveries[0] was taken from 'bb:cb:svc', not 'bb:cb:other'" in refused
    assert redis_client.xlen("bb:cb:other") == 1 and redis_client.xlen(KEY) == 1
    assert svc.ack_many([taken]) == 1 and redis_client.xlen(KEY) == 0
    svc.close()
    other.close()


@pytest.mark.parametrize("queue_class", [CallbackQueue, AsyncCallbackQueue])
@pytest.mark.parametrize(
    ("name", "visibility_timeout", "named"),
    [
        ("", None, "name"),
        ("a b", None, "name"),
        ("svc", 0, "visibility_timeout"),
        ("svc", -1, "visibility_timeout"),
        ("svc", 0.0001, "visibility_timeout"),
        ("svc", float("nan"), "visibility_timeout"),
    ],
)
def test_a_queue_opened_with_a_name_or_timeout_no_consumer_can_use_is_refused(
    settings: Settings,
    queue_class: type[CallbackQueue] | type[AsyncCallbackQueue],
    name: str,
    visibility_timeout: float | None,
    named: str,
) -> None:
    # Given a name no request could give (it would read an empty queue for ever) or a
    # visibility timeout under a millisecond (0 used to mean the default; below it, every
    # call took the results other consumers had in hand)
    # When a consumer opens the queue / Then it is refused naming the argument
    with pytest.raises(ValueError, match=rf"^{named} must be"):
        queue_class(name, settings=settings, visibility_timeout=visibility_timeout)


@pytest.mark.parametrize("max_results", [0, -1, 2.5, True])
def test_get_many_refuses_a_max_that_is_not_a_whole_number_of_results(
    settings: Settings, max_results: object
) -> None:
    # Given a queue / When a chunk size that cannot be one is asked for / Then it is refused
    # naming max, rather than failing inside Redis (2.5) or taking one result (True)
    queue = CallbackQueue("svc", settings=settings)
    with pytest.raises(ValueError, match=r"^max must be an integer of at least 1"):
        queue.get_many(max_results, timeout=0)  # type: ignore[arg-type]
    queue.close()
