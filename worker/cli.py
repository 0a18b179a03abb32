"""The ``batchbridge`` command: run the system, try it, submit a request, look at it."""

from __future__ import annotations

import enum
import logging
import sys
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console

from shared.embedded_redis import RedisUnavailable
from worker import cli_cost, cli_metrics, cli_requests, cli_status, cli_submit, cli_webhooks
from worker.cli_requests import fail, load_settings, worker_context
from worker.processes import GaveUp


class CeleryLogLevel(enum.StrEnum):
    """What celery's --loglevel takes; anything else made every restart of the worker fail."""

    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"
    CRITICAL = "CRITICAL"
    FATAL = "FATAL"


app = typer.Typer(
    add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False
)
console = Console()
err_console = Console(stderr=True)
log = logging.getLogger("batchbridge")


@app.command()
def up(
    concurrency: Annotated[int | None, typer.Option(min=1, help="worker processes")] = None,
    loglevel: Annotated[
        CeleryLogLevel, typer.Option(case_sensitive=False, help="Celery log level")
    ] = CeleryLogLevel.INFO,
    max_restarts: Annotated[
        int, typer.Option(min=1, help="give up on a child that dies this many times ...")
    ] = 5,
    restart_window: Annotated[
        float, typer.Option(min=0, help="... within this many seconds")
    ] = 60.0,
    flower: Annotated[bool, typer.Option(help="run Flower on 127.0.0.1")] = True,
    flower_port: Annotated[int, typer.Option(min=1, max=65535, help="Flower's port")] = 5555,
    metrics: Annotated[bool, typer.Option(help="serve Prometheus metrics on 127.0.0.1")] = True,
    metrics_port: Annotated[int, typer.Option(min=1, max=65535, help="the metrics port")] = 9808,
    local_api: Annotated[
        bool | None,
        typer.Option(help="serve local-api at TOGETHER_BASE_URL [default: when it is loopback]"),
    ] = None,
) -> None:
    """Run the whole stack in the foreground: Redis, worker and beat, Flower, metrics.

    Redis is embedded when BATCHBRIDGE_REDIS_URL is unset; local-api runs too when the
    Together adapter's TOGETHER_BASE_URL points at this machine.

    A child that dies is restarted (with backoff); one that keeps dying makes ``up`` exit 1
    saying which. Redis or a database that cannot be reached at start-up, or a data
    directory another ``up`` holds: exit 2.
    """
    from shared.startup_checks import SetupError
    from worker.up import UpOptions, run_up

    settings = load_settings()
    options = UpOptions(
        concurrency=concurrency or settings.worker_concurrency,
        loglevel=loglevel.value,
        max_restarts=max_restarts,
        restart_window=restart_window,
        flower=flower,
        flower_port=flower_port,
        metrics=metrics,
        metrics_port=metrics_port,
        local_api=local_api,
    )
    try:
        run_up(
            settings,
            options,
            say=lambda message: err_console.print(message, highlight=False, soft_wrap=True),
            warn=lambda message: err_console.print(f"[yellow]{message}[/yellow]"),
        )
    except SetupError as exc:
        raise fail(exc) from None
    except GaveUp as exc:
        raise fail(exc, code=1) from None
    err_console.print("stopped")


@app.command()
def demo(
    requests: Annotated[int, typer.Option(min=1, help="how many sample requests to push")] = 1200,
    timeout: Annotated[float, typer.Option(min=0, help="give up after this many seconds")] = 300.0,
) -> None:
    """Push a sample classification workload through the whole pipeline and summarise it."""
    from worker.demo import run_demo

    raise typer.Exit(run_demo(console, requests=requests, timeout=timeout))


app.command("submit")(cli_submit.submit)
app.command("status")(cli_status.status)


@app.command("local-api")
def local_api(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="port to listen on")] = 8765,
    api_key: Annotated[
        str | None,
        typer.Option(envvar="BATCHBRIDGE_LOCAL_API_KEY", help="require this bearer token"),
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="batches run at once")] = 2,
    fail_rate: Annotated[
        float | None, typer.Option(min=0, max=1, help="fraction of API calls answered 429 or 500")
    ] = None,
    line_error_rate: Annotated[
        float | None,
        typer.Option(min=0, max=1, help="fraction of lines failed with a retryable error"),
    ] = None,
    expire_after: Annotated[
        float | None,
        typer.Option(min=0, help="running batches turn EXPIRED after this many seconds"),
    ] = None,
    line_delay: Annotated[
        float | None, typer.Option(min=0, help="seconds of work per line")
    ] = None,
    lost_answer_rate: Annotated[
        float | None,
        typer.Option(
            min=0, max=1, help="fraction of batch creates that happen but are answered 500/504"
        ),
    ] = None,
    answer_delay: Annotated[
        float | None,
        typer.Option(
            min=0, help="seconds every API answer is held back after the call took effect"
        ),
    ] = None,
    no_output_rate: Annotated[
        float | None,
        typer.Option(
            min=0, max=1, help="fraction of batches that complete but name no output file"
        ),
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

    from shared.providers.local.api.server import serve
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
            "no_output_rate": no_output_rate,
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
    except (RedisUnavailable, RedisConnectionError, ValueError) as exc:
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
            raise fail(exc, 1) from None
    console.print(
        f"batch {batch.id} failed: its {batch.request_count} requests get failed results "
        "at the next collect"
    )


app.command("cancel")(cli_requests.cancel)
app.command("result")(cli_requests.result)
batches_app.command("cancel")(cli_requests.batches_cancel)
batches_app.command("list")(cli_status.batches_list)
batches_app.command("show")(cli_status.batches_show)


@app.callback()
def _options(
    debug: Annotated[
        bool, typer.Option("--debug", help="show tracebacks (and debug logs) on errors")
    ] = False,
) -> None:
    """Route a single LLM request at a time into provider Batch API jobs."""
    if debug:
        logging.getLogger().setLevel(logging.DEBUG)


def main() -> None:
    """Console-script entry point: one line and a non-zero exit for errors (--debug: all)."""
    from worker.log_format import configure_cli_logging

    configure_cli_logging()
    debug = cli_requests.debugging()
    try:
        app(standalone_mode=True)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        from shared.errors import describe_error, exit_code_for

        err_console.print(f"[red]error:[/red] {describe_error(exc)}", soft_wrap=True)
        err_console.print("(run with --debug for the traceback)", style="dim")
        sys.exit(exit_code_for(exc))


app.add_typer(cli_webhooks.app, name="webhooks")
app.command("cost")(cli_cost.cost)
app.command("metrics")(cli_metrics.metrics)

if __name__ == "__main__":
    main()
