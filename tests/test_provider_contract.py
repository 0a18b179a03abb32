"""One contract for every way batchbridge (or a user) talks to a Batch API.

The same scenarios run against three targets:

- ``local``: ``LocalProvider`` in process, each created job run by ``run_job`` in a thread, as
  the worker's task would run it;
- ``together``: ``TogetherProvider`` over HTTP to the local Together-compatible API;
- ``sdk``: the official SDK calls of Together's documented workflow, to the same API, behind a
  thin test adapter (``SdkWorkflow``) so that one test body drives all three.

Each test gets a fresh store (and server) in its own temporary directory. Statuses are
compared as ``ProviderBatchStatus``: the providers' own mapping, and for the SDK a lookup by
name (Together's spellings are the members' names), so an unexpected value fails loudly.
"""

from __future__ import annotations

import re
import shutil
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
import pytest
import together
import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from together import Together
from together.types import BatchJob as SdkBatchJob

from shared.providers.base import BatchProvider, ProviderBatch, ProviderBatchStatus, ProviderError
from shared.providers.local import EchoEngine, Faults, LocalProvider, LocalStore, run_job
from shared.providers.local.api import create_app
from shared.providers.together import TogetherProvider

pytestmark = pytest.mark.timeout(60)

MODEL = "meta-llama/Llama-3.3-70B-Instruct-Turbo"
API_KEY = "contract-key-0123456789"
KINDS = ("local", "together", "sdk")
REQUEST_ID = re.compile(r"^br_[A-Za-z0-9_-]{43}$")
T = TypeVar("T")


# The SDK target: a literal transcription of Together's documented workflow


class SdkWorkflow:
    """The raw SDK calls a user writes, exposed as the operations the other targets have.

    No retries and no error mapping: SDK exceptions reach the test as the user would see them.
    """

    name = "sdk"

    def __init__(self, client: Together) -> None:
        self.client = client

    def upload_file(self, path: Path) -> str:
        return self.client.files.upload(file=path, purpose="batch-api", check=False).id

    def create_batch(self, input_file_id: str, *, model: str) -> ProviderBatch:
        # The documented workflow names no model: Together takes it from each line's body.
        created = self.client.batches.create(
            input_file_id=input_file_id, endpoint="/v1/chat/completions"
        )
        assert created.job is not None and created.job.id, f"not created: {created.warning}"
        return from_sdk(created.job)

    def get_batch(self, batch_id: str) -> ProviderBatch:
        return from_sdk(self.client.batches.retrieve(batch_id))

    def cancel_batch(self, batch_id: str) -> ProviderBatch:
        return from_sdk(self.client.batches.cancel(batch_id))

    def list_batches(self) -> list[ProviderBatch]:
        return [from_sdk(job) for job in self.client.batches.list()]

    def file_exists(self, file_id: str) -> bool:
        try:
            self.client.files.retrieve(file_id)
        except together.NotFoundError:
            return False
        return True

    def download_file(self, file_id: str, dest: Path) -> None:
        with (
            self.client.files.with_streaming_response.content(id=file_id) as response,
            open(dest, "wb") as out,
        ):
            for chunk in response.iter_bytes():
                out.write(chunk)

    def delete_file(self, file_id: str) -> None:
        # What a user cleaning up writes: a file that is already gone is not an error.
        try:
            self.client.files.delete(file_id)
        except together.NotFoundError:
            return


def from_sdk(job: SdkBatchJob) -> ProviderBatch:
    """The SDK's BatchJob in the assertions' terms (a KeyError on an unexpected status)."""
    return ProviderBatch(
        id=str(job.id),
        status=ProviderBatchStatus[str(job.status)],
        raw_status=str(job.status),
        input_file_id=str(job.input_file_id),
        output_file_id=job.output_file_id,
        error_file_id=job.error_file_id,
        error=job.error,
        progress=job.progress or 0.0,
        model=job.x_model_id,
        created_at=job.created_at,
        completed_at=job.completed_at,
    )


# Targets: a server or an in-process provider, fresh per test


class StatusRecorder:
    """ASGI middleware noting every response, to see the injected failures the SDK hid."""

    def __init__(self, app: ASGIApp, responses: list[tuple[str, int]]) -> None:
        self.app = app
        self.responses = responses

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def record(message: Message) -> None:
            if message["type"] == "http.response.start":
                call = f"{scope['method']} {scope['path']}"
                self.responses.append((call, int(message["status"])))
            await send(message)

        await self.app(scope, receive, record)


