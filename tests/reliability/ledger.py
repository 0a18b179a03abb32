"""The ledger every reliability scenario ends with, counted from effects, never from logs.

Jepsen's total-queue checker, measured on what our users see:

- ``lost``: accepted by ``submit``, never delivered, and nothing in the system still holds
  it (neither Redis nor the record shows it in flight);
- ``duplicated``: a request with more than one entry appended to its callback stream (the
  stream is read with XRANGE and nobody consumes it, so every entry ever added is counted),
  or more than one distinct ``webhook-id`` for it at an endpoint;
- ``unexpected``: a delivery for a request nobody submitted, or to a queue it did not ask for;
- ``double_billed``: a request answered by more than one provider job, counted from the
  jobs' output files (a line in an error file, such as a rate limit, produced no tokens);
- ``stuck``: not delivered when the scenario's deadline passed, but still held somewhere;
- ``recovered``: work done again whose effect was deduplicated: a request that was in more
  than one provider job's input, or a webhook the receiver got more than once (same id),
  yet is delivered once. Reported, never a failure.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
from redis import Redis
from redis.client import Pipeline
from sqlalchemy import Engine, text

from producer import Result
from shared.providers.local import LocalStore
from shared.providers.local.records import BatchJob
from shared.redis_layout import Keys

FAILURES = ("lost", "duplicated", "unexpected", "double_billed", "stuck")


@dataclass(frozen=True)
class Ledger:
    """The counts of one scenario's end state."""

    accepted: int
    delivered: int  # callback stream entries for accepted requests, duplicates included
    lost: int = 0
    duplicated: int = 0
    unexpected: int = 0
    double_billed: int = 0
    stuck: int = 0
    recovered: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict, compare=False)

    @property
    def clean(self) -> bool:
        """True when every failure count is 0 (``recovered`` may be anything)."""
        return not any(getattr(self, name) for name in FAILURES)

    def counts(self) -> dict[str, int]:
        """The counts alone, as printed and committed to RESULTS.md."""
        return {k: v for k, v in asdict(self).items() if k != "examples"}

    def line(self) -> str:
        """One line for the scenario's output."""
        return " ".join(f"{k}={v}" for k, v in self.counts().items())


@dataclass
class Expected:
    """What was asked for: each accepted request's callback queue and webhook URL."""

    queues: dict[str, str] = field(default_factory=dict)
    webhooks: dict[str, str] = field(default_factory=dict)

    def add(self, request_id: str, queue: str, webhook_url: str | None = None) -> None:
        """Record one accepted request."""
        self.queues[request_id] = queue
        if webhook_url:
            self.webhooks[request_id] = webhook_url

    def forget(self, request_id: str) -> None:
        """Drop a request the system lost track of (it was submitted again under a new id)."""
        self.queues.pop(request_id, None)
        self.webhooks.pop(request_id, None)

    @property
    def ids(self) -> set[str]:
        """Every accepted request id."""
        return set(self.queues)


# (request id, endpoint URL, webhook-id) for each POST the receiver accepted (answered 2xx).
WebhookPosts = Callable[[], Iterable[tuple[str, str, str]]]


