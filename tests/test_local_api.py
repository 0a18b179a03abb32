"""Scenarios for the local Together-compatible Batch API, driven by the official SDK.

The SDK's resource paths already start with ``/v1``, so ``base_url`` is the bare server
address (``http://127.0.0.1:PORT``); a base URL ending in ``/v1`` would request ``/v1/v1/...``.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import together
import uvicorn
from together import Together
from together.types import BatchJob as SdkBatchJob

from shared.providers.base import ProviderError
from shared.providers.local import CallFaults, EchoEngine, LocalProvider, LocalStore, run_job
from shared.providers.local.api import Faults, create_app
from shared.providers.registry import build_provider
from shared.providers.together import TogetherProvider
from shared.settings import Settings

MODEL = "meta-llama/Llama-3.3-70B-Instruct-Turbo"
API_KEY = "test-key-0123456789"
TERMINAL = {"COMPLETED", "FAILED", "EXPIRED", "CANCELLED"}
REQUEST_ID = re.compile(r"^br_[A-Za-z0-9_-]{43}$")
FILE_ID = re.compile(r"^file-[0-9a-f-]{36}$")


# Server fixture


class RunningServer:
    """The real app under uvicorn on a free loopback port, in a background thread."""

    def __init__(self, root: Path, **app_options: Any) -> None:
        self.root = root
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port: int = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(root, **app_options), log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._thread.start()
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        raise RuntimeError("the local API did not become ready")

    def client(self, api_key: str = API_KEY, **options: Any) -> Together:
        return Together(api_key=api_key, base_url=self.url, **options)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=20)
        assert not self._thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One server for tests that only send requests the server refuses."""
    server = RunningServer(tmp_path_factory.mktemp("shared") / "api", api_key=API_KEY)
    yield server
    server.stop()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., RunningServer]]:
    """Starts servers (on ``tmp_path / 'api'`` unless told otherwise); stops them all after."""
    servers: list[RunningServer] = []

    def start(root: Path | None = None, **app_options: Any) -> RunningServer:
        app_options.setdefault("api_key", API_KEY)
        server = RunningServer(root or tmp_path / "api", **app_options)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


# Helpers


def request(custom_id: str, model: str = MODEL, text: str = "is this spam?") -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 8}
    return {"custom_id": custom_id, "body": body}


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return path


def requests_file(tmp_path: Path, n: int, name: str = "batch.jsonl") -> Path:
    return write_jsonl(tmp_path / name, (request(f"req-{i}", text=f"item {i}") for i in range(n)))


def submit(client: Together, path: Path) -> str:
    uploaded = client.files.upload(file=path, purpose="batch-api", check=False)
    created = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions")
    assert created.job is not None and created.job.id is not None
    return created.job.id


def wait_for(
    client: Together, batch_id: str, done: Callable[[SdkBatchJob], bool], timeout: float = 20
) -> SdkBatchJob:
    deadline = time.monotonic() + timeout
    while True:
        job = client.batches.retrieve(batch_id)
        if done(job):
            return job
        assert time.monotonic() < deadline, f"batch stuck at {job.status} {job.progress}"
        time.sleep(0.03)


def started(job: SdkBatchJob) -> bool:
    return (job.progress or 0) > 0


def finished(client: Together, batch_id: str) -> SdkBatchJob:
    return wait_for(client, batch_id, lambda job: job.status in TERMINAL)


