"""The ``batchbridge`` command: run the system, try it, submit a request, look at it."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console

from shared.embedded_redis import (
    EmbeddedRedis,
    RedisUnavailable,
    child_environment,
    embedded_redis_dir,
)
from shared.settings import Settings
from worker import cli_requests, cli_webhooks
from worker.cli_requests import fail, load_settings, worker_context
from worker.processes import GaveUp, Supervised, Supervisor, WorkerProcess

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()
err_console = Console(stderr=True)
log = logging.getLogger("batchbridge")


@contextlib.contextmanager
def redis_for(settings: Settings, *, persistent: bool = True) -> Iterator[str]:
    """The configured Redis URL, or a private embedded Redis for the duration of the block."""
    with _redis_server(settings, persistent=persistent) as (url, _server):
        yield url


@contextlib.contextmanager
def _redis_server(
    settings: Settings, *, persistent: bool = True
) -> Iterator[tuple[str, EmbeddedRedis | None]]:
    if settings.redis_url:
        yield settings.redis_url, None
        return
    server = EmbeddedRedis(
        embedded_redis_dir(settings),
        persistent=persistent,
        appendfsync=settings.redis_appendfsync,
    )
    url = server.start()
    err_console.print(
        f"started embedded Redis at {url} (data in {server.directory}, "
        f"appendfsync {settings.redis_appendfsync})"
    )
    try:
        yield url, server
    finally:
        server.stop()


@app.command()
def up(
    concurrency: Annotated[int | None, typer.Option(help="worker processes")] = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level")] = "INFO",
    max_restarts: Annotated[
        int, typer.Option(help="give up on a child that dies this many times ...")
    ] = 5,
    restart_window: Annotated[float, typer.Option(help="... within this many seconds")] = 60.0,
) -> None:
    """Run Redis (embedded when BATCHBRIDGE_REDIS_URL is unset), a worker and its beat.

    A child that dies is restarted (with backoff); one that keeps dying makes ``up`` exit 1
    saying which. Redis or a database that cannot be reached at start-up: exit 2.
    """
    settings = load_settings()
    err_console.print(f"provider: {settings.default_provider}")
    try:
        with _redis_server(settings) as (url, server):
            _preflight(settings, url)
            worker = WorkerProcess(
                child_environment(settings, url),
                concurrency=concurrency or settings.worker_concurrency,
                loglevel=loglevel,
                schedule_path=settings.data_dir / "celerybeat-schedule",
            )
            children = [_supervised_worker(worker)]
            if server is not None:
                children.insert(0, _supervised_redis(server))
            worker.start()
            stop = _stop_on_signals()
            try:
                Supervisor(
                    children,
                    max_deaths=max_restarts,
                    window=restart_window,
                    say=lambda message: err_console.print(f"[yellow]{message}[/yellow]"),
                ).watch(stop)
            finally:
                err_console.print("stopping worker ...")
                worker.stop()
    except GaveUp as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    err_console.print("stopped")


def _preflight(settings: Settings, redis_url: str) -> None:
    """Exit 2, saying why, when Redis or the database cannot be reached at all."""
    from redis import Redis
    from redis.exceptions import RedisError

    from shared.db import make_engine

    client = Redis.from_url(redis_url, socket_connect_timeout=5, socket_timeout=5)
    try:
        client.ping()
    except RedisError as exc:
        err_console.print(f"[red]error:[/red] cannot reach Redis at {redis_url}: {exc}")
        raise typer.Exit(2) from None
    finally:
        client.close()
    try:
        make_engine(settings).dispose()
    except Exception as exc:  # any driver's error: say it and stop
        err_console.print(f"[red]error:[/red] cannot use the database: {exc}")
        raise typer.Exit(2) from None


def _supervised_worker(worker: WorkerProcess) -> Supervised:
    def restart() -> None:
        worker.stop()  # leaves none of the dead worker's pool or beat behind
        worker.start()

    def exit_code() -> int | None:
        return worker.process.poll() if worker.process is not None else None

    return Supervised("the worker", restart, worker.alive, exit_code)


def _supervised_redis(server: EmbeddedRedis) -> Supervised:
    def restart() -> None:
        server.kill()  # reap the dead process; the same port and files come back
        server.start()

    return Supervised(
        f"the embedded Redis (port {server.port})", restart, server.alive, server.exit_code
    )


def _stop_on_signals() -> Callable[[], bool]:
    requested = False

    def handler(_signum: int, _frame: object) -> None:
        nonlocal requested
        requested = True

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return lambda: requested


@app.command()
def demo(
    requests: Annotated[int, typer.Option(help="how many sample requests to push")] = 1200,
    timeout: Annotated[float, typer.Option(help="give up after this many seconds")] = 300.0,
) -> None:
    """Push a sample classification workload through the whole pipeline and summarise it."""
    from worker.demo import run_demo

    raise typer.Exit(run_demo(console, requests=requests, timeout=timeout))


@app.command()
def submit(
    model: Annotated[str, typer.Option(help="model name")],
    prompt: Annotated[str, typer.Option(help="the user message")],
    max_tokens: Annotated[int | None, typer.Option(help="max_tokens")] = None,
    wait: Annotated[bool, typer.Option(help="wait for the result and print it")] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait")] = 600.0,
    callback_queue: Annotated[str | None, typer.Option(help="callback queue")] = None,
    webhook_url: Annotated[
        str | None, typer.Option(help="POST the signed result to this URL")
    ] = None,
) -> None:
    """Submit one request; print its id (and, with --wait, its result)."""
    from producer import InvalidRequest, Producer

    settings = load_settings()
    try:
        producer = Producer(settings=settings)
        handle = producer.submit(
            model,
            [{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            callback_queue=callback_queue,
            webhook_url=webhook_url,
        )
    except (InvalidRequest, RedisUnavailable) as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(handle.id)
    if wait:
        try:
            result = handle.wait(timeout)
        except TimeoutError as exc:
            err_console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1) from None
        shown = orjson.dumps(result.model_dump(mode="json"), option=orjson.OPT_INDENT_2)
        sys.stdout.write(shown.decode() + "\n")


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Pending requests per (provider, model) and batches by state."""
    from worker.status import collect_status, render_status

    settings = load_settings()
    try:
        report = collect_status(settings)
    except RedisUnavailable as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    if as_json:
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        render_status(console, report)


