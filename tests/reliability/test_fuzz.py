"""Bad input, fuzzed: the producer API, the result-file parser, a pipeline fed hostile
provider output, and local-api's endpoints, with hostile values (unicode, lone surrogates,
huge strings, deep nesting, NaN, invalid UTF-8, truncated lines).

Every case must be a clear error (naming the field) that changes nothing, or a correct
result; never a crash, a stalled batch or a half-written state. ``make chaos`` runs more
examples (``BATCHBRIDGE_TEST_FUZZ_EXAMPLES``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis import Redis

from producer import InvalidRequest, Producer
from shared.models import Batch, BatchState
from shared.providers.local import LocalProvider
from shared.redis_layout import Keys
from shared.settings import Settings
from tests.conftest import LocalApiFactory, drive_pipeline, run_local_jobs, submit_requests
from worker.collection import collect_ready_batches
from worker.context import WorkerContext
from worker.lifecycle import submit_ready_batches
from worker.packing import pack_due_buffers
from worker.polling import poll_due_batches
from worker.result_lines import LineProblems, read_result_lines

EXAMPLES = int(os.environ.get("BATCHBRIDGE_TEST_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Any code point, lone surrogates included (they cannot be encoded as UTF-8 or JSON).
hostile_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
hostile_text |= st.sampled_from(
    ["\ud800", "a\udfffb", "\x00", "\u202e", "\U0001d4f1\U0001d4ee\u0301", "x" * 200_000, ""]
)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | hostile_text
)


def nested(depth: int) -> Any:
    """A list nested ``depth`` deep (deeper than orjson's limit of 254)."""
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


json_like = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(hostile_text, inner, max_size=3),
    max_leaves=12,
) | st.just(nested(300))

messages = (
    st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "assistant", "tool", "", "\ud800"])},
            optional={"content": json_like, "name": hostile_text},
        ),
        max_size=3,
    )
    | json_like
)
requests = st.fixed_dictionaries(
    {"model": hostile_text | st.just("m-fuzz"), "messages": messages},
    optional={
        "max_tokens": scalars,
        "temperature": scalars,
        "metadata": json_like,
        "callback_queue": hostile_text,
        "idempotency_key": hostile_text,
        "provider": hostile_text,
        "webhook_url": hostile_text,
        "custom_id": hostile_text,
        hostile_text: json_like,  # type: ignore[dict-item]
    },
)


@pytest.fixture
def producer(settings: Settings) -> Iterator[Producer]:
    """A producer on the test Redis."""
    with Producer(settings=settings) as made:
        yield made


def redis_state(client: Redis) -> tuple[int, dict[bytes, bytes]]:
    """How many keys Redis holds, and the bytes per buffer."""
    return client.dbsize(), client.hgetall(Keys().buffers)


@FUZZ
@given(request=requests)
def test_the_producer_takes_a_hostile_request_or_refuses_it_changing_nothing(
    producer: Producer, redis_client: Redis, request: dict[str, Any]
) -> None:
    before = redis_state(redis_client)
    try:
        (handle,) = producer.submit_many([request])
    except InvalidRequest as exc:
        # A clear error names the field and the rule, and nothing was written
        assert exc.field.startswith("requests[0]") and exc.rule, exc
        assert redis_state(redis_client) == before
        return
    # A request taken is stored as valid UTF-8 JSON that says what was sent
    buffers = list(redis_client.hkeys(Keys().buffers))
    stored = [redis_client.hget(Keys().bodies(b.decode()), handle.id) for b in buffers]
    (body,) = [s for s in stored if s is not None]
    parsed = orjson.loads(body)
    assert parsed["messages"] == orjson.loads(orjson.dumps(request["messages"]))
    assert not any(isinstance(v, float) and not math.isfinite(v) for v in parsed.values())


raw_lines = st.one_of(
    st.binary(max_size=200).map(lambda b: b.replace(b"\n", b"") + b"\n"),
    st.just(b"\xff\xfe not utf-8\n"),
    st.just(b'{"custom_id": "r-1", "response": {"status_code": 200, "body": {"x": NaN}}}\n'),
    st.just(b'{"custom_id": "r-2", "response": {"status_code": 200, "body": {"a": "\\ud800"}}}\n'),
    st.just(
        b'{"custom_id": "r-3", "response": {"status_code": 200, "body": ' + b"[" * 2000 + b"\n"
    ),
    st.just(b'{"custom_id": "r-4", "error": {"code": ' + b'"x' * 5000 + b'"}}\n'),
    st.just(b'{"custom_id": 7}\n'),
    st.just(b"[1, 2, 3]\n"),
    st.builds(
        lambda cid, body: (
            encoded({"custom_id": cid, "response": {"status_code": 200, "body": body}}) + b"\n"
        ),
        hostile_text,
        json_like,
    ),
)


def encoded(value: Any) -> bytes:
    """``value`` as JSON where it can be, else as whatever bytes its repr makes."""
    try:
        return orjson.dumps(value)
    except (orjson.JSONEncodeError, TypeError):
        return repr(value).encode("utf-8", "surrogatepass")


