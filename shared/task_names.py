"""Celery task and queue names, shared so producers can wake workers without importing them."""

from __future__ import annotations

QUEUE = "batchbridge"
AGGREGATE = "batchbridge.aggregate"
SUBMIT = "batchbridge.submit"
POLL = "batchbridge.poll"
COLLECT = "batchbridge.collect"
REAP = "batchbridge.reap"
RECONCILE = "batchbridge.reconcile"
WEBHOOKS = "batchbridge.webhooks"
LOCAL_RUN = "batchbridge.local_provider.run"
LOCAL_SWEEP = "batchbridge.local_provider.sweep"
