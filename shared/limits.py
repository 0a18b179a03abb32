"""Hard limits of the providers' Batch APIs (Together's, which the local provider mirrors)."""

from __future__ import annotations

TOGETHER_MAX_BATCH_REQUESTS = 50_000
TOGETHER_MAX_BATCH_BYTES = 100 * 1_000_000
MAX_CUSTOM_ID_CHARS = 64
BATCH_ENDPOINT = "/v1/chat/completions"
