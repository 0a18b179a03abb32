"""What a benchmark case reports: measurements against baselines, targets, and the files."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Measurement:
    """One number of a case, and the baseline it is compared with in the same run."""

    name: str
    value: float
    unit: str
    baseline: str | None = None  # what the baseline is, e.g. "pipelined RPUSH"
    baseline_value: float | None = None
    detail: str = ""
    # "higher" when more is better (a rate), "lower" when less is (seconds, bytes)
    better: Literal["higher", "lower"] = "higher"
    # Where baseline and candidate ran in alternating rounds: the median of the per-round
    # ratios, which is what a target judges. The medians of the two rates, taken apart, may
    # come from different rounds, so their quotient can differ from it.
    round_ratio: float | None = None

    @property
    def ratio(self) -> float | None:
        """How many times better than the baseline (>1 is faster or smaller)."""
        if self.round_ratio is not None:
            return self.round_ratio
        if self.baseline_value is None or not self.value or not self.baseline_value:
            return None
        if self.better == "higher":
            return self.value / self.baseline_value
        return self.baseline_value / self.value


@dataclass
class Target:
    """A figure the issue sets: ``measured`` must be at least or at most ``limit``."""

    name: str
    measured: float
    limit: float
    kind: Literal["min", "max"]
    unit: str
    detail: str = ""

    @property
    def passed(self) -> bool:
        """Whether the measurement meets the target."""
        return self.measured >= self.limit if self.kind == "min" else self.measured <= self.limit

    def describe(self) -> str:
        """``0.62x >= 0.5x``, for the table."""
        op = ">=" if self.kind == "min" else "<="
        return f"{fmt(self.measured)} {self.unit} (target {op} {fmt(self.limit)} {self.unit})"


@dataclass
class CaseResult:
    """Everything one case measured."""

    case: str
    measurements: list[Measurement] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)  # raw rounds, for latest.json
    seconds: float = 0.0
    error: str | None = None  # the case crashed; the runner records it and goes on

    def measure(self, name: str, value: float, unit: str, **kwargs: Any) -> Measurement:
        """Add and return a measurement."""
        m = Measurement(name, value, unit, **kwargs)
        self.measurements.append(m)
        return m

    def target(
        self, name: str, measured: float, limit: float, kind: Literal["min", "max"], unit: str
    ) -> Target:
        """Add and return a target."""
        t = Target(name, measured, limit, kind, unit)
        self.targets.append(t)
        return t


def fmt(value: float) -> str:
    """A number as a person reads it: 3 significant figures, thousands separated."""
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def markdown(results: list[CaseResult], facts: dict[str, Any], title: str) -> str:
    """The results as a Markdown page: machine facts, targets, then every measurement."""
    lines = [f"# {title}", ""]
    lines.append(", ".join(f"{k}: {v}" for k, v in facts.items() if not isinstance(v, dict | list)))
    lines += ["", "## Targets", "", "| case | target | measured | verdict |", "|---|---|---|---|"]
    for r in results:
        for t in r.targets:
            verdict = "PASS" if t.passed else "**FAIL**"
            lines.append(f"| {r.case} | {t.name} | {t.describe()} | {verdict} |")
        if r.error:
            lines.append(f"| {r.case} | (case crashed) | {r.error.splitlines()[-1]} | **FAIL** |")
    lines += [
        "",
        "## Measurements",
        "",
        "| case | measurement | value | baseline (same run) | ratio | notes |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        for m in r.measurements:
            base = f"{m.baseline}: {fmt(m.baseline_value)} {m.unit}" if m.baseline else ""
            base = base if m.baseline_value is not None else (m.baseline or "")
            ratio = f"{m.ratio:.2f}x" if m.ratio is not None else ""
            lines.append(
                f"| {r.case} | {m.name} | {fmt(m.value)} {m.unit} | {base} | {ratio} | {m.detail} |"
            )
    notes = [(r.case, n) for r in results for n in r.notes]
    if notes:
        lines += ["", "## Notes", ""]
        lines += [f"- **{case}**: {note}" for case, note in notes]
    lines += ["", "Case times: " + ", ".join(f"{r.case} {r.seconds:.0f} s" for r in results), ""]
    return "\n".join(lines)


def write(results: list[CaseResult], facts: dict[str, Any], stem: str, title: str) -> Path:
    """Write ``bench/results/{stem}.md`` and ``{stem}.json``; return the Markdown path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    md = RESULTS_DIR / f"{stem}.md"
    md.write_text(markdown(results, facts, title))
    payload = {
        "facts": facts,
        "passed": all(t.passed for r in results for t in r.targets)
        and not any(r.error for r in results),
        "cases": [
            {
                **asdict(r),
                "measurements": [{**asdict(m), "ratio": m.ratio} for m in r.measurements],
                "targets": [{**asdict(t), "passed": t.passed} for t in r.targets],
            }
            for r in results
        ],
    }
    (RESULTS_DIR / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return md
