"""What ``batchbridge cost`` reports: spend at batch prices against real-time prices, from SQL.

Which requests count: every terminal request (completed, failed or cancelled) that finished
inside the window and has usage recorded (prompt or completion tokens above 0). The provider
reporting usage is what says it ran the model, so a failed line that still came back with
usage is counted, while cancelled and never-run requests (recorded with 0 tokens) add
nothing. Tokens are the ones each request's result returned, summed per group and model:
cost is linear in tokens and computed in Decimal, so this equals summing per-request costs.

Dry runs (the local provider's echo engine: no model ran, nothing was billed) are reported
in a section of their own, never mixed into real spend.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal, get_args

from sqlalchemy import ColumnElement, Engine, func, not_, or_, select
from sqlmodel import Session

from shared.models import TERMINAL_REQUEST_STATES, Batch, Request, utcnow
from shared.pricing import ZERO_COST, Cost, PriceTable

GroupBy = Literal["model", "batch", "callback_queue"]
GROUPINGS: tuple[str, ...] = get_args(GroupBy)
DEFAULT_SINCE = "7d"
_DURATION = re.compile(r"(\d+)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}
_MAX_SINCE_SECONDS = 100 * 366 * 86_400
_TERMINAL = sorted(state.value for state in TERMINAL_REQUEST_STATES)
# The local provider only runs the echo engine (Settings.local_engine), so its batches are
# dry runs whatever their results say.
_DRY_RUN_PROVIDER = "local"
# Result.to_json writes ``dry_run`` last and only when true, so a dry run's stored result
# ends with this; a "dry_run" key inside metadata or the response body never ends the
# document that way. Matching in SQL keeps the report one aggregate query, not a JSON parse
# of every result. (``_`` is LIKE's single-character wildcard, hence the escape.)
_DRY_RUN_SUFFIX = '%,"dry\\_run":true}'


def parse_since(text: str) -> timedelta:
    """``7d``, ``12h``, ``30m``, ``45s`` or ``2w`` as a duration; ValueError saying the rule."""
    match = _DURATION.fullmatch(text.strip())
    if match is None or int(match.group(1)) == 0:
        raise ValueError(
            "must be a whole number above 0 followed by s, m, h, d or w, e.g. 7d, 12h or 30m "
            f"(got {text!r})"
        )
    seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds > _MAX_SINCE_SECONDS:  # "now minus" it would fall before year 1
        raise ValueError(f"must be at most 100 years, e.g. 5200w (got {text!r})")
    return timedelta(seconds=seconds)


@dataclass(slots=True)
class CostLine:
    """One group's requests and tokens, and what they cost (a row of the report)."""

    key: str
    models: set[str] = field(default_factory=set)
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # The cost of its priced requests; None when no request of it is priced.
    cost: Cost | None = None
    unpriced_requests: int = 0
    unpriced_models: set[str] = field(default_factory=set)

    def add(
        self, model: str, requests: int, prompt: int, completion: int, cost: Cost | None
    ) -> None:
        """Count ``requests`` of ``model`` with these tokens and cost (None: unpriced)."""
        self.models.add(model)
        self.requests += requests
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        if cost is None:
            self.unpriced_requests += requests
            self.unpriced_models.add(model)
        else:
            self.cost = cost if self.cost is None else self.cost + cost

    def merge(self, other: CostLine) -> None:
        """Add another line's figures to this one (for totals)."""
        self.models |= other.models
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        if other.cost is not None:
            self.cost = other.cost if self.cost is None else self.cost + other.cost
        self.unpriced_requests += other.unpriced_requests
        self.unpriced_models |= other.unpriced_models

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: money as exact decimal strings in USD, null where nothing is priced."""
        return {
            "key": self.key,
            "models": sorted(self.models),
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "batch_usd": usd(self.cost.batch) if self.cost else None,
            "realtime_usd": usd(self.cost.realtime) if self.cost else None,
            "savings_usd": usd(self.cost.savings) if self.cost else None,
            "unpriced_requests": self.unpriced_requests,
            "unpriced_models": sorted(self.unpriced_models),
        }


@dataclass(slots=True)
class CostSection:
    """The lines of one part of the report (billed, or dry runs) and their total."""

    lines: list[CostLine]

    @property
    def total(self) -> CostLine:
        """Every line summed; its cost covers priced requests only."""
        total = CostLine("total")
        for line in self.lines:
            total.merge(line)
        if total.cost is None and not total.unpriced_requests:
            total.cost = ZERO_COST  # nothing ran: a known $0, not an unknown price
        return total

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready lines and total."""
        return {
            "groups": [line.to_dict() for line in self.lines],
            "total": self.total.to_dict(),
        }