@app.command("local-api")
def local_api(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8765,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="BATCHBRIDGE_LOCAL_API_KEY", help="require this bearer token"),
    ] = None,
    concurrency: Annotated[int, typer.Option(help="batches run at once")] = 2,
    fail_rate: Annotated[
        float | None, typer.Option(help="fraction of API calls answered 429 or 500")
    ] = None,
    line_error_rate: Annotated[
        float | None, typer.Option(help="fraction of lines failed with a retryable error")
    ] = None,
    expire_after: Annotated[
        float | None, typer.Option(help="running batches turn EXPIRED after this many seconds")
    ] = None,
    line_delay: Annotated[float | None, typer.Option(help="seconds of work per line")] = None,
    lost_answer_rate: Annotated[
        float | None,
        typer.Option(help="fraction of batch creates that happen but are answered 500/504"),
    ] = None,
    answer_delay: Annotated[
        float | None,
        typer.Option(help="seconds every API answer is held back after the call took effect"),
    ] = None,
    not_found_window: Annotated[
        str | None,
        typer.Option(
            metavar="START:DURATION",
            help="seconds after start during which batch retrieves answer 404",
        ),
    ] = None,
) -> None:
    """Serve a Together-compatible Batch API backed by the local provider (no Redis needed)."""
    import dataclasses

    from shared.local_api.server import serve
    from shared.providers.local.faults import Faults, parse_window

    settings = load_settings()
    try:
        faults = Faults.from_env()
        given: dict[str, Any] = {
            "fail_rate": fail_rate,
            "line_error_rate": line_error_rate,
            "expire_after": expire_after,
            "line_delay": line_delay,
            "lost_answer_rate": lost_answer_rate,
            "answer_delay": answer_delay,
            "not_found_window": None
            if not_found_window is None
            else parse_window(not_found_window, "--not-found-window"),
        }
        faults = dataclasses.replace(faults, **{k: v for k, v in given.items() if v is not None})
    except ValueError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    root = settings.data_dir / "local_api"
    serve(host, port, root, api_key=api_key, faults=faults, concurrency=concurrency)


callbacks_app = typer.Typer(no_args_is_help=True, help="Look into callback queues.")
app.add_typer(callbacks_app, name="callbacks")


@callbacks_app.command("dead")
def callbacks_dead(
    queue: Annotated[str, typer.Argument(help="callback queue name")],
    limit: Annotated[int, typer.Option(min=1, help="show at most this many, oldest first")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Results of QUEUE moved to its dead-letter stream after too many unacked deliveries."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from producer.callback_queue import CallbackQueue

    settings = load_settings()
    try:
        callbacks = CallbackQueue(queue, settings=settings)
        try:
            total, letters = callbacks.dead_count(), callbacks.dead_letters(limit)
        finally:
            callbacks.close()
    except (RedisUnavailable, RedisConnectionError) as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    if as_json:
        entries = [
            {
                "id": d.delivery_id,
                "request_id": d.request_id,
                "deliveries": d.deliveries,
                "moved_at": d.moved_at.isoformat(),
                "status": d.status,
                "reason": d.reason,
                "dead_id": d.dead_id,
                "result": d.result_value(),
            }
            for d in letters
        ]
        report = {"queue": queue, "total": total, "dead": entries}
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    if total == 0:
        console.print(f"no dead-lettered results in queue {queue!r}")
        return
    # Plain aligned columns, never wrapped, so ids stay whole and the output greps well.
    rows = [("id", "request id", "deliveries", "moved at (UTC)", "status")]
    for d in letters:
        moved = d.moved_at.strftime("%Y-%m-%d %H:%M:%S")
        rows.append((d.delivery_id, d.request_id, str(d.deliveries), moved, d.status or "?"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    shown = f"the oldest {len(letters)} of {total}" if total > len(letters) else f"all {total}"
    lines = [f"dead-lettered results in queue {queue!r}: {shown}"]
    lines += [
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    sys.stdout.write("\n".join(lines) + "\n")


batches_app = typer.Typer(no_args_is_help=True, help="Look after batches by hand.")
app.add_typer(batches_app, name="batches")


@batches_app.command("fail")
def batches_fail(
    batch_id: Annotated[str, typer.Argument(help="the batch to give up on")],
    force: Annotated[
        bool, typer.Option(help="fail it even though a create may have reached the provider")
    ] = False,
) -> None:
    """Fail a batch that was never submitted (e.g. held); its requests get failed results."""
    from worker.lifecycle import NotFailable, fail_unsent_batch

    with worker_context() as ctx:
        try:
            batch = fail_unsent_batch(ctx, batch_id, force=force)
        except NotFailable as exc:
            raise fail(exc) from None
    console.print(
        f"batch {batch.id} failed: its {batch.request_count} requests get failed results "
        "at the next collect"
    )


app.command("cancel")(cli_requests.cancel)
app.command("result")(cli_requests.result)
batches_app.command("cancel")(cli_requests.batches_cancel)


def main() -> None:
    """Console-script entry point."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
app.add_typer(cli_webhooks.app, name="webhooks")
