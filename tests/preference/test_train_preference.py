"""End-to-end DPO/ORPO runs on a tiny random Llama: metrics and summary, exact resume after a crash,
QLoRA with activation checkpointing, and the adapter loading in PEFT."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import engine.preference.objective as objective_mod
from engine import train as train_mod
from engine.config import DataConfig, ModelConfig, ObjectiveConfig, OptimConfig, PeftConfig, RunConfig, TrainConfig
from engine.preference.batches import make_pair_loader
from tests.conftest import make_tiny_model_dir

WORDS = ("the quick brown fox jumps over lazy dog what is capital of france paris you are helpful "
         "assistant answer question in one sentence hello how today fine thank numbers").split()


def write_pairs(path: Path, n: int, seed: int) -> Path:
    """n standard-format pairs: chosen repeats the prompt's words reversed, rejected is random words."""
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for _ in range(n):
            k = int(torch.randint(2, 8, (1,), generator=g))
            words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (2 * k,), generator=g)]
            prompt = " ".join(words[:k])
            f.write(json.dumps({"prompt": prompt, "chosen": " ".join(reversed(words[:k])),
                                "rejected": " ".join(words[k:])}) + "\n")
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pref")
    return root, make_tiny_model_dir(root, "llama"), write_pairs(root / "train.jsonl", 32, 1), \
        write_pairs(root / "eval.jsonl", 8, 2)


def make_cfg(workdir, out: str, *, objective: dict | None = None, train: dict | None = None,
             peft: dict | None = None) -> RunConfig:
    root, model_dir, train_path, eval_path = workdir
    cfg = RunConfig(output_dir=str(root / out), model=ModelConfig(path=str(model_dir)),
                    data=DataConfig(train_path=str(train_path), eval_path=str(eval_path), max_seq_len=64,
                                    cache_dir=str(root / "cache")),
                    peft=PeftConfig(r=4, alpha=8, targets="all-linear"),
                    optim=OptimConfig(lr=1e-2, warmup_steps=1, schedule="cosine"),
                    train=TrainConfig(max_steps=6, micro_batch_size=1, grad_accum=2, seed=0, plots=False, log_every=1),
                    objective=ObjectiveConfig(name="dpo", beta=0.1))
    for section, values in (("objective", objective), ("train", train), ("peft", peft)):
        if values:
            cfg = replace(cfg, **{section: replace(getattr(cfg, section), **values)})
    return cfg.validate()


def records(run_dir) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dpo", "orpo"])
def test_run_logs_pair_metrics_and_preference_accuracy(workdir, name):
    cfg = make_cfg(workdir, f"run-{name}", objective={"name": name})
    summary = train_mod.run_training(cfg)
    recs = records(cfg.output_dir)
    train = [r for r in recs if "loss" in r and "eval_loss" not in r]
    evals = [r for r in recs if "eval_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 7))
    for key in ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy", "preference_accuracy"):
        assert all(math.isfinite(r[key]) for r in train), key
        assert key in evals[-1] or f"eval_{key}" in evals[-1]
    if name == "dpo":  # the policy starts as the reference: loss log 2, rewards 0
        assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert evals[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert train[0]["reward_accuracy"] == 0.0
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert evals[-1]["eval_reward_accuracy"] > evals[0]["eval_reward_accuracy"]
    assert summary["pairs"] >= 6 * 2 and summary["objective"] == name  # >= 1 pair per packed row
    assert 0.0 <= summary["preference_accuracy_before"] <= 1.0
    assert summary["preference_accuracy_after"] == evals[-1]["eval_preference_accuracy"]
    saved = json.loads((Path(cfg.output_dir) / "summary.json").read_text())
    assert saved["preference_accuracy_after"] == summary["preference_accuracy_after"]


class CrashAt:
    """Wrap the objective's policy forward: on its Nth call raise (a crash, as a kill would leave it)."""

    def __init__(self, n: int):
        self.n, self.calls, self.inner = n, 0, objective_mod.sequence_logps

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            raise RuntimeError("simulated crash")
        return self.inner(*args, **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("precompute_ref", [False, True])
def test_dpo_resume_after_a_crash_is_bit_exact(workdir, monkeypatch, precompute_ref):
    train = {"max_steps": 6, "save_every": 2, "keep_last": 5}
    objective = {"precompute_ref": precompute_ref}
    full = make_cfg(workdir, f"full-{precompute_ref}", train=train, objective=objective)
    train_mod.run_training(full)

    cut = make_cfg(workdir, f"cut-{precompute_ref}", train=train, objective=objective)
    from engine.preference.data import load_pair_dataset
    from engine.model.build import load_tokenizer
    eval_set = load_pair_dataset(cut.data.eval_path, load_tokenizer(cut.model.path), cut.data)
    eval_batches = len(make_pair_loader(eval_set, max_seq_len=64, micro_batch_size=cut.eval.batch_size, packing=True,
                                        seed=0, pad_token_id=0, shuffle=False))
    crash = CrashAt(eval_batches + 2 * 3 + 1)  # eval at step 0, 3 steps x 2 micro-batches, then step 4
    monkeypatch.setattr(objective_mod, "sequence_logps", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_mod.run_training(cut)
    monkeypatch.setattr(objective_mod, "sequence_logps", crash.inner)
    assert sorted(p.name for p in (Path(cut.output_dir) / "checkpoints").iterdir()) == ["step-2"]
    train_mod.run_training(cut)  # resume=auto from step 2

    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "peak_mem_gib")} for r in rs]
    assert strip(records(full.output_dir)) == strip(records(cut.output_dir))
    a = load_file(str(Path(full.output_dir) / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(Path(cut.output_dir) / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_qlora_dpo_with_activation_checkpointing_trains_and_loads_in_peft(workdir):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    cfg = make_cfg(workdir, "qlora", train={"max_steps": 3, "activation_checkpointing": True},
                   peft={"method": "qlora"})
    summary = train_mod.run_training(cfg)
    assert math.isfinite(summary["final_train_loss"]) and summary["eval_loss_after"] < math.log(2)

    base = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(Path(cfg.output_dir) / "adapter")).eval()
    saved = load_file(str(Path(cfg.output_dir) / "adapter" / "adapter_model.safetensors"))
    loaded = {k.replace(".default", ""): v for k, v in peft.get_peft_model_state_dict(model).items()}
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert any(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)  # trained


@pytest.mark.slow
def test_dpo_fp16_loss_scaling(workdir):
    cfg = make_cfg(workdir, "fp16", train={"max_steps": 2, "precision": "fp16"})
    summary = train_mod.run_training(cfg)
    train = [r for r in records(cfg.output_dir) if "loss" in r and "eval_loss" not in r]
    assert summary["precision"] == "fp16" and summary["skipped_steps"] == 0
    assert train[0]["loss_scale"] == 2.0 ** 16 and all(math.isfinite(r["loss"]) for r in train)
    assert train[-1]["grad_norm"] > 0