class ApiServer:
    """The local API under uvicorn on a free loopback port, in a background thread."""

    def __init__(self, root: Path, faults: Faults, responses: list[tuple[str, int]]) -> None:
        app = StatusRecorder(create_app(root, api_key=API_KEY, faults=faults), responses)
        # Bound here and handed to uvicorn, so no other process can take the port meanwhile.
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._healthy():
            assert self._thread.is_alive(), "the local API crashed on startup"
            assert time.monotonic() < deadline, "the local API did not become ready"
            time.sleep(0.02)

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        # Shutdown also stops the server's job threads (running jobs are given up).
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._sock.close()
        assert not self._thread.is_alive(), "the local API did not stop"


class ThreadedDispatch:
    """``LocalProvider``'s dispatch: each job runs with ``run_job`` in its own thread."""

    def __init__(self, store: LocalStore, faults: Faults) -> None:
        self.store = store
        self.faults = faults
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __call__(self, job_id: str) -> None:
        thread = threading.Thread(
            target=run_job,
            args=(self.store, job_id, EchoEngine()),
            kwargs={"faults": self.faults, "stop": self._stop},
            daemon=True,
        )
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        # ``stop`` makes a running job give up at its next line, so the joins are quick.
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
            assert not thread.is_alive(), "a local job thread did not stop"


@dataclass
class Target:
    """One target: the operations under test, and the store behind them (for side effects)."""

    kind: str
    provider: BatchProvider
    store: LocalStore
    workdir: Path
    server: ApiServer | None = None
    # ("METHOD /path", status) of every response the server sent, SDK retries included
    # (always empty for ``local``).
    responses: list[tuple[str, int]] = field(default_factory=list)
    faults: Faults = field(default_factory=Faults)


class TargetFactory:
    """Makes targets of one kind; ``close`` stops every server, thread and client it made."""

    def __init__(self, kind: str, workdir: Path) -> None:
        self.kind = kind
        self.workdir = workdir
        self._cleanups: list[Callable[[], None]] = []

    def __call__(
        self, faults: Faults | None = None, *, max_retries: int = 2, timeout: float = 30.0
    ) -> Target:
        """A fresh target; ``timeout`` is the client's (for ``local``, LocalProvider's)."""
        faults = faults or Faults()
        root = self.workdir / f"{self.kind}-{len(self._cleanups)}"
        if self.kind == "local":
            store = LocalStore(root)
            dispatch = ThreadedDispatch(store, faults)
            self._cleanups.append(dispatch.stop)
            local = LocalProvider(store, dispatch=dispatch, faults=faults, timeout=timeout)
            return Target(self.kind, local, store, self.workdir, faults=faults)
        responses: list[tuple[str, int]] = []
        server = ApiServer(root, faults, responses)
        self._cleanups.append(server.stop)
        provider = self.client(server, API_KEY, max_retries=max_retries, timeout=timeout)
        store = LocalStore(root)
        return Target(self.kind, provider, store, self.workdir, server, responses, faults)

    def client(
        self, server: ApiServer, api_key: str, *, max_retries: int = 2, timeout: float = 30.0
    ) -> BatchProvider:
        """Another client of ``server``, e.g. with a wrong key."""
        if self.kind == "together":
            provider = TogetherProvider(
                api_key=api_key, base_url=server.url, max_retries=max_retries, timeout=timeout
            )
            self._cleanups.append(provider.close)
            return provider
        sdk = Together(
            api_key=api_key, base_url=server.url, max_retries=max_retries, timeout=timeout
        )
        self._cleanups.append(sdk.close)
        return SdkWorkflow(sdk)

    def patient(self, target: Target) -> BatchProvider:
        """Another client of ``target`` whose timeout outlasts any answer_delay of the tests."""
        if target.server is None:
            # Same store and faults, no dispatch: it only looks at what the first one did.
            return LocalProvider(target.store, faults=target.faults, timeout=None)
        return self.client(target.server, API_KEY, timeout=30.0)

    def close(self) -> None:
        # Clients first (in reverse), so the servers see no open connections when stopping.
        for cleanup in reversed(self._cleanups):
            cleanup()


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A temporary directory removed after the test (pytest's tmp_path keeps old ones)."""
    path = Path(tempfile.mkdtemp(prefix="provider-contract-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=KINDS)
def make_target(request: pytest.FixtureRequest, workdir: Path) -> Iterator[TargetFactory]:
    """``make_target(faults=Faults(...), max_retries=...)`` for each of the three targets."""
    factory = TargetFactory(request.param, workdir)
    try:
        yield factory
    finally:
        factory.close()


# Helpers


def request(custom_id: str, text: str, model: str = MODEL) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 16}
    return {"custom_id": custom_id, "body": body}


def requests(n: int) -> list[dict[str, Any]]:
    return [request(f"req-{i:03d}", f"item {i} is this spam or ham") for i in range(n)]


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(record) + b"\n" for record in records))
    return path


