"""Write the ledgers a run recorded into RESULTS.md (``make chaos`` does this).

``python -m tests.reliability.results LEDGER_DIR`` merges the run's ledgers (one JSON file per
scenario) into ``tests/reliability/results.json`` by scenario name, so a scenario not rerun
keeps its last ledger, and renders RESULTS.md from it.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

import orjson

from tests.reliability.ledger import FAILURES

HERE = Path(__file__).parent
COUNTS = ("accepted", "delivered", *FAILURES, "recovered")


def merge(ledger_dir: Path, store: Path, command: str) -> dict[str, dict[str, object]]:
    """The stored ledgers with this run's (``command``, now) put over them."""
    known: dict[str, dict[str, object]] = orjson.loads(store.read_bytes()) if store.exists() else {}
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    for path in sorted(ledger_dir.glob("*.json")):
        ledger = orjson.loads(path.read_bytes())
        known[ledger["scenario"]] = {**ledger, "command": command, "at": stamp}
    return dict(sorted(known.items()))


def render(ledgers: dict[str, dict[str, object]]) -> str:
    """RESULTS.md: one row per scenario."""
    lines = [
        "# Reliability ledgers",
        "",
        "The latest ledger of each scenario in `tests/reliability/`, written by",
        "`python -m tests.reliability.results` from the run named in its row. A scenario",
        "fails unless lost = duplicated = unexpected = double_billed = stuck = 0; `recovered`",
        "counts work done again whose effect was deduplicated. `-fast` scenarios are the",
        "subset `make test` runs; the others run in `make chaos`. The hostile-input tests",
        "(`test_fuzz.py`) are property tests with no ledger: they pass or fail (1,000",
        "examples each in `make chaos`). `make soak` adds a `soak` row.",
        "",
        "| scenario | " + " | ".join(COUNTS) + " | details | run |",
        "|---" * (len(COUNTS) + 3) + "|",
    ]
    for name, ledger in ledgers.items():
        details = ", ".join(
            f"{k}={v}" for k, v in ledger.items() if k not in (*COUNTS, "scenario", "command", "at")
        )
        counts = " | ".join(str(ledger.get(k, "")) for k in COUNTS)
        lines.append(f"| {name} | {counts} | {details} | `{ledger['command']}`, {ledger['at']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Merge LEDGER_DIR's ledgers and rewrite RESULTS.md."""
    ledger_dir = Path(sys.argv[1])
    command = sys.argv[2] if len(sys.argv) > 2 else "make chaos"
    store = HERE / "results.json"
    ledgers = merge(ledger_dir, store, command)
    store.write_bytes(orjson.dumps(ledgers, option=orjson.OPT_INDENT_2) + b"\n")
    (HERE / "RESULTS.md").write_text(render(ledgers))


if __name__ == "__main__":
    main()
