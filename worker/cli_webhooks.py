"""``batchbridge webhooks``: dead-lettered deliveries, replays, endpoints that said 410."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from worker.cli_requests import console, fail, worker_context

app = typer.Typer(no_args_is_help=True, help="Look after webhook deliveries.")


@app.command("failed")
def failed(
    limit: Annotated[int, typer.Option(min=1, help="show at most this many")] = 50,
) -> None:
    """List dead-lettered deliveries, newest first (replay them with `webhooks replay`)."""
    from worker.webhook_admin import failed_deliveries

    with worker_context() as ctx:
        rows = failed_deliveries(ctx, limit)
    if not rows:
        console.print("no dead-lettered webhook deliveries")
        return
    lines = [f"{len(rows)} dead-lettered webhook deliveries (newest first):"]
    for row in rows:
        when = f"{row.finished_at:%Y-%m-%d %H:%M:%S}" if row.finished_at else "-"
        status = str(row.last_status) if row.last_status is not None else "-"
        lines.append(
            f"  {row.id}  {row.event_type}  {row.url}  attempts={row.attempts}  "
            f"last={status}  at={when}  {row.last_error or ''}".rstrip()
        )
    sys.stdout.write("\n".join(lines) + "\n")


@app.command("replay")
def replay(
    ids: Annotated[
        list[str] | None, typer.Argument(help="delivery ids (msg_...) or request ids")
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="replay every dead delivery")] = False,
) -> None:
    """Send dead-lettered deliveries again (same webhook-id, same body, new signatures)."""
    from worker.webhook_admin import replay as replay_deliveries

    if bool(ids) == all_:
        raise fail("give delivery ids or --all (not both)")
    with worker_context() as ctx:
        queued = replay_deliveries(ctx, None if all_ else ids)
    if ids:
        missing = {i if i.startswith("msg_") else f"msg_{i}" for i in ids} - set(queued)
        if missing:
            raise fail(f"not dead-lettered (or unknown): {', '.join(sorted(missing))}", 1)
    console.print(f"{len(queued)} deliveries queued to be sent again")


@app.command("enable")
def enable(url: Annotated[str, typer.Argument(help="the endpoint URL that answered 410")]) -> None:
    """Send to an endpoint again after it answered 410 Gone (its dead deliveries stay dead)."""
    from worker.webhook_admin import enable_endpoint

    with worker_context() as ctx:
        if not enable_endpoint(ctx, url):
            raise fail(f"{url} is not disabled", 1)
    console.print(f"{url} enabled")