@dataclass
class LedgerSource:
    """Where a scenario's effects are: Redis, the provider's stores, the record, a receiver."""

    redis_url: str
    key_prefix: str
    stores: list[LocalStore]
    engine: Engine | None = None
    webhook_posts: WebhookPosts | None = None

    def ledger(self, expected: Expected) -> Ledger:
        """Count the effects against what was asked for."""
        client = Redis.from_url(self.redis_url)
        try:
            return self._ledger(client, expected)
        finally:
            client.close()

    def _ledger(self, client: Redis, expected: Expected) -> Ledger:
        keys = Keys(self.key_prefix)
        ids = expected.ids
        delivered: Counter[str] = Counter()
        examples: dict[str, list[str]] = {}
        unexpected: set[str] = set()
        for queue in sorted(set(expected.queues.values())):
            for _entry_id, fields in client.xrange(keys.callback(queue)):
                request_id = Result.from_json(fields[b"result"]).request_id
                if expected.queues.get(request_id) == queue:
                    delivered[request_id] += 1
                else:
                    unexpected.add(request_id)
        duplicated = {r for r, n in delivered.items() if n > 1}
        webhooked, webhook_dupes, webhook_repeats = self._webhooks(expected, unexpected)
        duplicated |= webhook_dupes
        billed, offered = self._billing()
        no_result = ids - delivered.keys()
        no_webhook = expected.webhooks.keys() - webhooked
        held = self._still_held(client, keys, no_result) | self._webhook_held(
            client, keys, no_webhook
        )
        recovered = {r for r in ids if offered[r] > 1 or r in webhook_repeats} - duplicated
        groups = {
            "lost": (no_result | no_webhook) - held,
            "duplicated": duplicated,
            "unexpected": unexpected,
            "double_billed": {r for r, n in billed.items() if n > 1},
            "stuck": held,
        }
        examples = {name: sorted(found)[:5] for name, found in groups.items() if found}
        return Ledger(
            accepted=len(ids),
            delivered=sum(delivered.values()),
            recovered=len(recovered),
            examples=examples,
            **{name: len(found) for name, found in groups.items()},
        )

    def _webhooks(
        self, expected: Expected, unexpected: set[str]
    ) -> tuple[set[str], set[str], set[str]]:
        """Requests whose webhook was accepted; with more than one webhook-id at an endpoint;
        and whose webhook was accepted more than once under the same id."""
        if self.webhook_posts is None:
            return set(), set(), set()
        ids_seen: dict[tuple[str, str], set[str]] = {}
        posts: Counter[tuple[str, str]] = Counter()
        for request_id, url, webhook_id in self.webhook_posts():
            if expected.webhooks.get(request_id) != url:
                unexpected.add(request_id)
                continue
            ids_seen.setdefault((request_id, url), set()).add(webhook_id)
            posts[(request_id, url)] += 1
        dupes = {r for (r, _), seen in ids_seen.items() if len(seen) > 1}
        repeats = {key[0] for key, n in posts.items() if n > len(ids_seen[key])}
        return {key[0] for key in ids_seen}, dupes, repeats

    def _billing(self) -> tuple[Counter[str], Counter[str]]:
        """Per request: the jobs that billed it, and the jobs it was offered to."""
        billed: Counter[str] = Counter()
        offered: Counter[str] = Counter()
        for store in self.stores:
            for job in store.list_jobs():
                offered.update(set(_custom_ids(store, job.input_file_id)))
                billed.update(_billed_by(store, job))
        return billed, offered

    def _still_held(self, client: Redis, keys: Keys, undelivered: set[str]) -> set[str]:
        """Those of ``undelivered`` that Redis or the record still shows in flight."""
        return self._held(
            client,
            undelivered,
            lambda pipe, request_id: pipe.hget(keys.request(request_id), "state"),
            lambda state: state in (b"pending", b"batched"),
            "SELECT id FROM requests WHERE state IN ('batched', 'requeued')",
        )

    def _webhook_held(self, client: Redis, keys: Keys, unsent: set[str]) -> set[str]:
        """Those of ``unsent`` whose webhook still waits in the outbox or the record."""
        return self._held(
            client,
            unsent,
            lambda pipe, request_id: pipe.exists(keys.webhook(request_id)),
            bool,
            "SELECT request_id FROM webhook_deliveries WHERE state = 'pending'",
        )

    def _held(
        self,
        client: Redis,
        ids: set[str],
        ask: Callable[[Pipeline, str], object],
        holds: Callable[[Any], bool],
        in_record: str,
    ) -> set[str]:
        """Those of ``ids`` for which Redis answers ``ask`` as ``holds`` says, or which the
        record's ``in_record`` query (one id column) lists."""
        if not ids:
            return set()
        order = sorted(ids)
        pipe = client.pipeline(transaction=False)
        for request_id in order:
            ask(pipe, request_id)
        held = {r for r, reply in zip(order, pipe.execute(), strict=True) if holds(reply)}
        if self.engine is not None:
            with self.engine.connect() as conn:
                held |= {row[0] for row in conn.execute(text(in_record))} & ids
        return held


def _billed_by(store: LocalStore, job: BatchJob) -> set[str]:
    """The requests ``job`` billed: those it answered, which are the lines of its output file.

    A line in an error file (a rate limit, a bad request) produced no tokens. A job that says
    COMPLETED but names no output file answered nothing anyone can see; the worker sends its
    requests round once as not run (README: "No re-run on a hunch"), so it bills nothing here.
    """
    return set(_custom_ids(store, job.output_file_id)) if job.output_file_id else set()


def _custom_ids(store: LocalStore, file_id: str) -> Iterable[str]:
    try:
        path = store.file_path(file_id)
    except Exception:  # a deleted file bills nothing we can see; keep_provider_files keeps them
        return
    with path.open("rb") as lines:
        for line in lines:
            if line.strip():
                yield orjson.loads(line)["custom_id"]


def settle(
    source: LedgerSource, expected: Expected, *, deadline: float, quiet: float = 3.0
) -> Ledger:
    """The ledger once nothing is undelivered or ``deadline`` (monotonic) passed, plus a quiet
    spell in which any late duplicate would be appended."""
    while time.monotonic() < deadline:
        ledger = source.ledger(expected)
        if not (ledger.lost or ledger.stuck):
            break
        time.sleep(1.0)
    time.sleep(quiet)
    return source.ledger(expected)


def report(name: str, ledger: Ledger, extra: Mapping[str, object] | None = None) -> str:
    """Print the scenario's ledger (pytest -s shows it; RESULTS.md records it)."""
    tail = "".join(f" {k}={v}" for k, v in (extra or {}).items())
    line = f"LEDGER {name}: {ledger.line()}{tail}"
    if ledger.examples:
        line += f" examples={ledger.examples}"
    print(line, flush=True)
    return line
