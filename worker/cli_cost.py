"""``batchbridge cost``: spend at batch prices, the same tokens at real-time prices, savings."""

from __future__ import annotations

import sys
from decimal import ROUND_HALF_UP, Decimal
from typing import Annotated, cast

import orjson
import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shared.pricing import PriceFileError, load_price_table
from shared.settings import ENV_PREFIX
from worker.cli_requests import console, fail, load_settings
from worker.cost_report import (
    DEFAULT_SINCE,
    GROUPINGS,
    CostLine,
    CostReport,
    CostSection,
    GroupBy,
    build_report,
    parse_since,
)

_CENT = Decimal("0.01")
_MICRO = Decimal("0.000001")
_KEY_TITLES = {"model": "model", "batch": "batch", "callback_queue": "callback queue"}


def cost(
    since: Annotated[
        str, typer.Option(help="how far back, by finish time: e.g. 7d, 12h, 30m, 2w")
    ] = DEFAULT_SINCE,
    by: Annotated[str, typer.Option(help="group by model, batch or callback_queue")] = "model",
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Spend at batch prices, the same tokens at real-time prices, and the savings."""
    from shared.db import make_engine

    try:
        window = parse_since(since)
    except ValueError as exc:
        raise fail(f"--since: {exc}") from None
    if by not in GROUPINGS:
        raise fail(f"--by: must be one of {', '.join(GROUPINGS)} (got {by!r})")
    settings = load_settings()
    try:
        prices = load_price_table(settings.prices_file)
    except PriceFileError as exc:
        raise fail(exc) from None
    engine = make_engine(settings)
    try:
        report = build_report(
            engine, prices, since=window, by=cast(GroupBy, by), window=since.strip()
        )
    finally:
        engine.dispose()
    if as_json:
        shown = orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2)
        sys.stdout.write(shown.decode() + "\n")
    else:
        render_report(report, console)


def render_report(report: CostReport, out: Console) -> None:
    """Print the report as rich tables: billed spend, then dry runs apart."""
    out.print(
        f"[bold]Cost[/bold] of requests finished since {report.since:%Y-%m-%d %H:%M} UTC "
        f"(last {report.window or 'window'}), by {_KEY_TITLES[report.by]}"
    )
    if report.billed.lines:
        out.print(_table(report, report.billed, "Billed (provider usage at list prices)"))
        _unpriced_note(report.billed, out)
    else:
        out.print("No billed requests with usage finished in this window.")
    if report.dry_run.lines:
        out.print(
            _table(
                report,
                report.dry_run,
                "Dry runs (local echo engine: nothing billed; what the tokens would cost)",
            )
        )
        _unpriced_note(report.dry_run, out)
    else:
        out.print("No dry runs (local echo engine) finished in this window.")


def _table(report: CostReport, section: CostSection, title: str) -> Table:
    table = Table(
        title=title,
        title_justify="left",
        caption="prompt, completion: tokens; batch, real-time: the price of those tokens, USD",
        caption_justify="left",
        show_footer=True,
        # No vertical rules and single spaces between columns: the figures need the width
        # (all seven fit in 80 columns).
        box=box.SIMPLE_HEAD,
        collapse_padding=True,
        pad_edge=False,
    )
    total = section.total
    # Names fold rather than end in "…" (a cut-off model name is no use), and never shrink
    # to nothing beside the numbers. A batch or queue shows its models under its name.
    key_title = _KEY_TITLES[report.by] + ("" if report.by == "model" else " / model")
    table.add_column(key_title, footer="total", overflow="fold", min_width=12)
    numeric = [
        ("requests", f"{total.requests:,}"),
        ("prompt", f"{total.prompt_tokens:,}"),
        ("completion", f"{total.completion_tokens:,}"),
        ("batch", _money(total, "batch")),
        ("real-time", _money(total, "realtime")),
        ("savings", _money(total, "savings")),
    ]
    for header, footer in numeric:
        table.add_column(header, footer=footer, justify="right", no_wrap=True)
    for line in section.lines:
        cells = [_key(line, report.by)]
        cells += [
            f"{line.requests:,}",
            f"{line.prompt_tokens:,}",
            f"{line.completion_tokens:,}",
            _money(line, "batch"),
            _money(line, "realtime"),
            _money(line, "savings"),
        ]
        table.add_row(*cells)
    return table


def _unpriced_note(section: CostSection, out: Console) -> None:
    total = section.total
    if not total.unpriced_requests:
        return
    models = escape(", ".join(sorted(total.unpriced_models)))
    out.print(
        f"* {total.unpriced_requests:,} request(s) on unpriced models ({models}) are left out of "
        f"the amounts: add their prices to a file named by {ENV_PREFIX}PRICES_FILE.",
        soft_wrap=True,
    )


def _key(line: CostLine, by: str) -> str:
    if by == "model":
        return escape(line.key)
    name = "(none)" if by == "callback_queue" and not line.key else line.key
    return f"{escape(name)}\n[dim]{escape(', '.join(sorted(line.models)))}[/dim]"


def _money(line: CostLine, which: str) -> str:
    # A line with nothing priced says so: an unknown price is never shown as $0.
    if line.cost is None:
        return "unpriced"
    amount = {
        "batch": line.cost.batch,
        "realtime": line.cost.realtime,
        "savings": line.cost.savings,
    }[which]
    # "*": the amount leaves out this line's unpriced requests (the note below says which).
    return format_usd(amount) + ("*" if line.unpriced_requests else "")


def format_usd(amount: Decimal) -> str:
    """Dollars for people: cents, or micro-dollars below one cent so small runs show."""
    if amount == 0:
        return "$0.00"
    if abs(amount) >= _CENT:
        return f"${amount.quantize(_CENT, rounding=ROUND_HALF_UP):,}"
    micro = amount.quantize(_MICRO, rounding=ROUND_HALF_UP)
    return f"${micro}" if micro else "<$0.000001"
