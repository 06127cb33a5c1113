"""Two real LoRA (and some QLoRA) steps on decoder families beyond the five the unit tests use,
each a tiny random model written by save_pretrained: transformers 5's checkpoint renames
(GPT-NeoX), fused MoE experts (Mixtral, Qwen2-MoE), GPT-2's Conv1D layers, classes without SDPA (Gemma 2, BLOOM) and
an architecture whose packed rows would leak between documents (BLOOM's ALiBi: padded rows
instead; OPT leaks under transformers' own mask but not under the engine's packed attention)."""

from __future__ import annotations

import math

import pytest

from engine.training.checkpoint import find_resume_checkpoint, load_checkpoint
from engine.config import PeftConfig
from engine.train import run_training
from tests.conftest import MORE_FAMILIES, counting_run_config, make_tiny_model_dir

LEAKS = {"bloom"}
NO_SDPA = {"gemma2", "bloom"}
FUSED = {"mixtral", "qwen2_moe"}


@pytest.mark.slow
@pytest.mark.parametrize("family,method", [(f, "lora") for f in MORE_FAMILIES]
                         + [("gpt_neox", "qlora"), ("mixtral", "qlora"), ("gemma2", "qlora"), ("gpt2", "qlora")])
def test_two_steps_on_more_families(tmp_path, capfd, family, method):
    model_dir = make_tiny_model_dir(tmp_path, family)
    cfg = counting_run_config(tmp_path, model_dir, PeftConfig(method=method, r=4, alpha=8), max_steps=2)
    summary = run_training(cfg)
    assert math.isfinite(summary["final_train_loss"]) and summary["steps"] == 2
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    err = capfd.readouterr().err
    assert ("lets the documents of a packed row see each other" in err) == (family in LEAKS), err[-2000:]
    assert ("has no SDPA attention" in err) == (family in NO_SDPA), err[-2000:]
    assert ("fused by transformers on load" in err) == (family in FUSED), err[-2000:]
    state, _ = load_checkpoint(find_resume_checkpoint(tmp_path / "run" / "checkpoints"))
    assert state["loader"]["packing"] == (family not in LEAKS)  # the rows it really trained on


def test_auto_micro_batch_is_planned_for_the_padded_rows_a_leaking_model_gets(tmp_path, monkeypatch):
    import dataclasses

    import engine.plan

    seen = []
    monkeypatch.setattr(engine.plan, "auto_micro_batch_size", lambda cfg, model: seen.append(cfg.data.packing) or 2)
    cfg = counting_run_config(tmp_path, make_tiny_model_dir(tmp_path, "bloom"), PeftConfig(r=4, alpha=8), max_steps=1)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size="auto")).validate()
    run_training(cfg)
    assert seen == [False]
