"""``batchbridge cancel``, ``result`` and ``batches cancel``: one request or batch by hand."""

from __future__ import annotations

import sys
from typing import Annotated

import orjson
import typer
from rich.console import Console

from shared.embedded_redis import RedisUnavailable
from shared.settings import Settings, SettingsError

console = Console()
err_console = Console(stderr=True)


def _settings() -> Settings:
    try:
        return Settings.load()
    except SettingsError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


def _fail(message: object, code: int = 2) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {message}", soft_wrap=True)
    return typer.Exit(code)


def cancel(
    request_id: Annotated[str, typer.Argument(help="the request to cancel")],
) -> None:
    """Cancel a request in any state; exit 1 if it had already finished or is unknown."""
    from producer import Producer

    settings = _settings()
    try:
        with Producer(settings=settings) as producer:
            outcome = producer.try_cancel(request_id)
    except RedisUnavailable as exc:
        raise _fail(exc) from None
    if outcome.kind == "cancelled":
        console.print(f"request {request_id} cancelled")
    elif outcome.kind == "marked":
        console.print(
            f"request {request_id} is in a batch already: it will be reported cancelled when "
            "its batch ends, its answer discarded (the provider may still bill it)"
        )
    elif outcome.kind == "finished":
        raise _fail(f"request {request_id} already finished: {outcome.outcome}", 1)
    else:
        raise _fail(f"no request {request_id!r} is known", 1)


def result(
    request_id: Annotated[str, typer.Argument(help="the request whose result to print")],
) -> None:
    """Print a request's result as JSON (from Redis, or the SQL record after its TTL)."""
    from producer import Producer

    settings = _settings()
    try:
        with Producer(settings=settings) as producer:
            found = producer.result(request_id)
            state = producer.state(request_id) if found is None else found.status
    except RedisUnavailable as exc:
        raise _fail(exc) from None
    if found is None:
        raise _fail(f"request {request_id} has no result yet (state: {state})", 1)
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
    from worker.context import WorkerContext

    settings = _settings()
    try:
        ctx = WorkerContext.create(settings)
    except RedisUnavailable as exc:
        raise _fail(exc) from None
    try:
        said = request_batch_cancel(ctx, batch_id, requeue=requeue)
    except NotCancellable as exc:
        raise _fail(exc) from None
    finally:
        ctx.close()
    console.print(said)
