"""``python -m bench``: every case on one Redis, in one process tree; writes the results table.

``make bench`` runs it at full size and writes ``bench/results/latest.md`` and ``latest.json``;
``make bench-smoke`` (``--smoke``) runs every case at a small size, writes ``smoke.md`` and
``smoke.json``, and fails only when a case breaks (small sizes say nothing about targets).
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench import ceiling
from bench._common import bench_redis, environment
from bench.harness import ROOT, Bench
from bench.report import CaseResult, write

# In this order: the cheap in-process cases first, the multi-process pipelines last.
CASES = (
    "enqueue",
    "pack",
    "fanout",
    "consume",
    "redis_steps",
    "memory",
    "floor",
    "end_to_end",
    "scaling",
)


def git_commit() -> str:
    """The commit measured (with ``+dirty`` when the tree has changes)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{commit}+dirty" if dirty else commit or "unknown"


def run_case(name: str, bench: Bench) -> CaseResult:
    """Run one case; a crash becomes a result with its traceback, so the others still run."""
    module = importlib.import_module(f"bench.cases.{name}")
    started = time.perf_counter()
    try:
        result: CaseResult = module.run(bench)
    except Exception:
        result = CaseResult(name, error=traceback.format_exc())
        print(result.error, file=sys.stderr)
    finally:
        bench.flush()
    result.seconds = time.perf_counter() - started
    return result


def main() -> int:
    """Run the cases, print each verdict as it comes, write the results files."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="every case at a small size")
    parser.add_argument("--case", action="append", choices=CASES, help="only these cases")
    parser.add_argument("--out", help="results file stem (default latest, or smoke)")
    args = parser.parse_args()
    names = args.case or list(CASES)
    stem = args.out or ("smoke" if args.smoke else "latest")
    started = time.perf_counter()
    results: list[CaseResult] = []
    with bench_redis() as url, tempfile.TemporaryDirectory(prefix="bb-bench-") as tmp:
        bench = Bench(url, Path(tmp), smoke=args.smoke)
        with bench.client() as client:
            bench.facts = {
                **environment(client),
                "commit": git_commit(),
                "size": "smoke" if args.smoke else "full",
                "payloads": "enqueue 400 B and 2,048 B bodies; pack 500 B, 1 KB, 2 KB; "
                "end to end 400 B; results ~0.5 KB completions",
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            }
        for name in names:
            print(f"== {name}", flush=True)
            result = run_case(name, bench)
            results.append(result)
            for t in result.targets:
                print(f"{'PASS' if t.passed else 'FAIL'}  {t.name}: {t.describe()}", flush=True)
            if result.error:
                print(f"FAIL  {name} crashed", flush=True)
            print(f"   ({result.seconds:.0f} s)", flush=True)
    ceiling.annotate(results)
    bench.facts["elapsed_s"] = round(time.perf_counter() - started)
    title = "batchbridge benchmarks" + (" (smoke sizes)" if args.smoke else "")
    path = write(results, bench.facts, stem, title)
    print(f"results: {path} ({bench.facts['elapsed_s']} s)")
    crashed = any(r.error for r in results)
    missed = any(not t.passed for r in results for t in r.targets)
    return 1 if crashed or (missed and not args.smoke) else 0


if __name__ == "__main__":
    sys.exit(main())
