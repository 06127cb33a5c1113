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


# ----------------------------------------------------------------------------- packed attention per family

# (family, config overrides): windows shorter than the documents (sliding windows per layer for
# Qwen2 and Gemma 2), Gemma 2's soft-capping (eager attention: transformers' own packed mask).
WINDOWED = [("llama", {}), ("mistral", {"sliding_window": 8}), ("phi3", {"sliding_window": 8}),
            ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1,
                       "layer_types": ["full_attention", "sliding_attention"]}),
            ("gemma2", {"sliding_window": 8, "attn_logit_softcapping": 20.0})]


@pytest.mark.parametrize("family,overrides", WINDOWED, ids=[f for f, _ in WINDOWED])
def test_packed_rows_equal_each_document_alone(family, overrides):
    """Two documents of 24 and 16 tokens (both longer than the 8-token windows) in one packed row
    give the logits each document gives alone, through the engine's packed attention with its
    packing context, in fp32."""
    import torch

    from tests.conftest import assert_close_reduced, make_tiny_model, packed_batch, use_packed_attention

    model, _ = make_tiny_model(family, **overrides)
    if family not in NO_SDPA:
        model.set_attn_implementation("sdpa")
    use_packed_attention(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=g)
    with torch.no_grad():
        packed = packed_batch(ids, [[24, 16]])
        together = model(input_ids=ids, position_ids=packed["position_ids"], packing=packed["packing"],
                         use_cache=False).logits[0]
        alone = [model(input_ids=part, position_ids=packed_batch(part, [[n]])["position_ids"], use_cache=False,
                       packing=packed_batch(part, [[n]])["packing"]).logits[0]
                 for part, n in ((ids[:, :24], 24), (ids[:, 24:], 16))]
    assert_close_reduced(together, torch.cat(alone), terms=40 * model.config.hidden_size)


@pytest.mark.slow
@pytest.mark.parametrize("family,overrides", WINDOWED[1:], ids=[f for f, _ in WINDOWED[1:]])
def test_heldout_loss_packed_equals_padded(tmp_path, family, overrides):
    """engine.train's held-out loss before training (the same weights) with data.packing=true and
    false agrees to 1e-4 on windowed and soft-capped models."""
    import dataclasses
    import json

    model_dir = make_tiny_model_dir(tmp_path, family, **overrides)
    with open(tmp_path / "eval.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"count to {i + 4} please"},
                                             {"role": "assistant", "content": " ".join(map(str, range(i + 5)))}]})
                    + "\n")
    losses = {}
    for packing in (True, False):
        root = tmp_path / f"packing_{packing}"
        root.mkdir()
        cfg = counting_run_config(root, model_dir, PeftConfig(r=4, alpha=8), max_steps=1)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_path=str(tmp_path / "eval.jsonl"),
                                                                packing=packing)).validate()
        losses[packing] = run_training(cfg)["eval_loss_before"]
    assert abs(losses[True] - losses[False]) < 1e-4, losses
