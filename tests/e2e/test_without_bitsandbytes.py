"""bitsandbytes is imported only for 4-bit weights: a LoRA run trains where it cannot be imported
(a broken install: its import raises), and QLoRA there fails with one line that says why."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import make_tiny_model_dir

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path, peft: str) -> subprocess.CompletedProcess:
    broken = tmp_path / "site" / "bitsandbytes"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text('raise ImportError("libbitsandbytes_cpu.so: cannot open shared object")\n')
    model_dir = make_tiny_model_dir(tmp_path, "llama")
    script = textwrap.dedent(f"""
        import sys
        from engine.config import PeftConfig
        from engine.train import run_training
        from tests.conftest import counting_run_config
        cfg = counting_run_config({str(tmp_path)!r}, {str(model_dir)!r}, PeftConfig(method={peft!r}, r=4, alpha=8),
                                  max_steps=2)
        summary = run_training(cfg)
        print("trained", summary["steps"], "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is not None)
    """)
    env_path = f"{tmp_path / 'site'}:{ROOT}"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**__import__("os").environ, "PYTHONPATH": env_path})


def test_a_lora_run_trains_where_bitsandbytes_cannot_be_imported(tmp_path):
    proc = _run(tmp_path, "lora")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained 2 False" in proc.stdout


def test_qlora_without_bitsandbytes_fails_with_one_line(tmp_path):
    proc = _run(tmp_path, "qlora")
    assert proc.returncode != 0
    assert ("BitsAndBytesMissing: QLoRA (4-bit base weights) needs bitsandbytes, which cannot be imported "
            "(libbitsandbytes_cpu.so: cannot open shared object); pip install bitsandbytes") in proc.stderr
