"""What every case runs on: one Redis for the whole run, scratch directories, child processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis import Redis

from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Bench:
    """The run a case belongs to: the shared Redis, a scratch directory, full or smoke size."""

    redis_url: str
    tmp: Path
    smoke: bool = False
    facts: dict[str, Any] = field(default_factory=dict)

    def size(self, full: int, smoke: int) -> int:
        """``full`` in a real run, ``smoke`` in ``make bench-smoke``."""
        return smoke if self.smoke else full

    def client(self) -> Redis:
        """A new redis-py client of the bench Redis."""
        return Redis.from_url(self.redis_url)

    def flush(self) -> None:
        """Empty the bench Redis (a case starts and ends with nothing left behind)."""
        with self.client() as client:
            client.flushdb()

    def data_dir(self, name: str) -> Path:
        """A fresh scratch directory for one case or run."""
        path = self.tmp / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def settings_overrides(self, data_dir: Path, **overrides: Any) -> dict[str, Any]:
        """Settings of the local provider on the bench Redis, recorded in ``data_dir``."""
        return {
            "redis_url": self.redis_url,
            "data_dir": str(data_dir),
            # Explicit, so a BATCHBRIDGE_DATABASE_URL in the environment cannot redirect it.
            "database_url": f"sqlite:///{data_dir / 'batchbridge.sqlite3'}",
            "provider": "local",
            "max_batch_requests": 50_000,
            "max_batch_bytes": 100_000_000,
            **overrides,
        }

    def settings(self, data_dir: Path, **overrides: Any) -> Settings:
        """:meth:`settings_overrides` loaded."""
        return Settings.load(**self.settings_overrides(data_dir, **overrides))


def run_child(target: str, config: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    """Call ``module:function(config)`` in a fresh interpreter; return what it returned.

    A fresh process makes a peak RSS (VmHWM) the measured step's own, not the parent's.
    """
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.child", target],
        input=json.dumps(config),
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env=env,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{target} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return result


def redis_cpu_seconds(client: Redis) -> float:
    """CPU seconds the Redis server has used so far (user + system, main thread and all)."""
    info: dict[str, Any] = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def proc_status_mb(field_name: str, pid: int | str = "self") -> float | None:
    """A memory figure (``VmRSS``, ``VmHWM``) of a process from /proc, in MB; None off Linux."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field_name}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak resident set since exec, in MB (VmHWM; ru_maxrss off Linux)."""
    peak = proc_status_mb("VmHWM")
    if peak is not None:
        return peak
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / (1024 * 1024) if sys.platform == "darwin" else maxrss / 1024


def current_rss_mb() -> float:
    """This process's resident set now, in MB."""
    rss = proc_status_mb("VmRSS")
    return peak_rss_mb() if rss is None else rss


def time_phases(
    spent: dict[str, float], owner: Any, names: tuple[str, ...], label: str = ""
) -> None:
    """Accumulate the seconds spent in ``owner``'s callables ``names`` into ``spent``."""
    # The worker calls them by their module-level (or attribute) names, so wrapping them there
    # splits its time without touching its code; a renamed function is simply not timed.
    for name in names:
        original = getattr(owner, name, None)
        if original is None:
            continue

        def timed(*args: Any, _fn: Any = original, _key: str = label or name, **kw: Any) -> Any:
            started = time.perf_counter()
            try:
                return _fn(*args, **kw)
            finally:
                spent[_key] = spent.get(_key, 0.0) + time.perf_counter() - started

        setattr(owner, name, timed)
