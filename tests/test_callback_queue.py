"""Callback queue scenarios: at-least-once delivery with ack and visibility timeout."""

from __future__ import annotations

import time

from redis import Redis

from producer import CallbackQueue, Producer
from shared.settings import Settings

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
