"""The GRPO quickstart, for real: SmolLM2-135M + LoRA learns to answer with the order's city alone,
from the base model, within minutes on a CPU (slow)."""

import json

import pytest

from tests.e2e import run_experiment


@pytest.mark.slow
def test_quickstart_grpo_raises_the_held_out_reward(tmp_path):
    out = tmp_path / "quickstart_grpo"
    proc = run_experiment("quickstart_grpo", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    table = summary["heldout_reward"]
    # the base model never answers with the bare city name (greedy); after 16 steps it mostly does
    assert table["rewards/city_exact"]["before"] < 0.2, table
    assert table["rewards/city_exact"]["after"] >= table["rewards/city_exact"]["before"] + 0.3, table
    assert table["reward"]["after"] > table["reward"]["before"] + 0.3, table
    assert "| held-out mean reward (greedy) |" in proc.stdout and "city_exact" in proc.stdout
    assert summary["train_seconds"] > 0
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert any('"kind": "eval (greedy)"' in line for line in (out / "completions.jsonl").open())
