"""GRPO through the real loop (engine.train.run_training) on a tiny model: metrics, completions
file, summary, exact resume (rollout re-use and the sampling RNG included), QLoRA."""

import json
import shutil
from dataclasses import replace

import pytest
import torch

from tests.conftest import make_tiny_model_dir
from tests.grpo.conftest import grpo_config, with_train
from engine.config import PeftConfig
from engine.train import run_training
from engine.training import checkpoint


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("grpo"), "llama")


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_run_logs_rewards_lengths_clip_kl_and_writes_completions(tmp_path, model_dir, capsys):
    cfg = grpo_config(tmp_path, model_dir)
    summary = run_training(cfg)
    run = tmp_path / "run"
    train = [r for r in _records(run) if "loss" in r]
    assert [r["step"] for r in train] == [2, 4]
    for r in train:
        for key in ("rewards/digits/mean", "rewards/digits/std", "rewards/length/mean", "reward", "reward_std",
                    "frac_reward_zero_std", "completions/mean_length", "completions/max_length",
                    "completions/clipped_ratio", "kl", "clip_ratio/region_mean"):
            assert key in r, key
        assert 0 < r["completions/mean_length"] <= 8 and 0 <= r["frac_reward_zero_std"] <= 1
    evals = [r for r in _records(run) if "eval_reward" in r]
    assert [r["step"] for r in evals] == [0, 4]
    lines = [json.loads(x) for x in (run / "completions.jsonl").read_text().splitlines()]
    assert {x["kind"] for x in lines} == {"eval (greedy)", "train (sampled)"}
    assert all(x["source"].startswith(str(tmp_path / "prompts.jsonl") + ":") for x in lines)
    assert summary["objective"] == "grpo" and summary["completions"] == 4 * 2 * 4
    assert set(summary["heldout_reward"]) == {"reward", "rewards/digits", "rewards/length"}
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    err = capsys.readouterr()
    assert "grpo: 2 prompts x 4 generations = 8 completions per rollout" in err.err
    assert "held-out mean reward (greedy)" in err.out


def test_resume_mid_rollout_is_exact(tmp_path, model_dir):
    """A run resumed from its step-3 checkpoint (inside a rollout re-used for steps 3-4,
    num_iterations=2) repeats steps 4-6 exactly: the same losses, rewards and final LoRA weights."""
    from safetensors.torch import load_file

    cfg = with_train(grpo_config(tmp_path, model_dir, max_steps=6, num_iterations=2), save_every=3, log_every=1)
    run = tmp_path / "run"
    run_training(cfg)
    first = _records(run)
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    state, _ = checkpoint.load_checkpoint(run / "checkpoints" / "step-3")
    assert state["loader"]["rollout"] is not None and state["loader"]["used"] == 1  # the re-used rollout is kept
    shutil.rmtree(run / "checkpoints" / "step-6")
    shutil.rmtree(run / "adapter")
    run_training(cfg)  # train.resume=auto: from step 3
    again = _records(run)
    pick = lambda rs: [(r["step"], r["loss"], r["grad_norm"], r.get("reward")) for r in rs  # noqa: E731
                       if "loss" in r and r["step"] > 3]
    assert len(pick(first)) == 3 and pick(again) == pick(first)
    resumed = load_file(run / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == weights.keys() and all(torch.equal(resumed[k], weights[k]) for k in weights)


def test_qlora_run(tmp_path, model_dir):
    pytest.importorskip("bitsandbytes")
    cfg = grpo_config(tmp_path, model_dir, peft=PeftConfig(method="qlora", r=4, alpha=8), max_steps=2)
    summary = run_training(cfg)
    assert summary["completions"] == 2 * 8 and summary["heldout_reward"]["reward"]["after"] is not None


@pytest.mark.parametrize("loss_type,scale", [("grpo", "batch"), ("dr_grpo", "none"), ("bnpo", "group")])
def test_other_loss_types_and_masking_run(tmp_path, model_dir, loss_type, scale):
    cfg = grpo_config(tmp_path, model_dir, max_steps=2, loss_type=loss_type, scale_rewards=scale, beta=0.0,
                      num_iterations=1, mask_truncated_completions=True, max_completion_length=3)
    summary = run_training(cfg)
    assert summary["final_train_loss"] is not None
