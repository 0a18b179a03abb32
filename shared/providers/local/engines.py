"""Engines that answer one chat-completion request for the local provider."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Protocol

import orjson

DRY_RUN_FINGERPRINT = "batchbridge-echo-dry-run"
_ECHO_WORDS = 8


class LineError(Exception):
    """A single request failed; it goes to the batch's error file, not the whole job."""

    def __init__(self, code: str, message: str, retryable: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable


class Engine(Protocol):
    """Turns one request body into a ``chat.completion`` body, or raises LineError."""

    def complete(self, body: dict[str, object], custom_id: str) -> dict[str, object]:
        """Answer one request."""
        ...


class EchoEngine:
    """A model-free, deterministic dry run: it answers with the first words of the prompt.

    The same ``custom_id`` and body always give byte-identical output (``created`` is 0 and
    the id is a hash), so reruns of a batch can be compared directly.
    """

    def complete(self, body: dict[str, object], custom_id: str) -> dict[str, object]:
        """Echo the start of the last user message as the assistant's answer."""
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise LineError("invalid_request", "body.model must be a non-empty string")
        texts = _message_texts(body.get("messages"))
        max_tokens = _max_tokens(body)
        prompt = texts[-1][1]
        prompt_chars = 0
        for role, text in texts:
            prompt_chars += len(text)
            if role == "user":
                prompt = text
        limit = _ECHO_WORDS if max_tokens is None else min(_ECHO_WORDS, max_tokens)
        # maxsplit keeps long prompts cheap; a leftover element means words were cut off.
        words = prompt.split(maxsplit=limit)
        answer = words[:limit]
        truncated = limit < _ECHO_WORDS and len(words) > limit
        prompt_tokens = max(1, math.ceil(prompt_chars / 4))
        completion_tokens = len(answer)
        return {
            "id": _completion_id(custom_id, body),
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "system_fingerprint": DRY_RUN_FINGERPRINT,
            "dry_run": True,
            "prompt": [],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": " ".join(answer)},
                    "finish_reason": "length" if truncated else "stop",
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }


ENGINES: dict[str, Callable[[], Engine]] = {"echo": EchoEngine}


def get_engine(name: str) -> Engine:
    """Build the engine called ``name``; raises ValueError naming the allowed ones."""
    try:
        return ENGINES[name]()
    except KeyError:
        allowed = ", ".join(sorted(ENGINES))
        raise ValueError(f"unknown local engine {name!r}; allowed: {allowed}") from None


def _message_texts(messages: object) -> list[tuple[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise LineError("invalid_request", "messages must be a non-empty list")
    texts: list[tuple[str, str]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise LineError("invalid_request", f"messages[{index}] must be an object with a role")
        texts.append((message["role"], _content_text(message.get("content"))))
    return texts


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    # OpenAI-style content parts: only the text parts count.
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict)]
        return " ".join(p for p in parts if isinstance(p, str))
    return ""


def _max_tokens(body: dict[str, object]) -> int | None:
    value = body.get("max_tokens", body.get("max_completion_tokens"))
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise LineError("invalid_request", "max_tokens must be a non-negative integer")
    return value


def _completion_id(custom_id: str, body: dict[str, object]) -> str:
    digest = hashlib.sha256(custom_id.encode())
    digest.update(b"\0")
    digest.update(orjson.dumps(body, option=orjson.OPT_SORT_KEYS))
    return f"echo-{digest.hexdigest()[:32]}"