def custom_ids(records: Iterable[dict[str, Any]]) -> Counter[str]:
    return Counter(str(record["custom_id"]) for record in records)


def submit(target: Target, records: Iterable[dict[str, Any]], name: str = "in.jsonl") -> str:
    path = write_jsonl(target.workdir / name, records)
    return target.provider.create_batch(target.provider.upload_file(path), model=MODEL).id


def wait_until(
    target: Target,
    batch_id: str,
    done: Callable[[ProviderBatch], bool],
    failures: list[int] | None = None,
) -> list[ProviderBatch]:
    """Poll until ``done``; returns every state seen, the last one satisfying ``done``.

    With ``failures``, a poll failing retryably is retried (and noted there).
    """
    get = partial(target.provider.get_batch, batch_id)
    seen: list[ProviderBatch] = []
    deadline = time.monotonic() + 30
    while not seen or not done(seen[-1]):
        assert time.monotonic() < deadline, f"batch stuck at {seen[-1] if seen else None}"
        if seen:
            time.sleep(0.02)
        seen.append(get() if failures is None else retrying(target, get, failures))
    return seen


def finished(target: Target, batch_id: str, failures: list[int] | None = None) -> ProviderBatch:
    return wait_until(target, batch_id, lambda batch: batch.status.is_terminal, failures)[-1]


