"""End-to-end runs of the real entry points (subprocesses of `python -m engine.train`)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_experiment(name: str, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`python -m engine.train +experiment=NAME output_dir=OUT train.plots=false OVERRIDES...` from
    the repository root, output captured."""
    return subprocess.run([sys.executable, "-m", "engine.train", f"+experiment={name}", f"output_dir={out}",
                           "train.plots=false", *overrides], cwd=REPO, capture_output=True, text=True, timeout=3600)
