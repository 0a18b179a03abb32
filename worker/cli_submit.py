"""``batchbridge submit``: one request from options, or many from a JSONL file."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any

import orjson
import typer
from redis.exceptions import RedisError

from shared.embedded_redis import RedisUnavailable
from shared.settings import Settings
from worker.cli_requests import cli_failure, console, err_console, fail, load_settings

if TYPE_CHECKING:
    from producer import Producer, RequestHandle

# Lines per submit_many call: the progress bar moves once per chunk, and submit_many
# pipelines each chunk's enqueue scripts on one connection.
_FILE_CHUNK = 1000
_ERRORS_SHOWN = 10
_POSITION = re.compile(r"^(?:requests)?\[(\d+)\]\.?(.*)$")
# Options that only make sense for one request, refused together with --file.
_SINGLE_ONLY = ("--prompt", "--system", "--idempotency-key", "--wait")


def submit(
    model: Annotated[
        str | None, typer.Option(help="model name (with --file: for lines that name none)")
    ] = None,
    prompt: Annotated[str | None, typer.Option(help="the user message")] = None,
    system: Annotated[str | None, typer.Option(help="a system message, sent first")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="max_tokens")] = None,
    metadata: Annotated[
        str | None, typer.Option(metavar="JSON", help="a JSON object returned with the result")
    ] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="submitting the same request with it again gives its id")
    ] = None,
    callback_queue: Annotated[str | None, typer.Option(help="callback queue")] = None,
    webhook_url: Annotated[
        str | None, typer.Option(help="POST the signed result to this URL")
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file",
            help="JSONL of requests (- for stdin), each line what Producer.submit_many takes; "
            "--model, --max-tokens, --metadata, --callback-queue and --webhook-url fill in "
            "what a line leaves out",
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option(help="with --file: write the ids here, not to stdout")
    ] = None,
    wait: Annotated[bool, typer.Option(help="wait for the result and print it")] = False,
    timeout: Annotated[float, typer.Option(min=0, help="seconds to wait")] = 600.0,
) -> None:
    """Submit one request (print its id; --wait: and its result) or a --file of them."""
    meta = _metadata(metadata)
    defaults = {
        "model": model,
        "max_tokens": max_tokens,
        "metadata": meta,
        "callback_queue": callback_queue,
        "webhook_url": webhook_url,
    }
    if file is not None:
        given = [prompt, system, idempotency_key, wait or None]
        if used := [name for name, value in zip(_SINGLE_ONLY, given, strict=True) if value]:
            raise fail(f"{', '.join(used)} cannot be used with --file (each line is a request)")
        settings = load_settings()
        with _producer(settings) as producer:
            _submit_file(producer, settings, file, output, defaults)
        return
    if output is not None:
        raise fail("--output goes with --file")
    if model is None or prompt is None:
        raise fail("--model and --prompt are required (or give a --file of requests)")
    messages = [{"role": "user", "content": prompt}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    settings = load_settings()
    with _producer(settings) as producer:
        handle = producer.submit(
            model,
            messages,
            max_tokens=max_tokens,
            callback_queue=callback_queue,
            metadata=meta,
            idempotency_key=idempotency_key,
            webhook_url=webhook_url,
        )
        console.print(handle.id, highlight=False)
        if wait:
            said = f"waiting: {flush_forecast(producer, settings, handle.id)}"
            err_console.print(said, soft_wrap=True, highlight=False, markup=False)
            _wait(handle, timeout)


def _metadata(raw: str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise fail(f"--metadata is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise fail(f"--metadata must be a JSON object, e.g. '{{\"job\": 7}}' (got {raw!r})")
    return value


@contextmanager
def _producer(settings: Settings) -> Iterator[Producer]:
    from producer import InvalidRequest, Producer

    try:
        with Producer(settings=settings) as producer:
            yield producer
    except (RedisUnavailable, InvalidRequest) as exc:
        raise fail(exc) from None
    except RedisError as exc:
        raise cli_failure(exc) from None


def _wait(handle: RequestHandle, timeout: float) -> None:
    try:
        result = handle.wait(timeout)
    except TimeoutError as exc:
        raise fail(exc, 1) from None
    shown = orjson.dumps(result.model_dump(mode="json"), option=orjson.OPT_INDENT_2)
    sys.stdout.write(shown.decode() + "\n")


def flush_forecast(producer: Producer, settings: Settings, request_id: str) -> str:
    """Where a request is and, while it waits in its buffer, when and why that flushes."""
    from shared.redis_layout import buffer_name_of, split_buffer_name, text
    from worker.packing import batch_provider
    from worker.status_buffers import flush_text, read_buffer

    state, number, batch = producer.redis.hmget(
        producer.keys.request(request_id), "state", "buf", "batch"
    )
    name = buffer_name_of(producer.redis, producer.keys, number)
    if state == b"pending" and name is not None:
        buffer = read_buffer(producer.redis, producer.keys, name, int(time.time() * 1000))
        provider, model = split_buffer_name(name)
        when = flush_text(buffer, settings, name_variables=True)
        return f"buffer ({batch_provider(settings, provider)}, {model}) flushes {when}"
    if state == b"batched" and batch is not None:
        return f"packed into batch {text(batch)} (`batchbridge batches show {text(batch)}`)"
    return f"request {request_id} is {text(state) if state else 'unknown'}"


def _submit_file(
    producer: Producer,
    settings: Settings,
    path: Path,
    output: Path | None,
    defaults: dict[str, Any],
) -> None:
    requests, lines = _read_requests(path, {k: v for k, v in defaults.items() if v is not None})
    _check_all(producer, settings, path, requests, lines)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from producer import InvalidRequest
    from producer.client import PartialSubmitError

    out: IO[str] = output.open("w") if output is not None else sys.stdout
    stored = 0
    progress = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
    )
    try:
        with progress:
            task = progress.add_task("submitting", total=len(requests))
            for start in range(0, len(requests), _FILE_CHUNK):
                chunk = requests[start : start + _FILE_CHUNK]
                try:
                    handles = producer.submit_many(chunk)
                except PartialSubmitError as exc:
                    ids = [h.id for h in exc.handles if h is not None]
                    out.write("".join(f"{i}\n" for i in ids))
                    stored += len(ids)
                    raise fail(_partial(exc, stored, len(requests))) from None
                except InvalidRequest as exc:  # a key taken by another producer meanwhile
                    raise fail(_at_line(exc, lines, start) + _kept(stored, output)) from None
                out.write("".join(f"{h.id}\n" for h in handles))
                out.flush()
                stored += len(handles)
                progress.advance(task, len(handles))
    finally:
        if output is not None:
            out.close()
    where = f" (ids in {output})" if output is not None else ""
    err_console.print(f"submitted {stored:,} requests from {path}{where}", soft_wrap=True)


def _read_requests(path: Path, defaults: dict[str, Any]) -> tuple[list[dict[str, Any]], list[int]]:
    """The requests of a JSONL file and the line number of each (blank lines are skipped)."""
    try:
        raw = sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
    except OSError as exc:
        raise fail(f"--file {path}: {exc.strerror or exc}") from None
    requests, numbers, errors = [], [], []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            errors.append(f"line {number}: not JSON ({exc})")
            continue
        if not isinstance(value, dict):
            errors.append(f"line {number}: must be a JSON object like submit_many takes")
            continue
        requests.append({**defaults, **value})
        numbers.append(number)
    if errors:
        raise fail(_errors(path, errors))
    if not requests:
        raise fail(f"--file {path} holds no requests")
    return requests, numbers


def _check_all(
    producer: Producer,
    settings: Settings,
    path: Path,
    requests: list[dict[str, Any]],
    lines: list[int],
) -> None:
    # Everything is checked before the first chunk is stored, so a bad line near the end (or
    # an idempotency key already bound to another request) leaves nothing half-submitted.
    from producer.protocol import check_taken_keys, keyed_requests
    from shared.schemas import InvalidRequest, prepare_many, prepare_request

    limits: dict[str, Any] = {
        "max_line_bytes": settings.max_line_bytes,
        "max_metadata_bytes": settings.max_metadata_bytes,
        "webhook_allow": settings.webhook_allow_cidrs,
    }
    try:
        prepared = prepare_many([dict(r) for r in requests], **limits)
        if keyed := keyed_requests(prepared):
            taken = producer.redis.mget([producer.keys.idempotency(k) for k in keyed])
            check_taken_keys(keyed, taken)
        return
    except InvalidRequest as exc:
        first = _at_line(exc, lines)
    # Say what is wrong with each bad line (up to a few), not only the first.
    errors = []
    for request, number in zip(requests, lines, strict=True):
        try:
            prepare_request(dict(request), **limits)
        except InvalidRequest as exc:
            errors.append(f"line {number}: {exc}")
            if len(errors) == _ERRORS_SHOWN:
                break
    raise fail(_errors(path, errors or [first]))


def _at_line(exc: Exception, lines: list[int], offset: int = 0) -> str:
    field = getattr(exc, "field", "")
    match = _POSITION.match(field)
    if match is None:
        return str(exc)
    number = lines[offset + int(match.group(1))]
    return f"line {number}: {match.group(2) or 'request'}: {getattr(exc, 'rule', exc)}"


def _errors(path: Path, errors: list[str]) -> str:
    more = " (and maybe more)" if len(errors) >= _ERRORS_SHOWN else ""
    return f"{path}: nothing submitted: " + "; ".join(errors) + more


def _kept(stored: int, output: Path | None) -> str:
    if not stored:
        return "; nothing submitted"
    return f"; the {stored:,} requests before it were submitted (ids in {output or 'stdout'})"


def _partial(exc: Any, stored: int, total: int) -> str:
    return f"Redis refused part of the file: {exc.cause}; {stored:,} of {total:,} were submitted"