def download(client: Together, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    with client.files.with_streaming_response.content(id=file_id) as response:
        data = b"".join(response.iter_bytes())
    return [orjson.loads(line) for line in data.splitlines() if line.strip()]


def auth(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# The documented workflow


def test_the_documented_sdk_workflow_runs_unchanged(
    start_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    # Given a server and a 50-line batch file
    server = start_server()
    client = server.client()
    path = requests_file(tmp_path, 50)

    # When the documented workflow runs: upload, create, poll, download
    uploaded = client.files.upload(file=path, purpose="batch-api", check=False)
    created = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions")
    assert created.job is not None and created.job.id is not None
    batch_id = created.job.id
    assert created.job.status == "VALIDATING"
    while (job := client.batches.retrieve(batch_id)).status not in TERMINAL:
        time.sleep(0.03)
    output = download(client, job.output_file_id)

    # Then the upload is a complete FileResponse
    assert FILE_ID.match(uploaded.id)
    assert uploaded.bytes == path.stat().st_size
    assert (uploaded.filename, uploaded.purpose, uploaded.file_type) == (
        "batch.jsonl",
        "batch-api",
        "jsonl",
    )
    # And the batch completed with every custom_id exactly once, in Together's output shape
    assert job.status == "COMPLETED"
    assert job.progress == 100.0
    assert job.x_model_id == MODEL  # the SDK's name for the "model_id" key
    assert job.completed_at is not None
    assert Counter(line["custom_id"] for line in output) == Counter(f"req-{i}" for i in range(50))
    for line in output:
        assert set(line) == {"id", "custom_id", "response"}
        assert REQUEST_ID.match(line["id"])
        assert line["response"]["status_code"] == 200
        body = line["response"]["body"]
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert body["usage"]["total_tokens"] > 0
    assert download(client, job.error_file_id) == []


def test_upload_protocol_redirects_to_the_address_the_client_used(
    start_server: Callable[..., RunningServer],
) -> None:
    # Given a server, and a client reaching it under another host name
    server = start_server()
    body = b'{"custom_id": "a", "body": {"model": "m"}}\n'
    with httpx.Client(base_url=server.url, headers=auth()) as http:
        # When it asks for an upload URL with a urlencoded form
        reply = http.post(
            "/v1/files",
            data={"purpose": "batch-api", "file_name": "x.jsonl", "file_type": "jsonl"},
            headers={"Host": f"batch.example:{server.port}"},
        )
        # Then it gets a 302 to a signed URL on that host, with the file id in a header
        assert reply.status_code == 302
        file_id = reply.headers["X-Together-File-Id"]
        location = reply.headers["Location"]
        assert FILE_ID.match(file_id)
        assert location.startswith(f"http://batch.example:{server.port}/_upload/{file_id}?sig=")

        # And a PUT without auth but with the signature answers exactly 200
        put_url = location.replace(f"batch.example:{server.port}", f"127.0.0.1:{server.port}")
        unsigned = put_url.split("?")[0]
        assert httpx.put(unsigned, content=body).status_code == 403
        assert httpx.put(put_url, content=body).status_code == 200
        # And preprocess answers the full FileResponse
        final = http.post(f"/v1/files/{file_id}/preprocess")
        assert final.status_code == 200
        assert final.json() == {
            "id": file_id,
            "object": "file",
            "created_at": final.json()["created_at"],
            "filename": "x.jsonl",
            "bytes": len(body),
            "purpose": "batch-api",
            "FileType": "jsonl",
            "Processed": True,
            "LineCount": 1,
            "processing_status": "COMPLETED",
            "validation_report": None,
        }
        # And the create answers 201 with the job wrapper
        created = http.post(
            "/v1/batches", json={"endpoint": "/v1/chat/completions", "input_file_id": file_id}
        )
        assert created.status_code == 201
        assert set(created.json()) == {"job", "warning"}
        assert created.json()["warning"] is None


def test_public_url_overrides_the_upload_location(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server(public_url="http://batch.internal:9000/")
    reply = httpx.post(
        f"{server.url}/v1/files",
        files={"purpose": (None, "batch-api"), "file_name": (None, "x.jsonl")},
        headers=auth(),
    )
    assert reply.status_code == 302
    assert reply.headers["Location"].startswith("http://batch.internal:9000/_upload/file-")


# Listing, retrieving and deleting


def test_list_retrieve_delete_files_and_read_the_error_file(
    start_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    # Given a completed batch in which one request was malformed
    server = start_server()
    client = server.client()
    records = [request("good-1"), request("good-2"), {"custom_id": "bad", "body": {"model": MODEL}}]
    batch_id = submit(client, write_jsonl(tmp_path / "in.jsonl", records))
    job = finished(client, batch_id)
    assert job.status == "COMPLETED"

    # Then batches list as a bare JSON array
    assert [b.id for b in client.batches.list()] == [batch_id]
    raw = httpx.get(f"{server.url}/v1/batches", headers=auth()).json()
    assert isinstance(raw, list)
    assert raw[0]["id"] == batch_id
    # And files list as {"data": [...]}, with the input, output and error files
    listed = {f.id for f in client.files.list().data}
    assert listed == {job.input_file_id, job.output_file_id, job.error_file_id}
    # And the error file holds the malformed request, in Together's error-line shape
    errors = download(client, job.error_file_id)
    assert len(errors) == 1
    assert errors[0]["custom_id"] == "bad"
    assert set(errors[0]["error"]) == {"message", "code"}
    assert {line["custom_id"] for line in download(client, job.output_file_id)} == {
        "good-1",
        "good-2",
    }

    # When the output file is retrieved and deleted
    assert job.output_file_id is not None
    retrieved = client.files.retrieve(job.output_file_id)
    assert str(retrieved.purpose) == "batch-generated"  # outside the SDK's Literal
    deleted = client.files.delete(job.output_file_id)

    # Then it is gone
    assert (deleted.id, deleted.deleted) == (job.output_file_id, True)
    with pytest.raises(together.NotFoundError):
        client.files.retrieve(job.output_file_id)
    with pytest.raises(together.NotFoundError):
        client.files.content(id=job.output_file_id)
    with pytest.raises(together.NotFoundError):
        client.files.delete(job.output_file_id)
    # And cancelling the finished batch is refused with Together's batch error shape
    with pytest.raises(together.BadRequestError) as refused:
        client.batches.cancel(batch_id)
    assert isinstance(refused.value.body, dict)
    assert "COMPLETED" in refused.value.body["error"]


# Validation


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        ([request("a"), request("b"), request("a")], "duplicate custom_id 'a'"),
        ([request("a"), request("b", model="other/model")], "exactly one model"),
        ([request("x" * 65)], "over the limit of 64"),
        ([{"custom_id": "a"}], "missing body"),
    ],
    ids=["duplicate-custom-id", "two-models", "long-custom-id", "missing-body"],
)
def test_an_invalid_file_fails_the_batch_with_a_clear_error(
    start_server: Callable[..., RunningServer],
    tmp_path: Path,
    records: list[dict[str, Any]],
    expected: str,
) -> None:
    # Given an invalid batch file
    server = start_server()
    client = server.client()

    # When it is submitted, then the batch turns FAILED with an error naming the rule
    job = finished(client, submit(client, write_jsonl(tmp_path / "in.jsonl", records)))
    assert job.status == "FAILED"
    assert job.error is not None
    assert expected in job.error


def test_an_unsupported_endpoint_is_accepted_then_failed(
    start_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    server = start_server()
    client = server.client()
    uploaded = client.files.upload(file=requests_file(tmp_path, 2), purpose="batch-api")
    created = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/audio/transcriptions")
    assert created.job is not None and created.job.id is not None
    job = finished(client, created.job.id)
    assert job.status == "FAILED"
    assert job.error is not None
    assert "/v1/audio/transcriptions" in job.error


# Cancel


def test_cancelling_a_running_batch_keeps_partial_output(
    start_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    # Given a slow batch that has started
    server = start_server(faults=Faults(line_delay=0.01))
    client = server.client()
    batch_id = submit(client, requests_file(tmp_path, 200))
    wait_for(client, batch_id, started)

    # When it is cancelled
    cancelled = client.batches.cancel(batch_id)

    # Then it is CANCELLED, keeping the lines done so far
    assert cancelled.status == "CANCELLED"
    job = client.batches.retrieve(batch_id)
    assert job.status == "CANCELLED"
    output = download(client, job.output_file_id)
    assert 0 < len(output) < 200
    assert len({line["custom_id"] for line in output}) == len(output)
    assert download(client, job.error_file_id) == []
    # And cancelling it again is a 400
    with pytest.raises(together.BadRequestError):
        client.batches.cancel(batch_id)


# Auth


def test_a_missing_or_wrong_key_is_refused_and_changes_nothing(
    start_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    # Given a server with a key
    server = start_server()
    path = requests_file(tmp_path, 3)
    intruder = server.client(api_key="wrong-key")

    # When calls come with a wrong key, then the SDK raises AuthenticationError (401)
    with pytest.raises(together.AuthenticationError):
        intruder.files.upload(file=path, purpose="batch-api", check=False)
    with pytest.raises(together.AuthenticationError):
        intruder.batches.create(input_file_id="file-x", endpoint="/v1/chat/completions")
    with pytest.raises(together.AuthenticationError) as listing:
        intruder.batches.list()
    assert listing.value.status_code == 401
    # And with no key at all, in each endpoint family's error shape
    batches = httpx.get(f"{server.url}/v1/batches")
    files = httpx.post(f"{server.url}/v1/files", data={"purpose": "batch-api"})
    assert (batches.status_code, files.status_code) == (401, 401)
    assert isinstance(batches.json()["error"], str)
    assert files.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{server.url}/v1/files", headers=auth("Bearer")).status_code == 401

    # And nothing was created
    store = LocalStore(tmp_path / "api")
    assert store.list_files() == []
    assert store.list_jobs() == []
    assert list((tmp_path / "api" / "uploads").iterdir()) == []
    # While the right key works and health checks need none
    assert server.client().batches.list() == []
    assert httpx.get(f"{server.url}/healthz").status_code == 200


# Injected faults


def counting_client(server: RunningServer, statuses: list[int], **options: Any) -> Together:
    """An SDK client that records the status of every response it receives."""
    hooks = {"response": [lambda response: statuses.append(response.status_code)]}
    http_client = together.DefaultHttpxClient(event_hooks=hooks)
    return server.client(http_client=http_client, **options)


def test_fail_rate_1_fails_every_call_after_the_sdk_retries(
    start_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    # Given a server failing every API call
    server = start_server(faults=Faults(fail_rate=1.0, seed=1))
    statuses: list[int] = []
    client = counting_client(server, statuses)

    # When the SDK lists batches
    started = time.monotonic()
    with pytest.raises(together.APIStatusError) as failed:
        client.batches.list()
    elapsed = time.monotonic() - started

    # Then it tried three times (2 retries), waiting the short Retry-After, not its backoff
    assert failed.value.status_code in (429, 500)
    assert len(statuses) == 3
    assert set(statuses) <= {429, 500}
    assert elapsed < 1.5  # without Retry-After the SDK would back off for over 2 s
    # And an upload fails too, leaving nothing behind
    with pytest.raises(together.APIStatusError):
        client.files.upload(file=requests_file(tmp_path, 2), purpose="batch-api", check=False)
    raw = httpx.get(f"{server.url}/v1/files", headers=auth())
    assert raw.status_code in (429, 500)
    assert float(raw.headers["Retry-After"]) > 0
    assert LocalStore(tmp_path / "api").list_files() == []


def test_fail_rate_0_3_workflow_succeeds_thanks_to_sdk_retries(
    start_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    # Given a server failing 30% of calls; more retries than the default 2 keep the odds of
    # one call failing every attempt negligible (0.3^7 per call)
    server = start_server(faults=Faults(fail_rate=0.3, seed=7))
    statuses: list[int] = []
    client = counting_client(server, statuses, max_retries=6)

    # When the documented workflow runs
    batch_id = submit(client, requests_file(tmp_path, 30))
    job = finished(client, batch_id)
    output = download(client, job.output_file_id)

    # Then it succeeded although calls failed along the way
    assert job.status == "COMPLETED"
    assert sorted(line["custom_id"] for line in output) == sorted(f"req-{i}" for i in range(30))
    assert {429, 500} & set(statuses)
    # And retried creates made exactly one batch: a failed call touches nothing
    assert len(LocalStore(tmp_path / "api").list_jobs()) == 1


def test_line_error_rate_1_sends_every_line_to_the_error_file_as_rate_limit(
    start_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    server = start_server(faults=Faults(line_error_rate=1.0))
    client = server.client()
    job = finished(client, submit(client, requests_file(tmp_path, 30)))
    assert job.status == "COMPLETED"
    assert download(client, job.output_file_id) == []
    errors = download(client, job.error_file_id)
    assert sorted(line["custom_id"] for line in errors) == sorted(f"req-{i}" for i in range(30))
    assert {line["error"]["code"] for line in errors} == {"rate_limit"}


def test_expire_after_expires_a_running_batch_with_partial_output(
    start_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    server = start_server(faults=Faults(expire_after=0.3, line_delay=0.01))
    client = server.client()
    job = finished(client, submit(client, requests_file(tmp_path, 200)))
    assert job.status == "EXPIRED"
    assert job.progress is not None and job.progress < 100
    output = download(client, job.output_file_id)
    assert 0 < len(output) < 200


# Restart


def test_a_batch_interrupted_by_a_restart_finishes_on_the_next_server(
    start_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    # Given a slow batch in progress
    root = tmp_path / "api"
    first = start_server(root, faults=Faults(line_delay=0.01))
    client = first.client()
    batch_id = submit(client, requests_file(tmp_path, 200))
    wait_for(client, batch_id, started)

    # When the server stops mid-batch
    first.stop()
    assert not LocalStore(root).get_job(batch_id).is_terminal

    # Then a new server on the same root finishes it, every line exactly once
    client = start_server(root).client()
    job = finished(client, batch_id)
    assert job.status == "COMPLETED"
    output = download(client, job.output_file_id)
    assert Counter(line["custom_id"] for line in output) == Counter(f"req-{i}" for i in range(200))
    assert LocalStore(root).get_job(batch_id).attempts == 2


# Malformed requests

EP = "/v1/chat/completions"
UUID = "5b5dc7a5-b96d-4d30-945d-6a98c53db070"
FORM = {"purpose": "batch-api", "file_name": "a.jsonl", "file_type": "jsonl"}
CREATE = {"endpoint": EP, "input_file_id": "file-x"}


@pytest.mark.parametrize(
    ("method", "path", "options", "status", "fragment"),
    [
        ("POST", "/v1/batches", {"content": b"{not json"}, 400, "not valid JSON"),
        ("POST", "/v1/batches", {"json": ["endpoint"]}, 400, "must be a JSON object"),
        ("POST", "/v1/batches", {"json": {"endpoint": EP}}, 400, "'input_file_id'"),
        ("POST", "/v1/batches", {"json": {**CREATE, "endpoint": 1}}, 400, "'endpoint' must be"),
        ("POST", "/v1/batches", {"json": {**CREATE, "priority": True}}, 400, "'priority' must"),
        ("POST", "/v1/batches", {"json": {**CREATE, "model_id": 3}}, 400, "'model_id' must"),
        ("POST", "/v1/batches", {"json": CREATE}, 400, "input file 'file-x' not found"),
        ("GET", "/v1/batches/not-a-uuid", {}, 404, "not found"),
        ("POST", f"/v1/batches/{UUID}/cancel", {}, 404, "not found"),
        ("POST", "/v1/files", {"data": {"file_name": "a.jsonl"}}, 400, "'purpose'"),
        ("POST", "/v1/files", {"data": {**FORM, "purpose": "x"}}, 400, "invalid purpose"),
        ("POST", "/v1/files", {"data": {**FORM, "file_type": "exe"}}, 400, "invalid file_type"),
        ("POST", "/v1/files", {"json": FORM}, 400, "takes form fields"),
        ("POST", "/v1/files", {"files": {"file": ("a", b"{}")}, "data": FORM}, 400, "malformed"),
        ("GET", "/v1/files/nope", {}, 404, "not found"),
        ("POST", f"/v1/files/file-{UUID}/preprocess", {}, 404, "not found"),
        ("GET", "/v1/v1/files", {}, 404, "must not end in /v1"),
        ("PATCH", "/v1/batches", {}, 405, "Method Not Allowed"),
    ],
)
def test_malformed_requests_get_a_json_error_never_a_500(
    shared_server: RunningServer,
    method: str,
    path: str,
    options: dict[str, Any],
    status: int,
    fragment: str,
) -> None:
    # Given a server; when a malformed request arrives, then it gets a 4xx JSON error that
    # says what is wrong, in the shape of the endpoint's family
    server = shared_server
    reply = httpx.request(method, f"{server.url}{path}", headers=auth(), **options)
    assert reply.status_code == status
    error = reply.json()["error"]
    if path.startswith("/v1/batches"):
        assert isinstance(error, str)
        assert fragment in error
    else:
        assert fragment in error["message"]
        assert error["type"]
    # And nothing was stored
    assert LocalStore(server.root).list_jobs() == []


def test_a_base_url_ending_in_v1_gets_a_hint(start_server: Callable[..., RunningServer]) -> None:
    server = start_server()
    client = Together(api_key=API_KEY, base_url=f"{server.url}/v1", max_retries=0)
    with pytest.raises(together.NotFoundError) as missing:
        client.batches.list()
    assert "must not end in /v1" in str(missing.value)


# Fault settings and the in-process provider


def test_faults_are_read_from_the_environment_and_checked() -> None:
    env = {
        "BATCHBRIDGE_LOCAL_FAIL_RATE": "0.25",
        "BATCHBRIDGE_LOCAL_LINE_ERROR_RATE": "1",
        "BATCHBRIDGE_LOCAL_EXPIRE_AFTER": "2.5",
        "BATCHBRIDGE_LOCAL_LINE_DELAY": "0.01",
        "BATCHBRIDGE_LOCAL_LOST_ANSWER_RATE": "0.5",
        "BATCHBRIDGE_LOCAL_ANSWER_DELAY": "1.5",
        "BATCHBRIDGE_LOCAL_NOT_FOUND_WINDOW": " 10:2.5 ",
    }
    assert Faults.from_env(env) == Faults(
        0.25,
        1.0,
        2.5,
        0.01,
        lost_answer_rate=0.5,
        answer_delay=1.5,
        not_found_window=(10.0, 2.5),
    )
    assert Faults.from_env({}) == Faults()
    assert not Faults().enabled
    for name, value in [
        ("BATCHBRIDGE_LOCAL_FAIL_RATE", "1.5"),
        ("BATCHBRIDGE_LOCAL_LINE_ERROR_RATE", "lots"),
        ("BATCHBRIDGE_LOCAL_EXPIRE_AFTER", "-1"),
        ("BATCHBRIDGE_LOCAL_LINE_DELAY", "nan"),
        ("BATCHBRIDGE_LOCAL_LOST_ANSWER_RATE", "-0.1"),
        ("BATCHBRIDGE_LOCAL_ANSWER_DELAY", "inf"),
        ("BATCHBRIDGE_LOCAL_NOT_FOUND_WINDOW", "10"),
        ("BATCHBRIDGE_LOCAL_NOT_FOUND_WINDOW", "-1:5"),
        ("BATCHBRIDGE_LOCAL_NOT_FOUND_WINDOW", "1:0"),
        ("BATCHBRIDGE_LOCAL_NOT_FOUND_WINDOW", "a:b"),
    ]:
        with pytest.raises(ValueError, match=name):
            Faults.from_env({name: value})
    # And each new knob alone counts as fault injection being on
    for knob in (
        Faults(lost_answer_rate=0.1),
        Faults(answer_delay=0.1),
        Faults(not_found_window=(0.0, 1.0)),
    ):
        assert knob.enabled, knob


def test_the_not_found_window_opens_and_closes_on_the_clock_of_the_start() -> None:
    # Given fault draws whose not_found_window is 10 s long, starting 5 s after they start
    now = [100.0]
    call_faults = CallFaults(Faults(not_found_window=(5.0, 10.0)), clock=lambda: now[0])

    # When time passes, then batches are hidden from 5 s (included) to 15 s (excluded) only
    seen: dict[float, bool] = {}
    for elapsed in (0.0, 4.99, 5.0, 14.99, 15.0, 60.0):
        now[0] = 100.0 + elapsed
        seen[elapsed] = call_faults.hides_batches()
    assert seen == {0.0: False, 4.99: False, 5.0: True, 14.99: True, 15.0: False, 60.0: False}


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--lost-answer-rate", "2"], {}, "--lost-answer-rate"),
        (["--answer-delay", "-1"], {}, "--answer-delay"),
        (["--not-found-window", "5"], {}, "--not-found-window"),
        ([], {"BATCHBRIDGE_LOCAL_NOT_FOUND_WINDOW": "5:-1"}, "BATCHBRIDGE_LOCAL_NOT_FOUND_WINDOW"),
        ([], {"BATCHBRIDGE_LOCAL_ANSWER_DELAY": "soon"}, "BATCHBRIDGE_LOCAL_ANSWER_DELAY"),
        ([], {"BATCHBRIDGE_LOCAL_LOST_ANSWER_RATE": "x"}, "BATCHBRIDGE_LOCAL_LOST_ANSWER_RATE"),
    ],
)
def test_local_api_refuses_a_bad_fault_option_or_variable_naming_it(
    tmp_path: Path, args: list[str], env: dict[str, str], named: str
) -> None:
    # Given a bad value for one of the new fault knobs, on the command line or in the env
    from typer.testing import CliRunner

    from worker.cli import app

    # When `batchbridge local-api` starts, then it exits 2 naming the option or variable,
    # before serving anything
    env = {"BATCHBRIDGE_DATA_DIR": str(tmp_path / "data"), **env}
    result = CliRunner().invoke(app, ["local-api", "--port", "1", *args], env=env)
    assert result.exit_code == 2, result.output
    assert named in " ".join(result.output.split())
    assert not (tmp_path / "data" / "local_api").exists()


def test_a_lost_create_answer_retried_by_the_sdk_makes_a_job_per_attempt(
    start_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    # Given a server losing the answer of every create, and an SDK client with its default
    # retries (2), which retries a 5xx POST
    server = start_server(faults=Faults(lost_answer_rate=1.0, seed=2))
    statuses: list[int] = []
    client = counting_client(server, statuses)
    uploaded = client.files.upload(
        file=requests_file(tmp_path, 3), purpose="batch-api", check=False
    )
    statuses.clear()

    # When it creates a batch
    with pytest.raises(together.InternalServerError):
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions")

    # Then every attempt made a job (which is why TogetherProvider never retries a create),
    # and every answer was lost
    assert len(statuses) == 3
    assert set(statuses) <= {500, 504}
    jobs = client.batches.list()
    assert [job.input_file_id for job in jobs] == [uploaded.id] * 3


def test_injected_line_errors_skip_the_engine_and_the_runners_retries(tmp_path: Path) -> None:
    # Given an engine that counts its calls, and half the lines set to fail
    class CountingEngine(EchoEngine):
        calls = 0

        def complete(self, body: dict[str, object], custom_id: str) -> dict[str, object]:
            CountingEngine.calls += 1
            return super().complete(body, custom_id)

    store = LocalStore(tmp_path / "store")
    file_id = store.add_file_from_path(requests_file(tmp_path, 40)).id
    faults = Faults(line_error_rate=0.5, seed=3)

    # When the job runs
    job = run_job(store, store.create_job(file_id).id, CountingEngine(), faults=faults)

    # Then failed lines went straight to the error file, the others through the engine once
    assert job.output_file_id is not None and job.error_file_id is not None
    output = orjson_lines(store.file_path(job.output_file_id))
    errors = orjson_lines(store.file_path(job.error_file_id))
    assert output and errors
    assert CountingEngine.calls == len(output)
    assert {line["error"]["code"] for line in errors} == {"rate_limit"}
    ids = [line["custom_id"] for line in output + errors]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(40))


def orjson_lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def test_the_in_process_provider_fails_calls_at_the_fail_rate(tmp_path: Path) -> None:
    provider = LocalProvider(LocalStore(tmp_path / "store"), faults=Faults(fail_rate=1.0))
    with pytest.raises(ProviderError) as failed:
        provider.upload_file(requests_file(tmp_path, 1))
    assert failed.value.retryable
    assert failed.value.status_code in (429, 500)
    assert failed.value.retry_after is not None and failed.value.retry_after > 0
    assert provider.store.list_files() == []
    assert LocalProvider(provider.store, faults=Faults()).list_batches() == []


def test_built_providers_give_up_after_the_provider_timeout_setting(
    start_server: Callable[..., RunningServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a server and an in-process store both answering every call 1 s late, and
    # settings giving provider calls 0.3 s (with the 60 s default, the calls would succeed)
    server = start_server(faults=Faults(answer_delay=1.0))
    monkeypatch.setenv("TOGETHER_API_KEY", API_KEY)
    monkeypatch.setenv("TOGETHER_BASE_URL", server.url)
    monkeypatch.setenv("BATCHBRIDGE_LOCAL_ANSWER_DELAY", "1.0")
    settings = Settings.load(data_dir=tmp_path / "data", provider_timeout_seconds=0.3)

    for name in ("together", "local"):
        provider = build_provider(name, settings)
        # When it lists batches, then it times out, retryably
        with pytest.raises(ProviderError, match="timed out") as failed:
            provider.list_batches()
        assert failed.value.retryable, name
        if isinstance(provider, TogetherProvider):
            provider.close()
