"""A claim's intact mark: the check before a provider job is created reads one key, not the batch.

``claim.lua`` sets ``{p}:intact:{batch}`` in the same step as the claim, and each script that
takes a request out of a batch drops it. While it exists the batch still holds every request
it claimed, so ``batch_still_owns_requests`` need not ask about each one. Without it, the
request-by-request check runs, as it always did (the reconciler's tests cover what it finds).
"""

from __future__ import annotations

import orjson
import pytest

from shared.models import Batch, BatchState
from shared.redis_layout import buffer_name, pending_ids, text
from shared.schemas import DEFAULT_PROVIDER
from tests.conftest import force_claim
from tests.conftest import submit_requests as submit
from worker.batch_ownership import INTACT_MARK_SECONDS, batch_still_owns_requests
from worker.claims import abandon_claim
from worker.context import WorkerContext
from worker.packing import pack_due_buffers

BUF = buffer_name(DEFAULT_PROVIDER, "m-a")  # requests naming no provider
TTL = 3600


def packed_batch(ctx: WorkerContext, n: int = 5) -> tuple[str, list[str]]:
    """A committed batch of ``n`` requests; its id and theirs."""
    ids = submit(ctx, n)
    (packed,) = pack_due_buffers(ctx, force=True)
    return packed.id, ids


def request_state(ctx: WorkerContext, request_id: str) -> tuple[str, str]:
    state, batch = ctx.redis.hmget(ctx.keys.request(request_id), ["state", "batch"])
    return text(state), text(batch)


def result_json(request_id: str) -> str:
    return orjson.dumps({"request_id": request_id, "status": "completed"}).decode()


def test_a_claim_marks_its_batch_intact_for_a_week(ctx: WorkerContext) -> None:
    # Given requests packed into a batch
    batch_id, _ids = packed_batch(ctx)
    # Then the claim left the batch's mark, which lives for the configured time
    mark = ctx.keys.intact(batch_id)
    assert ctx.redis.exists(mark)
    assert INTACT_MARK_SECONDS - 60 < ctx.redis.ttl(mark) <= INTACT_MARK_SECONDS


def test_an_intact_batch_is_confirmed_without_asking_about_each_request(
    ctx: WorkerContext,
) -> None:
    # Given a packed batch that no request has left
    batch_id, _ids = packed_batch(ctx, 10)
    ctx.redis.config_resetstat()
    # When the check before creating its provider job runs
    owns = batch_still_owns_requests(ctx, batch_id)
    # Then the batch owns its requests, and no script asked Redis about each of them
    assert owns
    stats = ctx.redis.info("commandstats")
    assert "cmdstat_evalsha" not in stats and "cmdstat_hmget" not in stats


def test_a_request_sent_round_again_before_the_create_is_taken_back_by_the_check(
    ctx: WorkerContext,
) -> None:
    # Given a packed batch, one of whose requests was sent back to its buffer
    batch_id, ids = packed_batch(ctx)
    args = [ctx.keys.base, batch_id, "0", TTL, ids[0]]
    assert ctx.scripts.run("requeue", [ctx.keys.buffers], args)[0] == 1
    assert request_state(ctx, ids[0]) == ("pending", "")
    # When the check before creating its provider job runs
    owns = batch_still_owns_requests(ctx, batch_id)
    # Then it looked at each request: the pending one is the batch's again, none is left to
    # be packed (and billed) a second time
    assert owns
    assert {request_state(ctx, i) for i in ids} == {("batched", batch_id)}
    assert pending_ids(ctx.redis, ctx.keys, BUF) == []


@pytest.mark.parametrize("script", ["finish", "requeue", "restore_done"])
def test_each_script_that_takes_a_request_out_of_a_batch_drops_its_mark(
    ctx: WorkerContext, script: str
) -> None:
    # Given a packed batch with its intact mark
    batch_id, ids = packed_batch(ctx)
    assert ctx.redis.exists(ctx.keys.intact(batch_id))
    # When the script takes one of its requests out of it
    args: dict[str, list[object]] = {
        "finish": [ctx.keys.base, TTL, batch_id, ids[0], "completed", result_json(ids[0])],
        "requeue": [ctx.keys.base, batch_id, "1", TTL, ids[0]],
        "restore_done": [
            *(ctx.keys.base, TTL, batch_id),
            *(ids[0], "completed", result_json(ids[0]), "svc", ""),
        ],
    }
    ctx.scripts.run(script, [ctx.keys.buffers], args[script])
    # Then the request has left the batch, and so has the mark
    assert request_state(ctx, ids[0]) != ("batched", batch_id)
    assert not ctx.redis.exists(ctx.keys.intact(batch_id))


def test_an_abandoned_claim_drops_its_mark(ctx: WorkerContext) -> None:
    # Given requests claimed for a batch that is never committed
    ids = submit(ctx, 3)
    assert force_claim(ctx, BUF, "c1", intact_seconds=INTACT_MARK_SECONDS)[0] == 3
    assert ctx.redis.exists(ctx.keys.intact("c1"))
    # When the claim is given up and its requests go back to their buffer
    assert abandon_claim(ctx, "c1") == 3
    # Then they are pending again and the claim's mark is gone
    assert {request_state(ctx, i) for i in ids} == {("pending", "")}
    assert not ctx.redis.exists(ctx.keys.intact("c1"))


def test_a_batch_past_packed_is_not_confirmed_by_its_mark(ctx: WorkerContext) -> None:
    # Given a packed batch with its mark, recorded as given back unsent meanwhile
    batch_id, _ids = packed_batch(ctx)
    with ctx.session() as session:
        batch = session.get(Batch, batch_id)
        assert batch is not None
        batch.state = BatchState.FAILED
        session.add(batch)
        session.commit()
    # When the check runs, then the record's state decides: no create
    assert ctx.redis.exists(ctx.keys.intact(batch_id))
    assert not batch_still_owns_requests(ctx, batch_id)
