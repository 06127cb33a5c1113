"""A benchmark measurement in a fresh process: its own peak memory and allocator state.

The script re-runs itself as `python SCRIPT --worker SPEC_JSON`, the worker prints one line
`RESULT <json>`, and `spawn` returns that JSON (or raises with the worker's stderr).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spawn(script: str, spec: dict, *, timeout: float = 1800, name: str | None = None) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(script), "--worker", json.dumps(spec)],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"worker {name or spec} failed:\n{proc.stderr[-3000:]}")
