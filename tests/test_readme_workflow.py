"""The README's Together workflow, pasted as a user would, runs against `batchbridge local-api`."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import orjson

from tests.conftest import LocalApiFactory

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_snippet() -> str:
    section = README.read_text().split("## Offline", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README lost its Together workflow snippet"
    return match.group(1)


def test_readme_workflow_runs_unchanged_but_for_the_address(
    tmp_path: Path, start_local_api: LocalApiFactory
) -> None:
    # Given the local API with the README's key, and a batch file like Together's docs show
    api = start_local_api(api_key="dev-key")
    lines = [
        {
            "custom_id": f"req-{i}",
            "body": {
                "model": "deepseek-ai/DeepSeek-V3",
                "messages": [{"role": "user", "content": f"Hello number {i}"}],
                "max_tokens": 20,
            },
        }
        for i in range(25)
    ]
    (tmp_path / "batch_input.jsonl").write_bytes(b"\n".join(orjson.dumps(x) for x in lines))
    snippet = readme_snippet()
    assert "http://127.0.0.1:8765" in snippet

    # When the snippet runs with only the address changed (the test picks a free port)
    script = snippet.replace("http://127.0.0.1:8765", api.url)
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )

    # Then it downloads an output line for every request
    assert done.returncode == 0, done.stderr
    output = [
        orjson.loads(x) for x in (tmp_path / "batch_output.jsonl").read_bytes().split(b"\n") if x
    ]
    assert sorted(x["custom_id"] for x in output) == sorted(x["custom_id"] for x in lines)
    assert all(x["response"]["status_code"] == 200 for x in output)
