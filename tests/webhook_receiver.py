"""A real HTTP webhook receiver for tests: scripted answers, every delivery recorded.

Each path answers from its own script (a list of answers used in turn, the last one
repeated); an answer is a status code, a (status, headers) pair, or ``HANG`` (never answer).
Every request is recorded with its headers, body and arrival time, and verified with the
reference ``standardwebhooks`` package when the receiver has a secret.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

HANG = "hang"
Answer = int | tuple[int, dict[str, str]] | str


@dataclass
class Delivery:
    """One request that reached the receiver."""

    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    verified: bool

    @property
    def webhook_id(self) -> str:
        """The ``webhook-id`` header."""
        return self.headers["webhook-id"]

    def event(self) -> dict[str, Any]:
        """The JSON event."""
        parsed: dict[str, Any] = orjson.loads(self.body)
        return parsed


@dataclass
class Receiver:
    """The receiver's state: its base URL, scripts and everything it received."""

    url: str
    secrets: list[str]
    scripts: dict[str, list[Answer]] = field(default_factory=dict)
    received: list[Delivery] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    release: threading.Event = field(default_factory=threading.Event)

    def script(self, path: str, *answers: Answer) -> str:
        """Answer requests to ``path`` with ``answers`` in turn; returns its full URL."""
        self.scripts[path] = list(answers)
        return self.url + path

    def at(self, path: str) -> list[Delivery]:
        """Deliveries that reached ``path``, in order."""
        with self.lock:
            return [d for d in self.received if d.path == path]

    def _answer(self, path: str, seen_before: int) -> Answer:
        answers = self.scripts.get(path) or [200]
        return answers[min(seen_before, len(answers) - 1)]

    def verify(self, headers: dict[str, str], body: bytes) -> bool:
        """Whether every configured secret's reference verifier accepts the delivery."""
        if not self.secrets:
            return False
        try:
            for secret in self.secrets:
                Webhook(secret).verify(body, headers)
        except WebhookVerificationError:
            return False
        return True


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        # A sender killed mid-connection (the crash tests do it) resets it: not a receiver bug.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


@contextmanager
def serve_receiver(*secrets: str) -> Iterator[Receiver]:
    """Run a receiver on 127.0.0.1 (a free port) until the block ends."""
    receiver: Receiver

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            headers = {k.lower(): v for k, v in self.headers.items()}
            with receiver.lock:
                seen_before = sum(1 for d in receiver.received if d.path == self.path)
                receiver.received.append(
                    Delivery(self.path, headers, body, time.time(), receiver.verify(headers, body))
                )
                answer = receiver._answer(self.path, seen_before)
            if answer == HANG:
                receiver.release.wait(120)
                return
            status, extra = answer if isinstance(answer, tuple) else (int(answer), {})
            self.send_response(status)
            for name, value in extra.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = _Server(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    receiver = Receiver(f"http://127.0.0.1:{server.server_address[1]}", list(secrets))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)
