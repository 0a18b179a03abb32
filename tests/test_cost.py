"""``batchbridge cost``: spend at batch prices, real-time prices and savings, from the record.

Every figure asserted here is worked out by hand from the rows inserted and the prices in
the table (USD per 1M tokens), e.g. Llama-3.3-70B at $0.88 in and out, 50% off in batch:
1,000,000 prompt + 500,000 completion tokens cost $1.32 in real time and $0.66 in batch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import Engine
from sqlmodel import Session
from typer.testing import CliRunner

from shared.db import make_engine
from shared.models import Batch, Request, utcnow
from shared.pricing import Cost, PriceFileError, load_price_table
from shared.schemas import Result, ResultStatus
from shared.settings import Settings
from worker.cli import app
from worker.cli_cost import format_usd
from worker.cost_report import CostReport, GroupBy, build_report, parse_since

LLAMA = "meta-llama/Llama-3.3-70B-Instruct-Turbo"
DEEPSEEK = "deepseek-ai/DeepSeek-V3"
MYSTERY = "acme/mystery-7b"  # in no price table


BATCHES = [
    ("b-llama-1", LLAMA, "together"),
    ("b-llama-2", LLAMA, "together"),
    ("b-deepseek", DEEPSEEK, "together"),
    ("b-mystery", MYSTERY, "together"),
    ("b-old", LLAMA, "together"),
    ("b-local", LLAMA, "local"),
    ("b-local-ma", "m-a", "local"),
    ("b-echo-together", DEEPSEEK, "together"),
]
NO_RESULT: dict[str, Any] = {"store_result": False}
DRY: dict[str, Any] = {"dry_run": True}
# id, batch, prompt and completion tokens, finished hours ago (None: not yet), state, queue.
REQUESTS: list[tuple[str, str, int, int, float | None, str, str, dict[str, Any]]] = [
    # Llama: 1,000,000 prompt + 500,000 completion over two requests in two batches. r1 has
    # no stored result (rows from before results were recorded) and counts all the same; r2's
    # metadata says dry_run, but metadata is the producer's, not the engine's: still billed.
    ("r1", "b-llama-1", 600_000, 200_000, 1, "completed", "svc-a", NO_RESULT),
    ("r2", "b-llama-2", 400_000, 300_000, 30, "completed", "svc-b", {"metadata": DRY}),
    # Not counted: cancelled with no usage, not finished yet, older than the default window.
    ("r-cancelled", "b-llama-1", 0, 0, 1, "cancelled", "svc-a", {}),
    ("r-batched", "b-llama-1", 5_000, 5_000, None, "batched", "svc-a", {}),
    ("r-old", "b-old", 1_000_000, 0, 8 * 24, "completed", "svc-a", {}),
    # DeepSeek: a completed request and a failed one that still came back with usage.
    ("d1", "b-deepseek", 200_000, 40_000, 2, "completed", "svc-a", {}),
    ("d2", "b-deepseek", 40_000, 0, 2, "failed", "svc-a", {}),
    ("m1", "b-mystery", 1_000, 1_000, 3, "completed", "svc-a", {}),
    # Dry runs: the local provider (echo engine; with no stored result too, local is echo),
    # and an echo result wherever it came from.
    ("e1", "b-local", 2_000_000, 0, 1, "completed", "svc-a", DRY),
    ("e2", "b-local-ma", 10, 5, 1, "completed", "svc-a", NO_RESULT),
    ("e3", "b-echo-together", 100_000, 0, 1, "completed", "svc-b", DRY),
]


@dataclass
class Record:
    """The database under test, and the settings (and data dir) pointing at it."""

    engine: Engine
    database_url: str
    data_dir: Path
    now: datetime


def add_batch(session: Session, batch_id: str, model: str, provider: str = "together") -> None:
    session.add(
        Batch(
            id=batch_id, provider=provider, model=model, state="finished", request_count=1, bytes=1
        )
    )


def add_request(
    session: Session,
    request_id: str,
    batch_id: str,
    *,
    prompt: int,
    completion: int,
    finished: datetime | None,
    state: str = "completed",
    queue: str = "",
    dry_run: bool = False,
    metadata: dict[str, Any] | None = None,
    store_result: bool = True,
) -> None:
    status: ResultStatus = "completed"
    if state in ("failed", "cancelled"):
        status = cast(ResultStatus, state)
    result = Result(
        request_id=request_id,
        status=status,
        usage={"prompt_tokens": prompt, "completion_tokens": completion},
        batch_id=batch_id,
        metadata=metadata,
        dry_run=dry_run,
    )
    session.add(
        Request(
            id=request_id,
            batch_id=batch_id,
            state=state,
            callback_queue=queue,
            prompt_tokens=prompt,
            completion_tokens=completion,
            finished_at=finished,
            result=result.to_json().decode() if store_result else None,
        )
    )


@pytest.fixture
def record(database_url: str, tmp_path: Path) -> Iterator[Record]:
    """A week of traffic on SQLite (and PostgreSQL when configured), finish times relative."""
    settings = Settings.load(data_dir=tmp_path, database_url=database_url)
    engine = make_engine(settings)
    now = utcnow()
    with Session(engine) as s:
        for batch_id, model, provider in BATCHES:
            add_batch(s, batch_id, model, provider)
        for request_id, batch_id, prompt, completion, hours, state, queue, extra in REQUESTS:
            finished = None if hours is None else now - timedelta(hours=hours)
            add_request(s, request_id, batch_id, prompt=prompt, completion=completion,
                        finished=finished, state=state, queue=queue, **extra)  # fmt: skip
        s.commit()
    try:
        yield Record(engine, database_url, tmp_path, now)
    finally:
        engine.dispose()


def report(record: Record, since: str = "7d", by: str = "model", **kw: Any) -> dict[str, Any]:
    prices = load_price_table(kw.pop("prices_file", None))
    built: CostReport = build_report(
        record.engine,
        prices,
        since=parse_since(since),
        by=cast(GroupBy, by),
        window=since,
        now=record.now,
    )
    return built.to_dict()


def groups(section: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {g["key"]: g for g in section["groups"]}


def money(group: dict[str, Any]) -> tuple[Decimal | None, ...]:
    """(batch, real-time, savings) as Decimals, None when unpriced."""
    keys = ("batch_usd", "realtime_usd", "savings_usd")
    return tuple(None if group[k] is None else Decimal(group[k]) for k in keys)


def D(text: str) -> Decimal:
    """A Decimal literal, short enough to read in a row of figures."""
    return Decimal(text)


# --- the price table ---------------------------------------------------------------------


def test_shipped_prices_give_the_documented_figures() -> None:
    # Given the shipped table
    prices = load_price_table()

    # When a million prompt and half a million completion tokens are priced on Llama-3.3-70B
    llama = prices.cost(LLAMA, 1_000_000, 500_000)

    # Then real time is $1.32, batch half that, and the savings the other half
    assert llama == Cost(batch=D("0.66"), realtime=D("1.32"))
    assert llama is not None and llama.savings == D("0.66")
    # And DeepSeek-V3 is $1.25 in and out, 50% off; an unknown model has no price, not $0
    assert prices.cost(DEEPSEEK, 1_000_000, 1_000_000) == Cost(D("1.25"), D("2.50"))
    assert prices.cost(MYSTERY, 1_000_000, 0) is None
    assert prices.cost("m-a", 0, 0) is None


def test_a_user_file_overrides_fields_and_adds_models(tmp_path: Path) -> None:
    # Given a user file that takes Llama's discount away and prices a new model
    user = tmp_path / "prices.toml"
    user.write_text(
        f'[models."{LLAMA}"]\nbatch_discount = 0\n\n'
        f'[models."{MYSTERY}"]\ninput_per_1m = 2\noutput_per_1m = 4.5\n'
    )

    # When the table is loaded with it
    prices = load_price_table(user)

    # Then Llama keeps its shipped prices without the discount, and the new model is priced
    # with no discount (models not listed have none)
    assert prices.cost(LLAMA, 1_000_000, 500_000) == Cost(D("1.32"), D("1.32"))
    assert prices.cost(MYSTERY, 1_000, 1_000) == Cost(D("0.0065"), D("0.0065"))
    # And the shipped models it does not name are untouched
    assert prices.cost(DEEPSEEK, 1_000_000, 0) == Cost(D("0.625"), D("1.25"))


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (f'[models."{LLAMA}"]\ninput_per_1m = -1\n', [LLAMA, "input_per_1m", "negative"]),
        (f'[models."{LLAMA}"]\nbatch_discount = 1.5\n', [LLAMA, "batch_discount", "0 and 1"]),
        (f'[models."{LLAMA}"]\nbatch_discount = -0.1\n', [LLAMA, "batch_discount", "0 and 1"]),
        (f'[models."{LLAMA}"]\noutput_per_1m = "cheap"\n', [LLAMA, "output_per_1m", "number"]),
        (f'[models."{LLAMA}"]\ninput_per_1m = nan\n', [LLAMA, "input_per_1m", "finite"]),
        (f'[models."{LLAMA}"]\ninput_per_1m = true\n', [LLAMA, "input_per_1m", "number"]),
        (f'[models."{LLAMA}"]\nbatch_discont = 0.5\n', [LLAMA, "batch_discont", "unknown field"]),
        (f'[models."{MYSTERY}"]\ninput_per_1m = 1\n', [MYSTERY, "output_per_1m", "missing"]),
        (f'[models]\n"{MYSTERY}" = 3\n', [MYSTERY, "must be a table"]),
        ('[prices."x"]\ninput_per_1m = 1\n', ["'prices'", "top-level"]),
        ("[models\n", ["not valid TOML"]),
    ],
)
def test_a_bad_price_file_is_refused_naming_file_model_and_field(
    tmp_path: Path, content: str, expected: list[str]
) -> None:
    # Given a user price file with one mistake
    user = tmp_path / "my-prices.toml"
    user.write_text(content)

    # When it is loaded, then the error names the file and what is wrong where
    with pytest.raises(PriceFileError) as caught:
        load_price_table(user)
    message = str(caught.value)
    assert message.startswith(f"{user}: ")
    for part in expected:
        assert part in message


def test_a_missing_price_file_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(PriceFileError, match=r"nowhere\.toml: cannot read .*PRICES_FILE"):
        load_price_table(tmp_path / "nowhere.toml")


def test_the_dry_run_marker_ends_the_stored_result() -> None:
    # The report finds dry runs with a SQL suffix match on the stored result: this pins the
    # serialisation it relies on (dry_run last, and only when true).
    dry = Result(request_id="x", status="completed", metadata={"a": 1}, dry_run=True)
    real = Result(request_id="x", status="completed", metadata={"dry_run": True})
    assert dry.to_json().endswith(b',"dry_run":true}')
    assert not real.to_json().endswith(b',"dry_run":true}')


@pytest.mark.parametrize(
    ("text", "seconds"), [("7d", 604_800), ("12h", 43_200), ("30m", 1_800), ("2w", 1_209_600)]
)
def test_since_durations(text: str, seconds: int) -> None:
    assert parse_since(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["7x", "7", "d", "0d", "-1d", "1.5h", "", "7 days"])
def test_bad_since_durations_say_the_rule(text: str) -> None:
    with pytest.raises(ValueError, match="followed by s, m, h, d or w"):
        parse_since(text)


def test_amounts_for_people() -> None:
    assert format_usd(D("1.32")) == "$1.32"
    assert format_usd(D("1234.565")) == "$1,234.57"
    assert format_usd(D("0.000264")) == "$0.000264"
    assert format_usd(D("0")) == "$0.00"
    assert format_usd(D("0.0000001")) == "<$0.000001"


# --- the report --------------------------------------------------------------------------


def test_by_model_prices_usage_and_keeps_unpriced_and_dry_runs_apart(record: Record) -> None:
    # When the last week is reported by model
    data = report(record)
    billed = groups(data["billed"])

    # Then Llama's two requests come to the documented figures, with nothing else mixed in
    # (the cancelled, unfinished and eight-day-old requests are left out)
    assert billed[LLAMA]["requests"] == 2
    assert (billed[LLAMA]["prompt_tokens"], billed[LLAMA]["completion_tokens"]) == (
        1_000_000,
        500_000,
    )
    assert money(billed[LLAMA]) == (D("0.66"), D("1.32"), D("0.66"))
    # And DeepSeek counts the failed request that returned usage: 280,000 tokens at $1.25
    assert billed[DEEPSEEK]["requests"] == 2
    assert money(billed[DEEPSEEK]) == (D("0.175"), D("0.35"), D("0.175"))
    # And the unknown model shows its tokens but no cost, never $0
    assert billed[MYSTERY]["prompt_tokens"] == 1_000
    assert money(billed[MYSTERY]) == (None, None, None)
    assert billed[MYSTERY]["unpriced_requests"] == 1
    # And the biggest spend comes first, the unpriced last
    assert [g["key"] for g in data["billed"]["groups"]] == [LLAMA, DEEPSEEK, MYSTERY]

    # And the totals cover priced requests only, counting the unpriced apart
    total = data["billed"]["total"]
    assert total["requests"] == 5
    assert money(total) == (D("0.835"), D("1.67"), D("0.835"))
    assert (total["unpriced_requests"], total["unpriced_models"]) == (1, [MYSTERY])

    # And dry runs are their own section: what they would have cost, not spend
    dry = groups(data["dry_run"])
    assert set(dry) == {LLAMA, DEEPSEEK, "m-a"}
    assert money(dry[LLAMA]) == (D("0.88"), D("1.76"), D("0.88"))
    assert money(dry[DEEPSEEK]) == (D("0.0625"), D("0.125"), D("0.0625"))
    assert money(dry["m-a"]) == (None, None, None)
    assert data["dry_run"]["total"]["requests"] == 3
    assert money(data["dry_run"]["total"]) == (D("0.9425"), D("1.885"), D("0.9425"))


def test_since_limits_the_window_by_finish_time(record: Record) -> None:
    # Given the same record, when only the last 12 hours are reported
    recent = groups(report(record, since="12h")["billed"])
    # Then only Llama's r1 (1 h ago) counts: 600,000 + 200,000 tokens at $0.88
    assert recent[LLAMA]["requests"] == 1
    assert money(recent[LLAMA]) == (D("0.352"), D("0.704"), D("0.352"))

    # When the last 10 days are reported, the eight-day-old million prompt tokens join in
    wide = groups(report(record, since="10d")["billed"])
    assert wide[LLAMA]["requests"] == 3
    assert money(wide[LLAMA]) == (D("1.10"), D("2.20"), D("1.10"))

    # And a window before everything has no spend, reported as $0 (nothing ran)
    empty = report(record, since="30m")
    assert empty["billed"]["groups"] == []
    assert money(empty["billed"]["total"]) == (D("0"), D("0"), D("0"))


def test_by_batch(record: Record) -> None:
    billed = groups(report(record, by="batch")["billed"])
    assert set(billed) == {"b-llama-1", "b-llama-2", "b-deepseek", "b-mystery"}
    assert billed["b-llama-1"]["models"] == [LLAMA]
    assert money(billed["b-llama-1"]) == (D("0.352"), D("0.704"), D("0.352"))
    assert money(billed["b-llama-2"]) == (D("0.308"), D("0.616"), D("0.308"))
    assert money(billed["b-mystery"]) == (None, None, None)


def test_by_callback_queue_mixes_models_and_says_what_is_unpriced(record: Record) -> None:
    data = report(record, by="callback_queue")
    billed = groups(data["billed"])
    # svc-a: Llama r1 ($0.704) + DeepSeek ($0.35) priced; the mystery request is not
    assert billed["svc-a"]["models"] == sorted([LLAMA, DEEPSEEK, MYSTERY])
    assert billed["svc-a"]["requests"] == 4
    assert money(billed["svc-a"]) == (D("0.527"), D("1.054"), D("0.527"))
    assert billed["svc-a"]["unpriced_requests"] == 1
    assert money(billed["svc-b"]) == (D("0.308"), D("0.616"), D("0.308"))
    # And the dry-run section groups the same way
    assert set(groups(data["dry_run"])) == {"svc-a", "svc-b"}


def test_a_user_price_file_changes_the_report(record: Record, tmp_path: Path) -> None:
    # Given prices for the mystery model and no batch discount on Llama
    user = tmp_path / "prices.toml"
    user.write_text(
        f'[models."{LLAMA}"]\nbatch_discount = 0\n\n'
        f'[models."{MYSTERY}"]\ninput_per_1m = 2\noutput_per_1m = 4\n'
    )
    data = report(record, prices_file=user)
    billed = groups(data["billed"])
    # Then Llama costs its real-time price in batch too, and the mystery model is priced
    assert money(billed[LLAMA]) == (D("1.32"), D("1.32"), D("0"))
    assert money(billed[MYSTERY]) == (D("0.006"), D("0.006"), D("0"))
    assert data["billed"]["total"]["unpriced_requests"] == 0
    assert money(data["billed"]["total"]) == (D("1.501"), D("1.676"), D("0.175"))


# --- the command -------------------------------------------------------------------------


def cli_env(record: Record, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHBRIDGE_")}
    env.update(
        BATCHBRIDGE_DATA_DIR=str(record.data_dir),
        BATCHBRIDGE_DATABASE_URL=record.database_url,
        **extra,
    )
    return env


def test_cost_json_as_a_user_runs_it(record: Record, tmp_path: Path) -> None:
    # Given a price file, when `batchbridge cost --json` runs as its own process
    user = tmp_path / "prices.toml"
    user.write_text(f'[models."{MYSTERY}"]\ninput_per_1m = 2\noutput_per_1m = 4\n')
    env = cli_env(record, BATCHBRIDGE_PRICES_FILE=str(user))
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", "cost", "--since", "7d", "--by", "model", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # Then it prints the report the record gives, with the user's prices
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["by"] == "model" and data["window"] == "7d" and data["currency"] == "USD"
    billed = groups(data["billed"])
    assert money(billed[LLAMA]) == (D("0.66"), D("1.32"), D("0.66"))
    assert money(billed[MYSTERY]) == (D("0.006"), D("0.006"), D("0"))
    assert groups(data["dry_run"])[LLAMA]["requests"] == 1


def test_cost_table_shows_figures_unpriced_and_dry_runs(record: Record) -> None:
    runner = CliRunner()
    done = runner.invoke(
        app, ["cost", "--by", "batch"], env=cli_env(record, COLUMNS="220"), catch_exceptions=False
    )
    assert done.exit_code == 0, done.output
    out = done.output
    assert "b-llama-1" in out and "$0.70" in out and "$0.35" in out
    assert "unpriced" in out and MYSTERY in out
    assert "1 request(s) on unpriced models (acme/mystery-7b)" in out
    # The dry runs are printed after the billed table, in a section of their own
    assert out.index("Billed") < out.index("Dry runs") < out.index("b-local")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--by", "foo"], "--by: must be one of model, batch, callback_queue (got 'foo')"),
        (["--since", "7x"], "--since: must be a whole number above 0"),
    ],
)
def test_bad_options_fail_in_one_line(record: Record, args: list[str], expected: str) -> None:
    done = CliRunner().invoke(app, ["cost", *args], env=cli_env(record, COLUMNS="200"))
    assert done.exit_code == 2
    assert expected in done.output
    assert done.output.strip().count("\n") == 0
    assert "Traceback" not in done.output


def test_a_bad_price_file_fails_the_command_naming_it(record: Record, tmp_path: Path) -> None:
    user = tmp_path / "broken.toml"
    user.write_text(f'[models."{LLAMA}"]\nbatch_discount = 50\n')
    env = cli_env(record, BATCHBRIDGE_PRICES_FILE=str(user), COLUMNS="300")
    done = CliRunner().invoke(app, ["cost"], env=env)
    assert done.exit_code == 2
    assert f"{user}: model '{LLAMA}': batch_discount: must be between 0 and 1" in done.output
