"""Callback queue scenarios: at-least-once delivery with ack and visibility timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from redis import Redis

from producer import CallbackQueue, Producer
from shared.redis_layout import CALLBACK_GROUP
from shared.schemas import Result
from shared.settings import Settings
from tests.conftest import make_settings, run_at_once

MESSAGES = [{"role": "user", "content": "hello"}]


def cancelled_results(settings: Settings, n: int) -> list[str]:
    """Put n results on queue 'svc' the way the system does (cancel delivers a result)."""
    producer = Producer(settings=settings)
    handles = [producer.submit("m", MESSAGES, callback_queue="svc") for _ in range(n)]
    for handle in handles:
        assert handle.cancel()
    producer.close()
    return [h.id for h in handles]


def test_acked_deliveries_are_not_delivered_again(settings: Settings) -> None:
    ids = cancelled_results(settings, 3)
    queue = CallbackQueue("svc", settings=settings, visibility_timeout=0.2)
    got = []
    for _ in range(3):
        delivery = queue.get(timeout=1)
        assert delivery is not None and not delivery.redelivered
        got.append(delivery.result.request_id)
        delivery.ack()
    assert got == ids  # first in, first out
    time.sleep(0.3)
    assert queue.get(timeout=0.2) is None
    assert queue.backlog() == 0


def test_unacked_delivery_comes_back_to_another_consumer_after_the_timeout(
    settings: Settings,
) -> None:
    (request_id,) = cancelled_results(settings, 1)
    crashed = CallbackQueue("svc", settings=settings, visibility_timeout=1.0)
    survivor = CallbackQueue("svc", settings=settings, visibility_timeout=1.0)
    first = crashed.get(timeout=1)
    assert first is not None  # ...and the consumer dies without acking
    assert survivor.get(timeout=0.1) is None  # still invisible
    time.sleep(1.05)
    again = survivor.get(timeout=1)
    assert again is not None and again.redelivered
    assert again.result.request_id == request_id
    again.ack()
    assert survivor.get(timeout=0.4) is None


def test_iterating_yields_deliveries_across_the_queue(settings: Settings) -> None:
    ids = cancelled_results(settings, 4)
    queue = CallbackQueue("svc", settings=settings)
    seen = []
    for delivery in queue:
        seen.append(delivery.result.request_id)
        delivery.ack()
        if len(seen) == 4:
            break
    assert seen == ids


def test_queue_created_before_results_exist_still_gets_them(
    settings: Settings, redis_client: Redis
) -> None:
    queue = CallbackQueue("late", settings=settings)
    assert queue.get(timeout=0.1) is None
    producer = Producer(settings=settings)
    handle = producer.submit("m", MESSAGES, callback_queue="late")
    handle.cancel()
    delivery = queue.get(timeout=1)
    assert delivery is not None and delivery.result.request_id == handle.id


# --- Poison results: redelivery follows the PEL cursor, and gives up into a dead-letter stream

POISON_VT = 0.1  # visibility timeout (s) for the poison scenarios: short, to keep them fast


def pending_request_ids(client: Redis, key: str = "bb:cb:svc") -> list[str]:
    """Request ids of the entries still pending in the group, in stream order (from Redis)."""
    pending: Any = client.xpending_range(key, CALLBACK_GROUP, "-", "+", 1000)
    ids = []
    for row in pending:
        entry: Any = client.xrange(key, row["message_id"], row["message_id"])
        ids.append(Result.from_json(entry[0][1][b"result"]).request_id)
    return ids


def deliver_all_and_die(settings: Settings, n: int) -> None:
    """A consumer takes n results and dies holding them; wait until they are due again."""
    doomed = CallbackQueue("svc", settings=settings, visibility_timeout=POISON_VT)
    for _ in range(n):
        assert doomed.get(timeout=1) is not None
    doomed.close()
    time.sleep(POISON_VT)


def test_ten_poison_results_do_not_starve_the_results_behind_them(
    settings: Settings, redis_client: Redis
) -> None:
    # Given ten results at the head of the queue that every consumer fails on, five ordinary
    # ones behind them, all held by a consumer that died (dead-lettering out of the picture)
    settings = settings.model_copy(update={"callback_max_deliveries": 1000})
    ids = cancelled_results(settings, 15)
    poison = ids[:10]
    deliver_all_and_die(settings, 15)

    # When a consumer keeps taking results, working on each poison one for a while (long
    # enough that the first is due again before the tenth is done) and then failing it
    queue = CallbackQueue("svc", settings=settings, visibility_timeout=POISON_VT)
    for _ in range(40):
        if redis_client.xlen("bb:cb:svc") == len(poison):
            break
        delivery = queue.get(timeout=1)
        if delivery is None:
            continue
        if delivery.result.request_id in poison:
            time.sleep(POISON_VT / 4)  # ...and fails, without acking
        else:
            delivery.ack()
    queue.close()

    # Then every ordinary result was redelivered and acked; only the poison ones remain
    assert pending_request_ids(redis_client) == poison
    remaining: Any = redis_client.xrange("bb:cb:svc")
    assert [Result.from_json(f[b"result"]).request_id for _, f in remaining] == poison


def test_a_fresh_consumer_reaches_results_behind_ten_poison_ones_in_flight(
    settings: Settings, redis_client: Redis
) -> None:
    # Given ten poison results at the head, five ordinary ones behind, all due for redelivery
    settings = settings.model_copy(update={"callback_max_deliveries": 1000})
    ids = cancelled_results(settings, 15)
    poison = ids[:10]
    deliver_all_and_die(settings, 15)
    vt = 0.5  # long enough that ten crashes in a row fit in it

    # When every poison result crashes the consumer holding it, and a new one starts each time
    for _ in range(25):
        if redis_client.xlen("bb:cb:svc") == len(poison):
            break
        queue = CallbackQueue("svc", settings=settings, visibility_timeout=vt)
        while (delivery := queue.get(timeout=vt)) is not None:
            if delivery.result.request_id in poison:
                break  # the process dies here, without acking
            delivery.ack()
        queue.close()

    # Then a new consumer scanned past the ten in flight, and every ordinary result was acked
    assert redis_client.xlen("bb:cb:svc") == len(poison)
    assert pending_request_ids(redis_client) == poison


def test_a_result_delivered_too_often_moves_to_the_dead_letter_stream_once(
    settings: Settings, redis_client: Redis
) -> None:
    # Given a queue that hands a result out at most 3 times, one result no consumer can handle
    # and one ordinary result
    settings = settings.model_copy(update={"callback_max_deliveries": 3})
    poison_id, _ordinary_id = cancelled_results(settings, 2)
    handed_out: list[str] = []  # list.append is atomic: safe from both threads

    # When two consumers keep taking results concurrently, never acking the poison one
    def consume() -> None:
        queue = CallbackQueue("svc", settings=settings, visibility_timeout=0.05)
        deadline = time.monotonic() + 1.2
        while time.monotonic() < deadline:
            delivery = queue.get(timeout=0.1)
            if delivery is None:
                continue
            if delivery.result.request_id == poison_id:
                handed_out.append(delivery.delivery_id)
            else:
                delivery.ack()
        queue.close()

    assert run_at_once(consume, 2) == []

    # Then the poison result is in the dead-letter stream exactly once, and nowhere else
    assert redis_client.xlen("bb:cbdead:svc") == 1
    assert redis_client.xlen("bb:cb:svc") == 0
    assert redis_client.xpending("bb:cb:svc", CALLBACK_GROUP)["pending"] == 0
    entries: Any = redis_client.xrange("bb:cbdead:svc")
    fields = entries[0][1]
    assert fields[b"request_id"].decode() == poison_id
    assert fields[b"deliveries"] == b"3" and fields[b"reason"] == b"max_deliveries"
    assert Result.from_json(fields[b"result"]).request_id == poison_id
    # And it was handed out exactly the maximum number of times, never again after
    assert len(handed_out) == 3
    reader = CallbackQueue("svc", settings=settings)
    (letter,) = reader.dead_letters()
    reader.close()
    assert (letter.request_id, letter.deliveries, letter.status) == (poison_id, 3, "cancelled")
    assert letter.delivery_id == handed_out[0]


def run_cli(redis_url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHBRIDGE_")}
    env.update(BATCHBRIDGE_REDIS_URL=redis_url, BATCHBRIDGE_DATA_DIR=str(tmp_path))
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_lists_dead_lettered_results(
    settings: Settings, redis_url: str, tmp_path: Path
) -> None:
    # Given a result that was delivered once (the maximum) and never acked
    settings = settings.model_copy(update={"callback_max_deliveries": 1})
    (request_id,) = cancelled_results(settings, 1)
    deliver_all_and_die(settings, 1)
    queue = CallbackQueue("svc", settings=settings, visibility_timeout=POISON_VT)
    assert queue.get(timeout=0.3) is None  # due again: it moves to the dead-letter stream
    queue.close()

    # When an operator lists the queue's dead letters
    listed = run_cli(redis_url, tmp_path, "callbacks", "dead", "svc", "--json")
    table = run_cli(redis_url, tmp_path, "callbacks", "dead", "svc")

    # Then the result is shown with its request id, deliveries and status
    assert listed.returncode == 0, listed.stderr
    report = json.loads(listed.stdout)
    assert report["queue"] == "svc" and report["total"] == 1
    (row,) = report["dead"]
    assert (row["request_id"], row["deliveries"], row["status"]) == (request_id, 1, "cancelled")
    assert row["reason"] == "max_deliveries" and row["result"]["request_id"] == request_id
    assert table.returncode == 0, table.stderr
    assert request_id in "".join(table.stdout.split()) and "cancelled" in table.stdout


def test_cli_says_when_a_queue_has_no_dead_letters(redis_url: str, tmp_path: Path) -> None:
    # Given a queue nobody has used
    # When its dead letters are listed
    done = run_cli(redis_url, tmp_path, "callbacks", "dead", "nosuch")
    as_json = run_cli(redis_url, tmp_path, "callbacks", "dead", "nosuch", "--json")
    # Then the answer says so, and is not an error
    assert done.returncode == 0, done.stderr
    assert "no dead-lettered results in queue 'nosuch'" in done.stdout
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["total"] == 0


def test_cli_refuses_a_queue_name_no_request_could_use(redis_url: str, tmp_path: Path) -> None:
    # When the dead letters of a queue named as no request can name one are listed
    done = run_cli(redis_url, tmp_path, "callbacks", "dead", "bad queue!")
    # Then that is an error naming the rule, not an empty answer
    assert done.returncode == 2
    assert done.stderr.startswith("error: name must be a callback queue name")


def test_a_consumer_carries_on_after_redis_lost_its_group(
    redis_url: str, redis_client: Redis, tmp_path: Path
) -> None:
    # Given a consumer that has read its queue once (so it knows its group exists)
    settings = make_settings(redis_url, tmp_path)
    queue = CallbackQueue("svc-wiped", settings=settings, client=redis_client)
    assert queue.get(timeout=0.05) is None

    # When Redis is wiped and a result is delivered anew (as the reconciler does)
    redis_client.flushdb()
    redis_client.xadd(queue.key, {"result": b'{"request_id":"r1","status":"failed"}'})

    # Then the consumer makes its group again and gets the result
    delivery = queue.get(timeout=1.0)
    assert delivery is not None and delivery.result.request_id == "r1"


def test_a_wait_longer_than_the_socket_timeout_waits_instead_of_failing(
    settings: Settings, redis_url: str
) -> None:
    # Given a queue whose Redis client gives up on a socket read after one second (redis-py 8
    # does after five by default), and a result that arrives only after two seconds
    client = Redis.from_url(redis_url, socket_timeout=1.0)
    queue = CallbackQueue("slow", settings=settings, client=client)
    assert queue.get(timeout=0.1) is None  # creates the group
    late = threading.Timer(
        2.0,
        lambda: client.xadd(
            queue.key, {"result": Result(request_id="r1", status="completed").to_json()}
        ),
    )
    late.start()
    try:
        # When a consumer waits three seconds / Then it gets the result, no TimeoutError
        delivery = queue.get(timeout=3.0)
    finally:
        late.cancel()
        # The result lands the moment its XADD runs, possibly before that XADD's reply is
        # read: closing the client under the timer's thread would break that read.
        late.join()
        queue.close()
    assert delivery is not None and delivery.result.request_id == "r1"
