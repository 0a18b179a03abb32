"""``batchbridge cancel``, ``result`` and ``batches cancel``: one request or batch by hand."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import orjson
import typer
from rich.console import Console

from shared.embedded_redis import RedisUnavailable
from shared.settings import Settings, SettingsError

if TYPE_CHECKING:
    from worker.context import WorkerContext

console = Console()
err_console = Console(stderr=True)


def load_settings() -> Settings:
    """Settings from the environment, or exit 2 with the offending variable named."""
    try:
        return Settings.load()
    except SettingsError as exc:
        raise fail(exc) from None


def debugging() -> bool:
    """Whether ``batchbridge --debug`` was given (read by ``main`` too, outside any command)."""
    return "--debug" in sys.argv[1:]


def cli_failure(exc: BaseException) -> BaseException:
    """What to raise for ``exc``: one described line and an exit, or under --debug ``exc``."""
    from shared.errors import describe_error, exit_code_for

    return exc if debugging() else fail(describe_error(exc), exit_code_for(exc))


def fail(message: object, code: int = 2) -> typer.Exit:
    """Print ``message`` as an error; the exit to raise (2: usage or set-up, 1: the answer)."""
    err_console.print(f"[red]error:[/red] {message}", soft_wrap=True)
    return typer.Exit(code)


@contextmanager
def worker_context() -> Iterator[WorkerContext]:
    """A worker context on the configured Redis and database, closed when the block ends."""
    from worker.context import WorkerContext

    settings = load_settings()
    try:
        ctx = WorkerContext.create(settings)
    except RedisUnavailable as exc:
        raise fail(exc) from None
    try:
        yield ctx
    finally:
        ctx.close()


def cancel(
    request_id: Annotated[str, typer.Argument(help="the request to cancel")],
) -> None:
    """Cancel a request in any state; exit 1 if it had already finished or is unknown."""
    from producer import Producer

    settings = load_settings()
    try:
        with Producer(settings=settings) as producer:
            outcome = producer.try_cancel(request_id)
    except RedisUnavailable as exc:
        raise fail(exc) from None
    if outcome.kind == "cancelled":
        console.print(f"request {request_id} cancelled")
    elif outcome.kind == "marked":
        console.print(
            f"request {request_id} is in a batch already: it will be reported cancelled when "
            "its batch ends, its answer discarded (the provider may still bill it)"
        )
    elif outcome.kind == "finished":
        raise fail(f"request {request_id} already finished: {outcome.outcome}", 1)
    else:
        raise fail(f"no request {request_id!r} is known", 1)


def result(
    request_id: Annotated[str, typer.Argument(help="the request whose result to print")],
) -> None:
    """Print a request's result as JSON (from Redis, or the SQL record after its TTL)."""
    from producer import Producer

    settings = load_settings()
    try:
        with Producer(settings=settings) as producer:
            found = producer.result(request_id)
            state = producer.state(request_id) if found is None else found.status
    except RedisUnavailable as exc:
        raise fail(exc) from None
    if found is None:
        raise fail(f"request {request_id} has no result yet (state: {state})", 1)
    shown = orjson.dumps(found.model_dump(mode="json"), option=orjson.OPT_INDENT_2)
    sys.stdout.write(shown.decode() + "\n")


def batches_cancel(
    batch_id: Annotated[str, typer.Argument(help="the batch to cancel")],
    requeue: Annotated[
        bool, typer.Option(help="send its unfinished requests round again instead")
    ] = False,
) -> None:
    """Cancel a batch at the provider: finished lines are delivered, the rest cancelled."""
    from worker.batch_cancel import NotCancellable, request_batch_cancel

    with worker_context() as ctx:
        try:
            said = request_batch_cancel(ctx, batch_id, requeue=requeue)
        except NotCancellable as exc:
            raise fail(exc, 1) from None
    console.print(said)
