"""The ``batchbridge`` command: run the system, try it, submit a request, look at it."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import time
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
from shared.settings import Settings, SettingsError
from worker.processes import WorkerProcess

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()
err_console = Console(stderr=True)
log = logging.getLogger("batchbridge")


def load_settings() -> Settings:
    """Settings from the environment, or exit 2 with the offending variable named."""
    try:
        return Settings.load()
    except SettingsError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


@contextlib.contextmanager
def redis_for(settings: Settings, *, persistent: bool = True) -> Iterator[str]:
    """The configured Redis URL, or a private embedded Redis for the duration of the block."""
    if settings.redis_url:
        yield settings.redis_url
        return
    server = EmbeddedRedis(embedded_redis_dir(settings), persistent=persistent)
    url = server.start()
    err_console.print(f"started embedded Redis at {url} (data in {server.directory})")
    try:
        yield url
    finally:
        server.stop()


@app.command()
def up(
    concurrency: Annotated[int | None, typer.Option(help="worker processes")] = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level")] = "INFO",
) -> None:
    """Run Redis (embedded when BATCHBRIDGE_REDIS_URL is unset), a worker and its beat."""
    settings = load_settings()
    err_console.print(f"provider: {settings.default_provider}")
    with redis_for(settings) as url:
        worker = WorkerProcess(
            child_environment(settings, url),
            concurrency=concurrency or settings.worker_concurrency,
            loglevel=loglevel,
            schedule_path=settings.data_dir / "celerybeat-schedule",
        ).start()
        stop = _stop_on_signals()
        try:
            while worker.alive() and not stop():
                time.sleep(0.2)
        finally:
            err_console.print("stopping worker ...")
            worker.stop()
    err_console.print("stopped")


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
) -> None:
    """Serve a Together-compatible Batch API backed by the local provider (no Redis needed)."""
    import dataclasses

    from shared.local_api.server import serve
    from shared.providers.local.faults import Faults

    settings = load_settings()
    try:
        faults = Faults.from_env()
        given: dict[str, Any] = {
            "fail_rate": fail_rate,
            "line_error_rate": line_error_rate,
            "expire_after": expire_after,
            "line_delay": line_delay,
        }
        faults = dataclasses.replace(faults, **{k: v for k, v in given.items() if v is not None})
    except ValueError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    root = settings.data_dir / "local_api"
    serve(host, port, root, api_key=api_key, faults=faults, concurrency=concurrency)


def main() -> None:
    """Console-script entry point."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
