"""``batchbridge status`` (once, ``--watch`` or ``--json``) and ``batches list|show``."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import orjson
import typer
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session

from shared.embedded_redis import RedisUnavailable
from shared.errors import describe_error
from worker.cli_requests import cli_failure, console, fail, load_settings
from worker.interrupts import StopRequest

if TYPE_CHECKING:
    from worker.status import StatusSource


def _print_json(value: Any, *, indent: bool = True) -> None:
    option = orjson.OPT_INDENT_2 if indent else 0
    sys.stdout.write(orjson.dumps(value, option=option).decode() + "\n")
    sys.stdout.flush()


@contextmanager
def _source() -> Iterator[StatusSource]:
    from worker.status import StatusSource

    settings = load_settings()
    try:
        source = StatusSource(settings)
    except RedisUnavailable as exc:
        raise fail(exc) from None
    try:
        yield source
    except (RedisError, SQLAlchemyError) as exc:
        raise cli_failure(exc) from None
    finally:
        source.close()


@contextmanager
def _record() -> Iterator[Session]:
    # The record alone: batches can be looked at while Redis is down.
    from shared.db import make_engine

    settings = load_settings()
    try:
        engine = make_engine(settings)
    except SQLAlchemyError as exc:
        raise cli_failure(exc) from None
    try:
        with Session(engine) as session:
            yield session
    except SQLAlchemyError as exc:
        raise cli_failure(exc) from None
    finally:
        engine.dispose()


def status(
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="refresh until Ctrl-C")] = False,
    interval: Annotated[
        float, typer.Option(min=0.2, help="seconds between --watch refreshes")
    ] = 2.0,
) -> None:
    """Buffers and when they flush, batches, failures, outcomes, callback and webhook backlogs."""
    from worker.status_render import render_status

    with _source() as source:
        if not watch:
            report = source.collect()
            if as_json:
                _print_json(report)
            else:
                console.print(render_status(report))
            return
        try:
            if as_json:  # one compact report per line, for a pipe
                _every(interval, lambda: _print_json(source.collect(), indent=False))
            else:
                _watch(source, interval)
        except KeyboardInterrupt:
            return  # Ctrl-C is how --watch ends: exit 0, no traceback


def _every(interval: float, step: Callable[[], None]) -> None:
    # The first Ctrl-C stops the loop after the refresh in progress (worker/interrupts.py).
    with StopRequest() as stop:
        while not stop.asked:
            due = time.monotonic() + interval
            step()
            stop.sleep_until(due)


def _watch(source: StatusSource, interval: float) -> None:
    from rich.console import Group
    from rich.live import Live
    from rich.rule import Rule
    from rich.text import Text

    from worker.status_render import render_status

    def current() -> Any:
        try:
            shown: Any = render_status(source.collect())
        except (RedisError, SQLAlchemyError) as exc:
            # A blip (Redis restarting, the database failing over) is shown, not fatal.
            shown = Text(f"error: {describe_error(exc)}; retrying", style="red")
        return Group(shown, Text(f"every {interval:g} s; Ctrl-C stops", style="dim"))

    if not console.is_terminal:
        # Live only draws its last frame into a pipe or file: write each one out instead.
        _every(interval, lambda: console.print(Group(current(), Rule())))
        return
    with Live(console=console, auto_refresh=False, transient=False) as live:
        _every(interval, lambda: live.update(current(), refresh=True))


def batches_list(
    state: Annotated[
        str | None,
        typer.Option(help="only batches with this status (e.g. held, failed, submitted)"),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="show at most this many, newest first")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """List batches, newest first, with progress, age and error."""
    from worker.status_record import BATCH_STATUSES, list_batches
    from worker.status_render import render_batch_list

    if state is not None and state not in BATCH_STATUSES:
        raise fail(f"--state must be one of {', '.join(BATCH_STATUSES)} (got {state!r})")
    with _record() as session:
        batches = list_batches(session, datetime.now(UTC), state, limit)
    if as_json:
        _print_json({"batches": batches})
    else:
        console.print(render_batch_list(batches))


def batches_show(
    batch_id: Annotated[str, typer.Argument(help="the batch to describe")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Everything the record has on one batch: provider ids, counts, tokens, errors, times."""
    from worker.status_record import batch_details
    from worker.status_render import render_batch

    now = datetime.now(UTC)
    with _record() as session:
        details = batch_details(session, batch_id, now)
    if details is None:
        raise fail(f"no batch {batch_id!r} is known", 1)
    if as_json:
        _print_json(details)
    else:
        console.print(render_batch(details, now.isoformat()))
