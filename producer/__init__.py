"""The client library services import to push single requests and receive their results."""

from producer.aio import AsyncProducer, AsyncRequestHandle
from producer.aio_callback_queue import AsyncCallbackQueue, AsyncDelivery
from producer.callback_queue import CallbackQueue, Delivery
from producer.client import PartialSubmitError, Producer, RequestHandle
from shared.schemas import ErrorInfo, IdempotencyConflict, InvalidRequest, Result

__all__ = [
    "AsyncCallbackQueue",
    "AsyncDelivery",
    "AsyncProducer",
    "AsyncRequestHandle",
    "CallbackQueue",
    "Delivery",
    "ErrorInfo",
    "IdempotencyConflict",
    "InvalidRequest",
    "PartialSubmitError",
    "Producer",
    "RequestHandle",
    "Result",
]
