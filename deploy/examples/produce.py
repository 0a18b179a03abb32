"""An example producer: submit N requests to a running batchbridge and wait for their results.

It needs only ``BATCHBRIDGE_REDIS_URL`` (and, to read results that outlived Redis,
``BATCHBRIDGE_DATABASE_URL``), like any service that imports ``producer``. It submits with one
pipelined ``submit_many``, then reads its callback queue as a consumer would, acking each
result, until every request it sent has its outcome. Exit 0 when all completed, 1 otherwise.

    python deploy/examples/produce.py --requests 300 --timeout 600
    docker compose --profile example run --rm producer --requests 1000

With the default age limit (``BATCHBRIDGE_MAX_WAIT_SECONDS=300``) a small run waits up to five
minutes for its buffers to flush; docker-compose.yml lowers it for the demo.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections import Counter

from producer import CallbackQueue, Producer

DEFAULT_MODELS = "meta-llama/Llama-3.3-70B-Instruct-Turbo,deepseek-ai/DeepSeek-V3"
REVIEWS = (
    "Great kettle, boils fast and looks lovely.",
    "Broke after two days; the lid never closed properly.",
    "Does the job. Nothing special, nothing wrong.",
    "Best purchase this year, my tea has never been better.",
    "Loud, slow and the handle gets hot.",
)


def build_parser() -> argparse.ArgumentParser:
    """The command line (tests/test_deploy_files.py parses the compose file's arguments)."""
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0], allow_abbrev=False
    )
    parser.add_argument("--requests", type=int, default=300, help="how many to submit")
    parser.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated, used in turn")
    parser.add_argument("--callback-queue", default="example", help="where results are sent")
    parser.add_argument("--timeout", type=float, default=900.0, help="give up after seconds")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    if args.requests < 1 or not models:
        parser.error("--requests must be at least 1 and --models must name a model")

    run = uuid.uuid4().hex[:8]
    producer = Producer.from_env()
    queue = CallbackQueue(args.callback_queue, settings=producer.settings)
    started = time.monotonic()
    handles = producer.submit_many(
        [
            {
                "model": models[i % len(models)],
                "messages": [
                    {"role": "user", "content": f"Positive or negative? {REVIEWS[i % 5]}"}
                ],
                "max_tokens": 2,
                "callback_queue": args.callback_queue,
                "metadata": {"run": run, "i": i},
                # The same run and index again (a retry after an error) stores nothing twice.
                "idempotency_key": f"example-{run}-{i}",
            }
            for i in range(args.requests)
        ]
    )
    waiting = {h.id for h in handles}
    print(
        f"run {run}: submitted {len(handles)} requests over {len(models)} model(s) "
        f"in {time.monotonic() - started:.2f} s; waiting on callback queue {args.callback_queue!r}",
        flush=True,
    )

    outcomes: Counter[str] = Counter()
    deadline = started + args.timeout
    last_report = time.monotonic()
    while waiting and time.monotonic() < deadline:
        # Short waits: a blocking read must stay under the Redis client's socket timeout
        # (redis-py 8 defaults to 5 s).
        delivery = queue.get(timeout=min(2.0, max(deadline - time.monotonic(), 0.1)))
        if delivery is not None:
            # Results of earlier runs on the same queue are acked too: nobody else wants them.
            if delivery.result.request_id in waiting:
                waiting.discard(delivery.result.request_id)
                outcomes[delivery.result.status] += 1
            delivery.ack()
        if time.monotonic() - last_report >= 10:
            last_report = time.monotonic()
            print(f"  {sum(outcomes.values())} of {len(handles)} answered", flush=True)

    queue.close()
    producer.close()
    elapsed = time.monotonic() - started
    summary = ", ".join(f"{n} {status}" for status, n in sorted(outcomes.items())) or "none"
    print(f"run {run}: {summary} after {elapsed:.1f} s", flush=True)
    if waiting:
        print(f"run {run}: {len(waiting)} request(s) unanswered after {args.timeout:.0f} s")
        return 1
    return 0 if outcomes.get("completed", 0) == len(handles) else 1


if __name__ == "__main__":
    sys.exit(main())