@dataclass(frozen=True, slots=True)
class CostReport:
    """Billed spend and dry runs for requests finished in ``[since, until]``, by ``by``."""

    since: datetime
    until: datetime
    window: str
    by: GroupBy
    billed: CostSection
    dry_run: CostSection

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (``batchbridge cost --json``)."""
        return {
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "window": self.window,
            "by": self.by,
            "currency": "USD",
            "billed": self.billed.to_dict(),
            "dry_run": self.dry_run.to_dict(),
        }


def usd(amount: Decimal) -> str:
    """An exact amount as plain decimal text: ``1.32``, never ``1.320`` or ``1.3E+0``."""
    return format(amount.normalize(), "f")


def build_report(
    engine: Engine,
    prices: PriceTable,
    *,
    since: timedelta,
    by: GroupBy = "model",
    window: str = "",
    now: datetime | None = None,
) -> CostReport:
    """The cost report of requests finished in the last ``since``, grouped ``by``."""
    if by not in GROUPINGS:
        raise ValueError(f"by must be one of {', '.join(GROUPINGS)} (got {by!r})")
    until = utcnow() if now is None else now
    # Naive means UTC, the record's clock; SQLite compares the stored text, so convert.
    until = until.replace(tzinfo=UTC) if until.tzinfo is None else until.astimezone(UTC)
    cutoff = until - since
    with Session(engine) as session:
        billed = _section(session, prices, by, cutoff, dry_run=False)
        dry_run = _section(session, prices, by, cutoff, dry_run=True)
    return CostReport(cutoff, until, window, by, billed, dry_run)


def _section(
    session: Session, prices: PriceTable, by: GroupBy, cutoff: datetime, *, dry_run: bool
) -> CostSection:
    r = Request.__table__  # type: ignore[attr-defined]
    b = Batch.__table__  # type: ignore[attr-defined]
    key = {"model": b.c.model, "batch": r.c.batch_id, "callback_queue": r.c.callback_queue}[by]
    # Grouping by the same column twice would select it twice.
    groups = [key] if by == "model" else [key, b.c.model]
    is_dry: ColumnElement[bool] = or_(
        b.c.provider == _DRY_RUN_PROVIDER,
        # A result may be NULL (rows from before results were recorded): NULL LIKE is NULL,
        # and NOT NULL would drop the row from both sections.
        func.coalesce(r.c.result, "").like(_DRY_RUN_SUFFIX, escape="\\"),
    )
    # Two queries with plain WHERE clauses rather than grouping by the condition: PostgreSQL
    # cannot match a GROUP BY expression whose bound parameters differ from the SELECT's.
    statement = (
        select(
            *groups,
            func.count(),
            func.sum(r.c.prompt_tokens),
            func.sum(r.c.completion_tokens),
        )
        # Retention prunes a batch's requests before the batch: every request has its batch.
        .select_from(r.join(b, b.c.id == r.c.batch_id))
        .where(
            r.c.state.in_(_TERMINAL),
            r.c.finished_at >= cutoff,
            or_(r.c.prompt_tokens > 0, r.c.completion_tokens > 0),
            is_dry if dry_run else not_(is_dry),
        )
        .group_by(*groups)
    )
    lines: dict[str, CostLine] = {}
    for row in session.execute(statement):
        group, model = (row[0], row[0]) if by == "model" else (row[0], row[1])
        count, prompt, completion = (int(v or 0) for v in row[len(groups) :])
        line = lines.setdefault(group, CostLine(group))
        line.add(model, count, prompt, completion, prices.cost(model, prompt, completion))
    return CostSection(_ordered(lines.values()))


def _ordered(lines: Iterable[CostLine]) -> list[CostLine]:
    # The biggest spend first; lines with nothing priced last, the most tokens first.
    return sorted(
        lines,
        key=lambda line: (
            line.cost is None,
            -(line.cost.realtime if line.cost else 0),
            -(line.prompt_tokens + line.completion_tokens),
            line.key,
        ),
    )
