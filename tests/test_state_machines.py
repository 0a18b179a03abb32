"""The state machines in the code are the ones the README documents, and they are enforced."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shared.db import IllegalTransition, finish_requests, transition
from shared.models import (
    BATCH_TRANSITIONS,
    REQUEST_TRANSITIONS,
    Batch,
    BatchState,
    RequestState,
    check_batch_transition,
    check_request_transition,
)
from shared.redis_layout import LIVE_TRANSITIONS
from worker.context import WorkerContext

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_table(heading: str) -> list[list[str]]:
    """The rows of the first table after ``heading`` in the README's state machine section."""
    text = README.read_text("utf-8")
    section = text[text.index("## State machines") :]
    after = section[section.index(heading) :]
    rows = []
    for line in after.splitlines()[1:]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if cells[0] not in ("from", "---"):
                rows.append(cells)
        elif rows:
            break
    return rows


def edges(table: dict[object, object]) -> set[tuple[str, str]]:
    return {(str(a), str(b)) for a, targets in table.items() for b in targets}  # type: ignore[attr-defined]


def test_the_readme_documents_the_batch_machine_the_code_enforces() -> None:
    rows = readme_table("**A batch:**")
    documented = {(row[0], to) for row in rows for to in row[1].split(", ")}
    assert documented == edges(BATCH_TRANSITIONS)  # type: ignore[arg-type]


def test_the_readme_documents_the_record_request_machine() -> None:
    rows = readme_table("**A request in the SQL record**")
    documented = {(row[0], to) for row in rows for to in row[1].split(", ")}
    assert documented == edges(REQUEST_TRANSITIONS)  # type: ignore[arg-type]


def test_the_readme_documents_the_live_request_machine_and_its_scripts() -> None:
    scripts_dir = Path(__file__).resolve().parent.parent / "shared" / "redis_scripts"
    known = {path.stem for path in scripts_dir.glob("*.lua")}
    rows = readme_table("**A request in Redis**")
    # The scripts a row names, leaving out its explanations (in brackets, or after a colon).
    named = [re.sub(r"\([^)]*\)", "", row[2]).split(":")[0] for row in rows]
    documented = {
        (row[0], row[1]): set(re.findall(r"[a-z_]+", text)) & known
        for row, text in zip(rows, named, strict=True)
    }
    assert set(documented) == edges(LIVE_TRANSITIONS)  # type: ignore[arg-type]
    for (source, target), scripts in documented.items():
        # The scripts named in the code exist, and are the ones the README names.
        in_code = set(re.findall(r"[a-z_]+", LIVE_TRANSITIONS[source][target])) & known
        assert in_code and in_code == scripts, (source, target, in_code, scripts)


@pytest.mark.parametrize(
    ("source", "target"),
    [
        (BatchState.FINISHED, BatchState.SUBMITTED),
        (BatchState.SUBMITTED, BatchState.FAILED),
        (BatchState.ABANDONED, BatchState.PACKED),
        (BatchState.COLLECTING, BatchState.SUBMITTED),
        (BatchState.PACKED, BatchState.SUBMITTED),
    ],
)
def test_an_illegal_batch_transition_raises(source: BatchState, target: BatchState) -> None:
    with pytest.raises(IllegalTransition, match=f"{source} cannot become {target}"):
        check_batch_transition(source, target)


@pytest.mark.parametrize(
    ("source", "target"),
    [
        (RequestState.COMPLETED, RequestState.BATCHED),
        (RequestState.CANCELLED, RequestState.COMPLETED),
        (RequestState.FAILED, RequestState.REQUEUED),
        (RequestState.REQUEUED, RequestState.COMPLETED),
        (RequestState.BATCHED, RequestState.BATCHED),
    ],
)
def test_an_illegal_request_transition_raises(source: RequestState, target: RequestState) -> None:
    with pytest.raises(IllegalTransition, match=f"{source} cannot become {target}"):
        check_request_transition(source, target)


def test_every_legal_transition_passes() -> None:
    for source, targets in BATCH_TRANSITIONS.items():
        for target in targets:
            check_batch_transition(source, target)
    for rsource, rtargets in REQUEST_TRANSITIONS.items():
        for rtarget in rtargets:
            check_request_transition(rsource, rtarget)


def test_the_sql_helpers_refuse_an_illegal_move_and_change_nothing(
    worker_context: WorkerContext,
) -> None:
    # Given a finished batch in the record
    ctx = worker_context
    with ctx.session() as session:
        session.add(
            Batch(id="b1", provider="local", model="m", state="finished", request_count=0, bytes=0)
        )
        session.commit()
    # When something asks to move it back to submitted, or to record a request as batched
    with ctx.session() as session, pytest.raises(IllegalTransition):
        transition(session, "b1", BatchState.SUBMITTED, expect=[BatchState.FINISHED])
    row = {
        "id": "r1",
        "state": "batched",
        "error_code": None,
        "error_message": None,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "finished_at": None,
    }
    with ctx.session() as session, pytest.raises(IllegalTransition):
        finish_requests(session, "b1", [row])
    # Then the batch is as it was
    with ctx.session() as session:
        batch = session.get(Batch, "b1")
    assert batch is not None and batch.state == "finished"
