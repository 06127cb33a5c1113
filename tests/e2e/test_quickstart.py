"""The README's main job, for real: SmolLM2-135M + LoRA on the order-to-JSON task (slow: minutes)."""

import json

import pytest

from tests.e2e import run_experiment


@pytest.mark.slow
def test_quickstart_beats_the_base_model(tmp_path):
    out = tmp_path / "quickstart"
    proc = run_experiment("quickstart", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    table = summary["scores"]["table"]
    assert summary["eval_loss_after"] < 0.5 * summary["eval_loss_before"]
    # the base model cannot do the task; the fine-tuned one clearly can
    assert table["exact_match"]["after"] >= table["exact_match"]["before"] + 0.3, table
    assert "| held-out loss |" in proc.stdout and "exact_match" in proc.stdout
    assert (out / "adapter" / "adapter_model.safetensors").exists()
