"""``status`` and ``batches list|show`` as text: rich tables an operator reads at a glance."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from worker.status_buffers import human_seconds

_ERROR_SHOWN = 160  # characters of a batch's error in a table; `batches show` has it all
# Statuses that mean something went wrong, shown in red.
_BAD = frozenset({"failed", "held", "expired", "lost", "no_output"})
# Only free text wraps: ids are copied into other commands, and numbers read badly split.
_WRAPPED = frozenset({"model", "flushes", "note", "reason", "error", "progress", "requests"})
# (A min_width on the last column would make rich crop it.)
_MIN_WIDTHS = {"model": 16}
_HOLD_PREFIX = re.compile(r"^on hold \(requests kept; .*? gives up\): ")


def _table(title: str | None, *columns: str, right: tuple[str, ...] = ()) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, collapse_padding=True)
    for column in columns:
        table.add_column(
            column,
            justify="right" if column in right else "left",
            no_wrap=column not in _WRAPPED,
            overflow="fold",
            min_width=_MIN_WIDTHS.get(column),
        )
    return table


def _batch_cell(b: dict[str, Any]) -> Text:
    # The model goes under the id, not in a column of its own: the id stays whole, and the
    # tables fit 80 columns.
    cell = Text(b["batch"])
    cell.append(f"\n{b['model']}", style="dim")
    return cell


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else human_seconds(seconds)


def _status(status: str, state: str | None = None) -> Text:
    shown = status if state in (None, status) else f"{status} ({state})"
    return Text(shown, style="bold red" if status in _BAD else "")


def _short(error: str | None) -> str:
    if not error:
        return ""
    # The held table's title already says how to give up on a held batch.
    error = _HOLD_PREFIX.sub("", error)
    return error if len(error) <= _ERROR_SHOWN else error[: _ERROR_SHOWN - 1] + "…"


def render_status(report: dict[str, Any]) -> RenderableType:
    """The whole status report as one renderable (printed once, or refreshed by --watch)."""
    sources = report["sources"]
    parts: list[RenderableType] = [
        Text(f"batchbridge status at {report['generated_at'][:19]}Z", style="bold"),
        Text(f"redis {sources['redis']}  database {sources['database']}", style="dim"),
    ]
    parts.append(_pending(report))
    parts.append(_batches(report))
    if report["active_batches"]:
        parts.append(_active(report["active_batches"]))
    if report["held_batches"]:
        parts.append(_held(report["held_batches"]))
    if report["failed_batches"]:
        parts.append(_failed(report["failed_batches"], report["failed_batches_total"]))
    shown = {b["batch"] for b in report["active_batches"] + report["held_batches"]}
    errored = [b for b in report["batches_with_errors"] if b["batch"] not in shown]
    if errored:
        table = _table("Other unfinished batches with errors", "batch", "status", "error")
        for b in errored:
            table.add_row(b["batch"], _status(b["status"]), _short(b["error"]))
        parts.append(table)
    parts.append(_requests(report["requests"]))
    parts.append(_callbacks(report["callback_queues"]))
    parts.append(_webhooks(report["webhooks"]))
    if report["uncommitted_claims"]:
        parts.append(Text(f"{report['uncommitted_claims']} claim(s) being packed right now"))
    return Group(*parts)


def _pending(report: dict[str, Any]) -> RenderableType:
    t = report["thresholds"]
    title = (
        f"Pending requests (a buffer flushes at {t['max_batch_requests']:,} requests, "
        f"{t['max_batch_bytes']:,} bytes or {t['max_wait_seconds']:g} s of age)"
    )
    if not report["pending"]:
        return Text(f"{title}: none waiting")
    table = _table(
        title, "provider", "model", "count", "bytes", "oldest", "flushes", right=("count", "bytes")
    )
    for row in report["pending"]:
        flush = row["flush"]
        table.add_row(
            row["provider"],
            row["model"],
            f"{row['count']:,}",
            f"{row['bytes']:,}",
            human_seconds(row["oldest_age_seconds"]),
            Text(flush["text"], style="yellow" if flush["due"] else ""),
        )
    return table


def _batches(report: dict[str, Any]) -> RenderableType:
    if not report["batches"]:
        return Text("Batches: none yet")
    table = _table(
        "Batches", "provider", "status", "batches", "requests", "oldest", "ended",
        right=("batches",),
    )  # fmt: skip
    for g in report["batches"]:
        ended = g["last_ended_seconds_ago"]
        table.add_row(
            g["provider"],
            _status(g["status"], g["state"]),
            f"{g['count']:,}",
            _progress(g) + (f", {g['requeued']:,} requeued" if g["requeued"] else ""),
            _age(g["oldest_age_seconds"]),
            "-" if ended is None else f"{human_seconds(ended)} ago",
        )
    return table


def _progress(b: dict[str, Any]) -> str:
    done = b["completed"] + b["failed"]
    failed = f" ({b['failed']:,} failed)" if b["failed"] else ""
    return f"{done:,} of {b['requests']:,} done{failed}"


def _active(batches: list[dict[str, Any]]) -> RenderableType:
    table = _table(
        "Unfinished batches (oldest first)",
        "batch / model",
        "status",
        "progress",
        "age",
        "note",
    )
    for b in batches:
        notes = []
        if b["provider_status"]:
            notes.append(f"provider: {b['provider_status'].lower()}")
        if b["cancel_requested_at"]:
            notes.append("cancel requested")
        # A held batch's reason is in the held table below.
        notes.append("see below" if b["status"] == "held" else _short(b["error"]))
        table.add_row(
            _batch_cell(b), _status(b["status"]), _progress(b), _age(b["age_seconds"]),
            "; ".join(n for n in notes if n),
        )  # fmt: skip
    return table


def _held(batches: list[dict[str, Any]]) -> RenderableType:
    table = _table(
        f"Held batches: {len(batches)} (requests kept; `batchbridge batches fail ID` gives up)",
        "batch / model",
        "requests",
        "held for",
        "reason",
        right=("requests",),
    )
    for b in batches:
        table.add_row(
            _batch_cell(b), f"{b['requests']:,}", _age(b["held_seconds"]),
            Text(_short(b["error"]), style="red"),
        )  # fmt: skip
    return table


def _failed(batches: list[dict[str, Any]], total: int) -> RenderableType:
    table = _table(
        f"Failed batches: {total} (most recent first)",
        "batch / model",
        "requests",
        "ended",
        "reason",
        right=("requests",),
    )
    for b in batches:
        ago = b["ended_seconds_ago"]
        ended = f"{human_seconds(ago)} ago" if b["finished_at"] else "not collected yet"
        table.add_row(
            _batch_cell(b), f"{b['requests']:,}", ended,
            Text(_short(b["error"]), style="red"),
        )  # fmt: skip
    return table


def _requests(windows: dict[str, dict[str, int]]) -> RenderableType:
    table = _table(
        "Requests ended", "", "completed", "failed", "cancelled",
        right=("completed", "failed", "cancelled"),
    )  # fmt: skip
    for name, label in (("last_hour", "last hour"), ("last_day", "last day")):
        counts = windows[name]
        table.add_row(
            label,
            f"{counts['completed']:,}",
            Text(f"{counts['failed']:,}", style="red" if counts["failed"] else ""),
            f"{counts['cancelled']:,}",
        )
    return table


def _callbacks(queues: list[dict[str, Any]]) -> RenderableType:
    if not queues:
        return Text("Callback queues: none yet")
    table = _table(
        "Callback queues",
        "queue",
        "unacked",
        "delivered",
        "undelivered",
        "oldest",
        "consumers",
        "dead",
        right=("unacked", "delivered", "undelivered", "consumers", "dead"),
    )
    for q in queues:
        table.add_row(
            q["queue"],
            f"{q['unacked']:,}",
            f"{q['delivered']:,}",
            f"{q['undelivered']:,}",
            _age(q["oldest_age_seconds"]),
            str(q["consumers"]),
            Text(f"{q['dead']:,}", style="red" if q["dead"] else ""),
        )
    return table


def _webhooks(counts: dict[str, int]) -> RenderableType:
    line = Text(
        f"Webhooks: {counts['pending']:,} pending ({counts['outbox']:,} queued in Redis), "
        f"{counts['delivered']:,} delivered, "
    )
    line.append(f"{counts['dead']:,} dead", style="red" if counts["dead"] else "")
    if counts["dead"]:
        line.append(" (`batchbridge webhooks failed` lists them, `webhooks replay` resends)")
    return line


def render_batch_list(batches: list[dict[str, Any]]) -> RenderableType:
    """``batches list`` as a table, the errors under it (whole ids, nothing cut to fit)."""
    if not batches:
        return Text("no batches")
    table = _table(None, "batch / model", "provider", "status", "progress", "age")
    errors = Table.grid(padding=(0, 1))
    errors.add_column(no_wrap=True)
    errors.add_column(overflow="fold")
    for b in batches:
        table.add_row(
            _batch_cell(b), b["provider"], _status(b["status"]), _progress(b),
            _age(b["age_seconds"]),
        )  # fmt: skip
        if b["error"]:
            errors.add_row(f"{b['batch']}:", Text(_short(b["error"]), style="red"))
    if not errors.row_count:
        return table
    return Group(table, Text("errors (`batchbridge batches show ID` has all of each):"), errors)


def _when(iso: str | None, now_iso: str) -> str:
    if not iso:
        return "-"
    ago = (datetime.fromisoformat(now_iso) - datetime.fromisoformat(iso)).total_seconds()
    relative = f"{human_seconds(ago)} ago" if ago >= 0 else f"in {human_seconds(-ago)}"
    return f"{iso[:19]}Z ({relative})"


def render_batch(d: dict[str, Any], now_iso: str) -> RenderableType:
    """``batches show``: every field an operator may need, one per line."""
    r = d["record"]
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    status = d["status"]
    if d["outcome"]:
        status += f" (state {d['state']}, outcome {d['outcome']})"
    elif status != d["state"]:
        status += f" (state {d['state']})"
    by_state = ", ".join(f"{k} {v:,}" for k, v in d["requests_by_state"].items()) or "none"
    rows: list[tuple[str, str | Text]] = [
        ("batch", f"{d['batch']} ({d['provider']}, {d['model']})"),
        ("status", _status(status)),
        (
            "requests",
            f"{d['requests']:,}: {_progress(d)}, {d['requeued']:,} requeued "
            f"(rows by state now: {by_state})",
        ),
        ("bytes", f"{r['bytes']:,}"),
        ("flushed by", r["flush_reason"] or "-"),
        ("created", _when(r["created_at"], now_iso)),
        ("submitted", _when(r["submitted_at"], now_iso)),
        ("finished", _when(r["finished_at"], now_iso)),
        ("updated", _when(r["updated_at"], now_iso)),
        ("next look", _when(r["next_poll_at"], now_iso)),
        ("provider file", r["provider_file_id"] or "-"),
        ("provider batch", r["provider_batch_id"] or "-"),
        ("provider status", r["provider_status"] or "-"),
        ("output file", r["output_file_id"] or "-"),
        ("error file", r["error_file_id"] or "-"),
        (
            "submit attempts",
            f"{r['submit_attempts']} ({r['ambiguous_creates']} ambiguous creates; a create "
            + (
                f"in flight since {_when(r['create_started_at'], now_iso)})"
                if r["create_started_at"]
                else "in flight: no)"
            ),
        ),
        ("held since", _when(r["held_since"], now_iso)),
        (
            "cancel",
            f"{r['cancel_mode']} requested {_when(r['cancel_requested_at'], now_iso)}"
            if r["cancel_requested_at"]
            else "-",
        ),
        (
            "polls",
            f"{r['poll_count']} ({r['not_found_polls']} answered 404 in a row"
            f"{', since ' + _when(r['not_found_since'], now_iso) if r['not_found_since'] else ''})",
        ),
        ("collect failures", str(r["collect_failures"])),
        ("tokens", f"{r['prompt_tokens']:,} prompt, {r['completion_tokens']:,} completion"),
        ("extra jobs", str(d["extra_jobs"]) if d["extra_jobs"] else "-"),
        ("file", r["file_path"] or "-"),
        ("error", Text(r["error"], style="red") if r["error"] else "-"),
    ]
    for name, value in rows:
        grid.add_row(name, value)
    return grid
