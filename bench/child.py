"""``python -m bench.child module:function``: run one measured step in a process of its own.

The config arrives as JSON on stdin; the function's return value leaves as one JSON line.
"""

from __future__ import annotations

import importlib
import json
import sys


def main() -> int:
    """Import the target, call it with the config, print its result."""
    module_name, _, function_name = sys.argv[1].partition(":")
    function = getattr(importlib.import_module(module_name), function_name)
    config = json.load(sys.stdin)
    result = function(config)
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