@FUZZ
@given(lines=st.lists(raw_lines, max_size=12), cut=st.integers(min_value=0, max_value=40))
def test_the_result_parser_answers_or_notes_every_line_and_never_raises(
    tmp_path_factory: pytest.TempPathFactory, lines: list[bytes], cut: int
) -> None:
    # Given a result file of hostile lines, its last one cut short
    data = b"".join(lines)
    data = data[: max(len(data) - cut, 0)]
    path = tmp_path_factory.mktemp("fuzz") / "output.jsonl"
    path.write_bytes(data)
    problems = LineProblems("b-fuzz")
    # When it is read, then every non-blank line is an outcome or a noted problem
    outcomes = list(read_result_lines(path, problems))
    non_blank = sum(1 for line in data.split(b"\n") if line.strip())  # lines end at \n only
    assert len(outcomes) + problems.counts.total() == non_blank
    for _offset, outcome in outcomes:
        assert outcome.status in ("completed", "failed")
        assert outcome.request_id and isinstance(outcome.request_id, str)


def hostile_output(ids: list[str]) -> bytes:
    """An output file answering the batch's requests in every broken way at once."""
    good = [
        orjson.dumps({"custom_id": cid, "response": {"status_code": 200, "body": {"ok": cid}}})
        for cid in ids[:3]
    ]
    return b"\n".join(
        [
            good[0],
            good[0],  # the same answer twice
            b'{"custom_id": "%s", "response": {"status_code": 200, "body": {"x": NaN}}}'
            % ids[3].encode(),
            b'{"custom_id": "%s", "response": {"body": {"a": "\\ud800"}}}' % ids[4].encode(),
            b'{"custom_id": "%s", "response": ' % ids[5].encode() + b"[" * 5000,
            b"\xff\xfe\x00 garbage",
            orjson.dumps({"custom_id": "not-in-this-batch", "response": {"status_code": 200}}),
            orjson.dumps({"custom_id": ids[6], "response": {"status_code": 200, "body": "text"}}),
            good[1],
            orjson.dumps({"custom_id": ids[7], "response": {"body": {"z": "x" * 2_000_000}}}),
            good[2][:-7],  # truncated last line
        ]
    )


def test_a_batch_answered_with_hostile_output_still_gives_each_request_one_outcome(
    ctx: WorkerContext,
) -> None:
    # Given a batch of ten that the provider answers with a hostile output file
    ids = submit_requests(ctx, 10)
    pack_due_buffers(ctx, force=True)
    submit_ready_batches(ctx)
    run_local_jobs(ctx)
    provider = ctx.provider("local")
    assert isinstance(provider, LocalProvider)
    (job,) = provider.store.list_jobs()
    assert job.output_file_id is not None
    provider.store.file_path(job.output_file_id).write_bytes(hostile_output(ids))

    # When it is collected, and what went round again is run (the engine answers well)
    poll_due_batches(ctx)
    collect_ready_batches(ctx)
    for _ in range(4):
        drive_pipeline(ctx)

    # Then the batch finished, and every request has exactly one outcome, delivered once
    with ctx.session() as session:
        states = {b.state for b in session.query(Batch).all()}
    assert states == {BatchState.FINISHED}
    entries = ctx.redis.xrange(ctx.keys.callback("svc"))
    delivered = [orjson.loads(fields[b"result"])["request_id"] for _, fields in entries]
    assert sorted(delivered) == sorted(ids)
    statuses = {
        orjson.loads(fields[b"result"])["request_id"]: orjson.loads(fields[b"result"])["status"]
        for _, fields in entries
    }
    assert set(statuses.values()) <= {"completed", "failed"}
    assert statuses[ids[1]] == "completed"  # a good line is taken as it is


endpoint_calls = st.one_of(
    st.tuples(st.just("POST"), st.just("/v1/batches"), json_like),
    st.tuples(st.just("POST"), st.just("/v1/files"), json_like),
    st.tuples(st.just("GET"), st.builds("/v1/batches/{}".format, hostile_text), st.none()),
    st.tuples(st.just("GET"), st.builds("/v1/files/{}/content".format, hostile_text), st.none()),
    st.tuples(st.just("POST"), st.builds("/v1/batches/{}/cancel".format, hostile_text), st.none()),
    st.tuples(st.just("DELETE"), st.builds("/v1/files/{}".format, hostile_text), st.none()),
    st.tuples(st.just("PUT"), st.builds("/_upload/{}".format, hostile_text), st.binary()),
)


@pytest.fixture
def local_api_url(start_local_api: LocalApiFactory) -> str:
    """One local-api for the whole fuzz run."""
    return start_local_api().url


@FUZZ
@given(call=endpoint_calls)
def test_local_api_answers_hostile_calls_with_a_clear_client_error(
    local_api_url: str, call: tuple[str, str, Any]
) -> None:
    method, path, payload = call
    headers = {"Authorization": "Bearer test-key"}
    try:
        url = httpx.URL(local_api_url).join(path.replace("\x00", "%00"))
    except (httpx.InvalidURL, UnicodeEncodeError):
        return  # not a URL any client could send
    content = payload if isinstance(payload, bytes) else encoded(payload)
    try:
        response = httpx.request(method, url, content=content, headers=headers, timeout=10)
    except (httpx.InvalidURL, httpx.UnsupportedProtocol, UnicodeEncodeError):
        return
    # Then the server answered, with a client error that says what was wrong (or a success)
    assert response.status_code < 500, (method, path, response.status_code, response.text)
    if response.status_code >= 400:
        # Together's two shapes: {"error": "message"} (batches), {"error": {"message"}} (files)
        error = response.json()["error"]
        assert error["message"] if isinstance(error, dict) else error
    assert httpx.get(f"{local_api_url}/healthz", timeout=5).status_code == 200
