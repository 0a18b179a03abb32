"""The end-to-end ceiling the stages set: what the pipeline could carry if nothing but its
measured stages ran, each as cheaply as it does alone, on every core all the time.

Each stage case of the same run records the CPU it spent per request, in its own process and
in Redis: submit_many of 0.4 KB requests, packing 0.5 KB requests, the local provider's echo
jobs over the fan-out case's batch, fanning out those 50,000 results and consuming them.
Their sum is a floor under what one request costs end to end (uploads, polls, Celery and the
beat scheduler cost more on top), so
``cores / sum`` bounds the end-to-end rate from above. Set against the same pipelined
``RPUSH`` baseline as the end-to-end target, it says whether that target is within reach of
the stages as they are.
"""

from __future__ import annotations

import os
from typing import Any

from bench._common import median
from bench.report import CaseResult

ENQUEUE_PAIR = "submit_many(1000), 0.4 KB"


def _by_case(results: list[CaseResult]) -> dict[str, CaseResult]:
    return {r.case: r for r in results if not r.error}


def _enqueue_us(data: dict[str, Any]) -> float:
    pair = data[ENQUEUE_PAIR]
    client = median([r["candidate_cpu_us"] for r in pair["rounds"]])
    return float(client + pair["server"]["candidate_us"])


def _pack_us(data: dict[str, Any]) -> float:
    # The largest run of 0.5 KB requests: the size nearest the end-to-end 0.4 KB.
    n = max(int(key.split("x")[0]) for key in data if key.endswith("x500"))
    run = data[f"{n}x500"]
    return float((run["cpu_seconds"] + run["redis_cpu_seconds"]) / n * 1e6)


def _provider_us(data: dict[str, Any]) -> float:
    jobs = data["jobs"]
    return float(jobs["run_cpu_seconds"] / jobs["lines"] * 1e6)


def _fanout_us(data: dict[str, Any]) -> float:
    collected = data["collect"]
    return float(
        (collected["cpu_seconds"] + collected["redis_cpu_seconds"]) / data["requests"] * 1e6
    )


def stage_costs(results: list[CaseResult]) -> dict[str, float] | None:
    """CPU microseconds per request of each stage, as measured alone; None if one is missing."""
    cases = _by_case(results)
    try:
        return {
            "submit_many": _enqueue_us(cases["enqueue"].data),
            "pack": _pack_us(cases["pack"].data),
            "provider run": _provider_us(cases["fanout"].data),
            "fan-out": _fanout_us(cases["fanout"].data),
            "consume": median(cases["consume"].data["cpu_us"]),
        }
    except (KeyError, ValueError):
        return None


def annotate(results: list[CaseResult]) -> None:
    """Add the stages' ceiling to the end-to-end case, when every stage case ran."""
    cases = _by_case(results)
    end_to_end = cases.get("end_to_end")
    costs = stage_costs(results)
    if end_to_end is None or costs is None:
        return
    rpush = float(end_to_end.data["rpush_rate"])
    cores = os.cpu_count() or 1
    total = sum(costs.values())
    ceiling = cores / total * 1e6
    end_to_end.measure(
        "ceiling set by the stages alone",
        ceiling,
        "req/s",
        baseline="pipelined RPUSH x1000",
        baseline_value=rpush,
        detail=f"{cores} cores / {total:.0f} us of CPU per request, the sum of the stages as "
        "measured alone in this run (their process and Redis): "
        + ", ".join(f"{name} {us:.1f}" for name, us in costs.items()),
    )
    end_to_end.data["stage_costs_us"] = costs
    end_to_end.data["stage_ceiling"] = ceiling
    verdict = "below" if ceiling < 0.2 * rpush else "above"
    floor = cases.get("floor")
    if floor is not None:
        _compare_with_floor(end_to_end, floor.data, ceiling)
    end_to_end.notes.append(
        f"The stages alone, each as cheap as it is measured in isolation and with every "
        f"core busy on nothing else, could carry at most {ceiling:,.0f} req/s = "
        f"{ceiling / rpush:.2f}x pipelined RPUSH, {verdict} the 0.2x target; the run reached "
        f"{float(end_to_end.data['ours']['rate']) / ceiling:.0%} of that ceiling."
    )


def _compare_with_floor(end_to_end: CaseResult, floor: dict[str, Any], ceiling: float) -> None:
    """Say how far the stages and the run are from the bare journey of the floor case."""
    bare, recorded = float(floor["ceiling"]), float(floor["ceiling_with_record"])
    rate, rpush = float(end_to_end.data["ours"]["rate"]), float(end_to_end.data["rpush_rate"])
    end_to_end.notes.append(
        f"The same journey done bare (the floor case: no request state, no exactly-once, no "
        f"cancel or webhook, no SQL) could carry at most {bare:,.0f} req/s, "
        f"{recorded:,.0f} with the least SQL record; the stages' ceiling is "
        f"{ceiling / recorded:.0%} of the latter and the run {rate / recorded:.0%}. Meeting "
        f"0.2x would take the pipeline to within "
        f"{recorded / (0.2 * rpush):.2f}x of the bare "
        f"journey's CPU per request."
    )
    stateful = floor.get("ceiling_with_state")
    # The least a design that delivers each result once must add: its journey is the nearest
    # yardstick the floor offers (older results files have no such figure).
    nearest, nearest_name = recorded, "the recorded bare journey"
    if stateful is not None:
        nearest, nearest_name = float(stateful), "the bare journey with record and state"
        end_to_end.notes.append(
            f"With the least request state as well (a write per transition and a test-and-set "
            f"before delivery, so each result goes out once) the bare journey carries at most "
            f"{nearest:,.0f} req/s = {nearest / rpush:.2f}x pipelined RPUSH: meeting 0.2x would "
            f"take the pipeline to within {nearest / (0.2 * rpush):.2f}x of its CPU per request."
        )
    batched = end_to_end.data.get("celery_batches")
    if batched:
        # The same yardstick for the other end-to-end target: how near the bare journey
        # itself comes to 20x celery-batches, measured in this run.
        celery = float(batched["rate"])
        reaches = (
            f"reaches {bare / celery:.1f}x, {recorded / celery:.1f}x with the least SQL record"
        )
        if stateful is not None:
            reaches += f" and {nearest / celery:.1f}x with the least request state too"
        end_to_end.notes.append(
            f"Against celery-batches ({celery:,.0f} req/s in this run) the bare journey "
            f"{reaches}; meeting 20x would take the pipeline to within "
            f"{nearest / (20 * celery):.2f}x of the CPU per request of {nearest_name}."
        )