def download(target: Target, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None, "a finished batch has both an output and an error file"
    dest = target.workdir / f"download-{file_id}.jsonl"
    target.provider.download_file(file_id, dest)
    return [orjson.loads(line) for line in dest.read_bytes().splitlines() if line.strip()]


def results(target: Target, batch: ProviderBatch) -> tuple[list[Any], list[Any]]:
    return download(target, batch.output_file_id), download(target, batch.error_file_id)


SDK_ERRORS: dict[int, type[together.APIStatusError]] = {
    401: together.AuthenticationError,
    404: together.NotFoundError,
    429: together.RateLimitError,
    500: together.InternalServerError,
}


def refusal(kind: str, exc: BaseException) -> tuple[bool, int | None]:
    """A failed call as ``(retryable, HTTP status)``, checking each target's own error type."""
    if kind == "sdk":
        assert isinstance(exc, together.APIStatusError), repr(exc)
        status = exc.status_code
        # together 3.1.1's files.upload (UploadManager.get_upload_url) re-raises every status
        # but 401 and 409 as a bare APIStatusError, so users must look at its status_code.
        bare_upload_error = type(exc) is together.APIStatusError and str(exc).startswith(
            "Unexpected error raised by endpoint"
        )
        assert isinstance(exc, SDK_ERRORS.get(status, ())) or bare_upload_error, repr(exc)
        # What an SDK user retries: what the SDK itself retries (429 and 5xx), never a 4xx.
        return status == 429 or status >= 500, status
    assert isinstance(exc, ProviderError), repr(exc)
    if exc.retryable:
        # The worker waits this long before trying again (the server sends 50 ms).
        assert exc.retry_after is not None and exc.retry_after > 0
    return exc.retryable, exc.status_code


def refused(target: Target, call: Callable[[], object]) -> tuple[bool, int | None]:
    with pytest.raises((ProviderError, together.APIError)) as info:
        call()
    return refusal(target.kind, info.value)


def retrying(target: Target, call: Callable[[], T], failures: list[int]) -> T:
    """Call again after a retryable failure, as the worker does on its next beat."""
    for _ in range(20):
        try:
            return call()
        except (ProviderError, together.APIError) as exc:
            retryable, status = refusal(target.kind, exc)
            assert retryable, f"a permanent failure: {exc!r}"
            failures.append(status or 0)
    raise AssertionError(f"still failing after 20 attempts: {failures}")


# 1-3: the workflow


def test_a_batch_completes_with_every_custom_id_once_in_togethers_shape(
    make_target: TargetFactory,
) -> None:
    # Given 150 requests, three of which the engine cannot answer (no messages)
    target = make_target()
    inputs = requests(150)
    for i in (5, 70, 140):
        inputs[i]["body"]["messages"] = []
    path = write_jsonl(target.workdir / "in.jsonl", inputs)

    # When they are uploaded, run as a batch, polled to the end and both files downloaded
    file_id = target.provider.upload_file(path)
    batch = finished(target, target.provider.create_batch(file_id, model=MODEL).id)
    output, errors = results(target, batch)

    # Then the batch COMPLETED for the requested model, over the uploaded file
    assert (batch.status, batch.progress) == (ProviderBatchStatus.COMPLETED, 100.0)
    assert (batch.model, batch.input_file_id) == (MODEL, file_id)
    # And every custom_id appears exactly once across the output and error files
    assert custom_ids(output) + custom_ids(errors) == custom_ids(inputs)
    assert custom_ids(errors) == Counter({"req-005": 1, "req-070": 1, "req-140": 1})
    for line in errors:
        assert set(line) == {"custom_id", "error"}
        assert set(line["error"]) == {"message", "code"}
    # And output lines have Together's shape
    for line in output:
        assert set(line) == {"id", "custom_id", "response"}
        assert REQUEST_ID.match(line["id"]), line["id"]
        assert line["response"]["status_code"] == 200
        body = line["response"]["body"]
        assert body["model"] == MODEL
        # The echo engine answers with the prompt's first words: each answer belongs to the
        # request of the same custom_id, so results can be joined on it.
        number = int(line["custom_id"].removeprefix("req-"))
        assert body["choices"][0]["message"]["content"] == f"item {number} is this spam or ham"
        usage = body["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    # And the output is not in input order (clients must join on custom_id, never on order)
    order = [record["custom_id"] for record in inputs if record["custom_id"] in custom_ids(output)]
    assert [line["custom_id"] for line in output] != order


def test_list_batches_shows_a_new_batch_with_its_input_file(make_target: TargetFactory) -> None:
    # Given two batches just created (a worker whose create timed out looks for its own)
    target = make_target()
    paths = [write_jsonl(target.workdir / f"in-{n}.jsonl", requests(20)) for n in range(2)]
    file_ids = [target.provider.upload_file(path) for path in paths]
    batch_ids = [target.provider.create_batch(file_id, model=MODEL).id for file_id in file_ids]

    # When the batches are listed at once, before they finish
    listed = {batch.id: batch for batch in target.provider.list_batches()}

    # Then each is there under its input file id, so a create that happened can be found
    assert set(listed) == set(batch_ids)
    assert [listed[batch_id].input_file_id for batch_id in batch_ids] == file_ids


def test_cancelling_a_running_batch_keeps_the_lines_done_so_far(
    make_target: TargetFactory,
) -> None:
    # Given a slow batch (200 lines, ~3 s; progress is saved about every 0.5 s) under way
    target = make_target(Faults(line_delay=0.015))
    inputs = requests(200)
    batch_id = submit(target, inputs)
    wait_until(target, batch_id, lambda batch: batch.progress > 0)

    # When it is cancelled and polled to the end
    target.provider.cancel_batch(batch_id)
    batch = finished(target, batch_id)

    # Then it is CANCELLED, with the lines done so far and no custom_id twice
    assert batch.status is ProviderBatchStatus.CANCELLED
    assert 0 < batch.progress < 100
    output, errors = results(target, batch)
    done = custom_ids(output) + custom_ids(errors)
    assert 0 < len(output) < len(inputs)
    assert set(done.values()) == {1}
    assert set(done) <= set(custom_ids(inputs))


# 4: validation


def _raw(record: dict[str, Any]) -> bytes:
    return orjson.dumps(record) + b"\n"


@pytest.mark.parametrize(
    ("bad_line", "rule"),
    [
        (_raw(request("req-003", "again")), ["line 11: duplicate custom_id 'req-003'"]),
        (
            _raw(request("odd", "x", model="other/model")),
            ["line 11: model 'other/model' differs", "exactly one model"],
        ),
        (_raw(request("c" * 65, "x")), ["line 11: custom_id is 65 characters", "limit of 64"]),
        (b'{"custom_id": "cut", "body": {\n', ["line 11: not valid JSON"]),
    ],
    ids=["duplicate-custom-id", "two-models", "custom-id-over-64", "not-json"],
)
def test_an_invalid_file_fails_the_batch_naming_the_rule(
    make_target: TargetFactory, bad_line: bytes, rule: list[str]
) -> None:
    # Given 20 good lines with one breaking a rule in the middle (Together checks the rules
    # while VALIDATING, after the create, not at upload)
    target = make_target()
    good = [_raw(record) for record in requests(20)]
    path = target.workdir / "in.jsonl"
    path.write_bytes(b"".join([*good[:10], bad_line, *good[10:]]))

    # When it is submitted as a batch
    batch = finished(
        target, target.provider.create_batch(target.provider.upload_file(path), model=MODEL).id
    )

    # Then the batch FAILED with an error naming the rule and the line
    assert batch.status is ProviderBatchStatus.FAILED
    assert batch.error is not None
    assert [part for part in rule if part not in batch.error] == [], batch.error


# 5: authentication


def test_a_wrong_key_is_refused_for_good_and_creates_nothing(make_target: TargetFactory) -> None:
    if make_target.kind == "local":
        pytest.skip("LocalProvider runs in process and has no API key to get wrong")
    # Given a server, a file uploaded with the right key, and a client with a wrong key
    target = make_target()
    assert target.server is not None
    file_id = target.provider.upload_file(write_jsonl(target.workdir / "in.jsonl", requests(20)))
    intruder = make_target.client(target.server, "wrong-key")

    # When it calls the API, then every call is refused with a permanent 401
    calls: list[Callable[[], object]] = [
        lambda: intruder.upload_file(target.workdir / "in.jsonl"),
        lambda: intruder.create_batch(file_id, model=MODEL),
        intruder.list_batches,
    ]
    for call in calls:
        assert refused(target, call) == (False, 401)
    # And nothing was created: no batch, and no file but the right key's
    assert target.provider.list_batches() == []
    assert [stored.id for stored in target.store.list_files()] == [file_id]


# 6: fault injection


def test_fail_rate_1_fails_every_call_retryably_and_changes_nothing(
    make_target: TargetFactory,
) -> None:
    # Given a target failing every call (ids that exist nowhere: a 404 would mean no fault)
    target = make_target(Faults(fail_rate=1.0, seed=1))
    provider = target.provider
    path = write_jsonl(target.workdir / "in.jsonl", requests(20))
    file_id, batch_id = (
        "file-5b5dc7a5-b96d-4d30-945d-6a98c53db070",
        "5b5dc7a5-b96d-4d30-945d-6a98c53db070",
    )
    calls: dict[str, Callable[[], object]] = {
        "upload": lambda: provider.upload_file(path),
        "create": lambda: provider.create_batch(file_id, model=MODEL),
        "get": lambda: provider.get_batch(batch_id),
        "cancel": lambda: provider.cancel_batch(batch_id),
        "list": provider.list_batches,
        "file_exists": lambda: provider.file_exists(file_id),
        "download": lambda: provider.download_file(file_id, target.workdir / "out.jsonl"),
        "delete_file": lambda: provider.delete_file(file_id),
    }

    # When each operation is called, then it fails with a retryable 429 or 500
    outcomes = {name: refused(target, call) for name, call in calls.items()}
    assert {name: retryable for name, (retryable, _) in outcomes.items()} == dict.fromkeys(
        calls, True
    )
    assert {status for _, status in outcomes.values()} <= {429, 500}
    # And a failed call touched nothing
    assert (target.store.list_files(), target.store.list_jobs()) == ([], [])


def test_fail_rate_0_3_the_whole_workflow_still_succeeds(make_target: TargetFactory) -> None:
    # Given a target failing 30% of calls. Seed 40 makes the first create attempt fail on
    # every target, so "one batch only" below is really put to the test. The SDK-based
    # clients get max_retries=6: a call then fails only if 7 attempts in a row do (0.3**7 ~
    # 2e-4) instead of 3 (0.3**3 ~ 3%) with the default 2, which over the ~30 calls of a run
    # would fail most runs. What the SDK does not absorb (for ``local``, every failure) is
    # retried as the worker does.
    target = make_target(Faults(fail_rate=0.3, seed=40), max_retries=6)
    provider = target.provider
    inputs = requests(40)
    path = write_jsonl(target.workdir / "in.jsonl", inputs)
    failures: list[int] = []

    # When the whole workflow runs
    file_id = retrying(target, partial(provider.upload_file, path), failures)
    before_create = len(failures)
    batch_id = retrying(target, partial(provider.create_batch, file_id, model=MODEL), failures).id
    create_failures = failures[before_create:]
    batch = finished(target, batch_id, failures)
    output, errors = (
        retrying(target, partial(download, target, file_id), failures)
        for file_id in (batch.output_file_id, batch.error_file_id)
    )

    # Then it succeeded with every line once, although calls failed along the way
    assert batch.status is ProviderBatchStatus.COMPLETED
    assert (custom_ids(output), errors) == (custom_ids(inputs), [])
    # And a create was refused at least once (to the test, or to the SDK which retried it)
    create_failures += [
        status
        for call, status in target.responses
        if call == "POST /v1/batches" and status in (429, 500)
    ]
    assert create_failures, "no create failed: the seed no longer tests for duplicates"
    # Yet there is one batch only: a failed call has no side effects
    assert [job.id for job in target.store.list_jobs()] == [batch_id]
    assert [job.id for job in retrying(target, provider.list_batches, failures)] == [batch_id]


def test_line_error_rate_1_sends_every_line_to_the_error_file(make_target: TargetFactory) -> None:
    # Given a target failing every line
    target = make_target(Faults(line_error_rate=1.0, seed=3))
    inputs = requests(30)

    # When a batch runs
    batch = finished(target, submit(target, inputs))
    output, errors = results(target, batch)

    # Then it COMPLETED, with no output and every line once as a retryable rate_limit error
    assert batch.status is ProviderBatchStatus.COMPLETED
    assert output == []
    assert custom_ids(errors) == custom_ids(inputs)
    assert {line["error"]["code"] for line in errors} == {"rate_limit"}


def test_expire_after_expires_a_running_batch_with_partial_output(
    make_target: TargetFactory,
) -> None:
    # Given a batch needing ~2 s that expires 0.5 s after it starts
    target = make_target(Faults(expire_after=0.5, line_delay=0.01))
    inputs = requests(200)

    # When it runs to the end
    batch = finished(target, submit(target, inputs))

    # Then it EXPIRED, keeping the lines done before the deadline, each once
    assert batch.status is ProviderBatchStatus.EXPIRED
    assert batch.progress < 100
    output, errors = results(target, batch)
    done = custom_ids(output) + custom_ids(errors)
    assert 0 < len(output) < len(inputs)
    assert set(done.values()) == {1}
    assert set(done) <= set(custom_ids(inputs))


def test_line_delay_shows_progress_while_in_progress(make_target: TargetFactory) -> None:
    # Given a slow batch (150 lines, ~1.5 s; progress is saved about every 0.5 s)
    target = make_target(Faults(line_delay=0.01))

    # When it is polled to the end
    seen = wait_until(target, submit(target, requests(150)), lambda b: b.status.is_terminal)

    # Then some poll saw it IN_PROGRESS strictly between 0 and 100, progress never went
    # back, and it ended COMPLETED at 100
    running = [b.progress for b in seen if b.status is ProviderBatchStatus.IN_PROGRESS]
    assert any(0 < progress < 100 for progress in running), [(b.status, b.progress) for b in seen]
    progress = [b.progress for b in seen]
    assert progress == sorted(progress)
    assert (seen[-1].status, seen[-1].progress) == (ProviderBatchStatus.COMPLETED, 100.0)


# 7: ambiguous answers and brief outages: the call's effect and its answer part ways


def lost_answer_status(kind: str, exc: BaseException) -> int:
    """A create's lost answer as each target's user sees it: a retryable 5xx."""
    if kind == "sdk":
        # What the SDK raises for any 5xx; SDK users retry it.
        assert isinstance(exc, together.InternalServerError), repr(exc)
        return exc.status_code
    assert isinstance(exc, ProviderError), repr(exc)
    assert exc.retryable and exc.status_code is not None, repr(exc)
    return exc.status_code


def assert_timed_out(kind: str, exc: BaseException) -> None:
    """A call the client gave up waiting for, as each target's user sees it."""
    if kind == "sdk":
        assert isinstance(exc, together.APITimeoutError), repr(exc)
        return
    assert isinstance(exc, ProviderError), repr(exc)
    assert (exc.retryable, exc.status_code) == (True, None), repr(exc)
    assert "timed out" in str(exc)


def jobs_over(provider: BatchProvider, file_id: str) -> list[ProviderBatch]:
    """What a worker whose create failed looks for: the jobs over its input file."""
    return [batch for batch in provider.list_batches() if batch.input_file_id == file_id]


def no_create_retries(kind: str) -> int:
    # A retried create after a lost or late answer would make a second job: SDK users must
    # turn retries off themselves, TogetherProvider does it for create (and only create).
    return 0 if kind == "sdk" else 2


def test_a_create_whose_answer_is_lost_made_exactly_one_job_that_completes(
    make_target: TargetFactory,
) -> None:
    # Given a target losing the answer of every create, and an uploaded file
    target = make_target(
        Faults(lost_answer_rate=1.0, seed=5), max_retries=no_create_retries(make_target.kind)
    )
    inputs = requests(30)
    file_id = target.provider.upload_file(write_jsonl(target.workdir / "in.jsonl", inputs))

    # When a batch is created over it
    with pytest.raises((ProviderError, together.APIError)) as failed:
        target.provider.create_batch(file_id, model=MODEL)

    # Then the create failed retryably, with a 5xx as a lost answer looks
    assert lost_answer_status(target.kind, failed.value) in (500, 504)
    # Yet exactly one job exists over that file, from one create request (no client retry)
    jobs = jobs_over(target.provider, file_id)
    assert len(jobs) == 1
    creates = [call for call, _ in target.responses if call == "POST /v1/batches"]
    assert len(creates) == (0 if target.kind == "local" else 1)
    # And it runs to COMPLETED with every custom_id once
    batch = finished(target, jobs[0].id)
    assert batch.status is ProviderBatchStatus.COMPLETED
    output, errors = results(target, batch)
    assert (custom_ids(output), errors) == (custom_ids(inputs), [])


def test_a_create_answered_after_the_client_timeout_still_made_its_job(
    make_target: TargetFactory,
) -> None:
    # Given a target answering every call 1 s after doing it, a client giving up after
    # 0.5 s, and a file put straight into the store (an upload would time out too)
    target = make_target(
        Faults(answer_delay=1.0), max_retries=no_create_retries(make_target.kind), timeout=0.5
    )
    inputs = requests(20)
    file_id = target.store.add_file_from_path(write_jsonl(target.workdir / "in.jsonl", inputs)).id

    # When a batch is created over it
    started = time.monotonic()
    with pytest.raises((ProviderError, together.APIError)) as failed:
        target.provider.create_batch(file_id, model=MODEL)

    # Then the create timed out, retryably, after the client's timeout
    assert_timed_out(target.kind, failed.value)
    assert time.monotonic() - started >= 0.5
    # Yet a patient client finds exactly one job over the file
    patient = replace(target, provider=make_target.patient(target))
    jobs = jobs_over(patient.provider, file_id)
    assert len(jobs) == 1
    # And it completes with every custom_id once
    batch = finished(patient, jobs[0].id)
    assert batch.status is ProviderBatchStatus.COMPLETED
    output, errors = results(patient, batch)
    assert (custom_ids(output), errors) == (custom_ids(inputs), [])
    assert len(target.store.list_jobs()) == 1


def test_an_answer_late_but_within_the_client_timeout_just_arrives_late(
    make_target: TargetFactory,
) -> None:
    # Given a target answering every call 0.3 s after doing it, and a client waiting 5 s
    target = make_target(Faults(answer_delay=0.3), timeout=5.0)
    inputs = requests(20)
    file_id = target.provider.upload_file(write_jsonl(target.workdir / "in.jsonl", inputs))

    # When a batch is created
    started = time.monotonic()
    created = target.provider.create_batch(file_id, model=MODEL)
    waited = time.monotonic() - started

    # Then the create succeeded, late
    assert waited >= 0.3
    assert created.input_file_id == file_id
    # And the batch completes with every custom_id once, the only job there is
    batch = finished(target, created.id)
    assert batch.status is ProviderBatchStatus.COMPLETED
    output, errors = results(target, batch)
    assert (custom_ids(output), errors) == (custom_ids(inputs), [])
    assert [job.id for job in target.store.list_jobs()] == [created.id]


def test_a_batch_the_provider_briefly_cannot_find_is_still_listed_and_comes_back(
    make_target: TargetFactory,
) -> None:
    # Given a target whose batch retrieves answer 404 for its first 3 s (a brief outage),
    # and a batch created within them
    window = 3.0
    started = time.monotonic()  # the target starts later: its clock lags this one
    target = make_target(Faults(not_found_window=(0.0, window)))
    inputs = requests(20)
    file_id = target.provider.upload_file(write_jsonl(target.workdir / "in.jsonl", inputs))
    batch_id = target.provider.create_batch(file_id, model=MODEL).id

    # When the batch is retrieved inside the window
    outcome = refused(target, lambda: target.provider.get_batch(batch_id))
    assert time.monotonic() - started < window, "too slow to have asked inside the window"

    # Then the answer is a permanent 404, as for a job the provider does not know
    assert outcome == (False, 404)
    # Yet it is still listed over its input file, keeps running to the end, and the
    # provider still has that file
    deadline = started + window
    listed = jobs_over(target.provider, file_id)
    while not listed[0].status.is_terminal and time.monotonic() < deadline:
        time.sleep(0.05)
        listed = jobs_over(target.provider, file_id)
    assert [(job.id, job.status) for job in listed] == [(batch_id, ProviderBatchStatus.COMPLETED)]
    assert time.monotonic() - started < window, "the job did not finish inside the window"
    assert target.provider.file_exists(file_id)
    # And retrieve works again once the window has passed, and only then
    while True:
        try:
            batch = target.provider.get_batch(batch_id)
            break
        except (ProviderError, together.APIError) as exc:
            assert refusal(target.kind, exc) == (False, 404)
            assert time.monotonic() < deadline + 10, "retrieve never came back"
            time.sleep(0.05)
    assert time.monotonic() - started >= window
    assert batch.status is ProviderBatchStatus.COMPLETED
    output, errors = results(target, batch)
    assert (custom_ids(output), errors) == (custom_ids(inputs), [])


# 8: files


def test_file_exists_is_true_for_a_stored_file_and_false_once_it_is_gone(
    make_target: TargetFactory,
) -> None:
    # Given an uploaded file
    target = make_target()
    file_id = target.provider.upload_file(write_jsonl(target.workdir / "in.jsonl", requests(5)))

    # When its existence is checked, then it is there
    assert target.provider.file_exists(file_id) is True
    # And an id never issued, or malformed, is not (a False, not an error)
    assert target.provider.file_exists("file-5b5dc7a5-b96d-4d30-945d-6a98c53db070") is False
    assert target.provider.file_exists("not-a-file-id") is False
    # And once the provider has deleted the file, it is not there any more
    target.store.delete_file(file_id)
    assert target.provider.file_exists(file_id) is False


def test_a_deleted_file_is_gone_and_deleting_again_or_an_unknown_id_is_fine(
    make_target: TargetFactory,
) -> None:
    # Given a finished batch: its input, output and error files all at the provider
    target = make_target()
    inputs = requests(10)
    inputs[3]["body"]["messages"] = []  # so the error file has a line too
    batch = finished(target, submit(target, inputs))
    output_id, error_id = batch.output_file_id, batch.error_file_id
    assert output_id is not None and error_id is not None
    file_ids = [batch.input_file_id, output_id, error_id]
    assert [target.provider.file_exists(f) for f in file_ids] == [True, True, True]

    # When each is deleted
    for file_id in file_ids:
        target.provider.delete_file(file_id)

    # Then none exists any more, for the provider nor on disk
    assert [target.provider.file_exists(f) for f in file_ids] == [False, False, False]
    assert target.store.list_files() == []
    assert list((target.store.root / "files").iterdir()) == []
    # And downloading one fails for good with a 404
    dest = target.workdir / "gone.jsonl"
    assert refused(target, lambda: target.provider.download_file(output_id, dest)) == (False, 404)
    # And deleting one again, or an id never issued, or a malformed one, is fine
    target.provider.delete_file(output_id)
    target.provider.delete_file("file-5b5dc7a5-b96d-4d30-945d-6a98c53db070")
    target.provider.delete_file("not-a-file-id")
    # And the batch itself is still there to be retrieved
    assert target.provider.get_batch(batch.id).status is ProviderBatchStatus.COMPLETED


def test_deleting_one_file_leaves_the_others(make_target: TargetFactory) -> None:
    # Given two uploaded files
    target = make_target()
    keep, drop = (
        target.provider.upload_file(write_jsonl(target.workdir / f"in-{n}.jsonl", requests(3)))
        for n in range(2)
    )

    # When one is deleted
    target.provider.delete_file(drop)

    # Then only that one is gone; the other still downloads whole
    assert (target.provider.file_exists(keep), target.provider.file_exists(drop)) == (True, False)
    assert custom_ids(download(target, keep)) == custom_ids(requests(3))


# 9: statuses


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("VALIDATING", ProviderBatchStatus.VALIDATING),
        ("IN_PROGRESS", ProviderBatchStatus.IN_PROGRESS),
        ("COMPLETED", ProviderBatchStatus.COMPLETED),
        ("FAILED", ProviderBatchStatus.FAILED),
        ("EXPIRED", ProviderBatchStatus.EXPIRED),
        ("CANCELLED", ProviderBatchStatus.CANCELLED),
        ("CANCELING", ProviderBatchStatus.CANCELLING),  # the old v1 SDK's transitional state
        ("PAUSED", ProviderBatchStatus.UNKNOWN),  # a status Together may add some day
        ("", ProviderBatchStatus.UNKNOWN),
        (None, ProviderBatchStatus.UNKNOWN),
    ],
)
def test_every_together_status_maps_and_unknown_ones_are_unknown(
    raw: str | None, expected: ProviderBatchStatus
) -> None:
    # Given a status as Together spells it, when it is mapped, then it is the expected one
    status = ProviderBatchStatus.from_together(raw)
    assert status is expected
    # And only COMPLETED, FAILED, EXPIRED and CANCELLED are final (pollers keep polling UNKNOWN)
    assert status.is_terminal == (raw in {"COMPLETED", "FAILED", "EXPIRED", "CANCELLED"})
