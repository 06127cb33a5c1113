"""engine.model.isolation: the two-document probe that decides whether packed rows can be honoured."""

from __future__ import annotations

import pytest
import torch

from engine.model.isolation import LEAK_TOLERANCE, packing_for, packing_leak
from tests.conftest import FAMILIES, apply_speed, make_tiny_model, use_packed_attention


@pytest.mark.parametrize("family", FAMILIES)
def test_isolated_families_measure_rounding_noise(family):
    model, _ = make_tiny_model(family)
    assert packing_leak(model) < 1e-4
    assert packing_leak(model.to(torch.bfloat16), precision="bf16") < 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_isolated_under_the_engines_packed_attention_in_bf16(family):
    """The training path: per-document attention (ShortCausalAttention on a CPU under bf16) on
    every row the probe compares."""
    model, _ = make_tiny_model(family)
    model = model.to(torch.bfloat16)
    model.set_attn_implementation("sdpa")
    apply_speed(model, "bf16", compile=False)
    assert packing_leak(model, precision="bf16") < 1e-2


@pytest.mark.slow
def test_default_model_packs_in_bf16_with_the_training_switches():
    """SmolLM2 (trained weights) in bf16 with the engine's attention: isolated. A probe that
    compared the packed row with the document alone pitted ShortCausalAttention against SDPA and
    measured 0.26 here, so the quickstart silently trained on padded rows."""
    from engine.config import ModelConfig, PeftConfig
    from engine.model.build import build_model

    model, _ = build_model(ModelConfig(), PeftConfig(), device=torch.device("cpu"), compute_dtype=torch.bfloat16)
    apply_speed(model, "bf16")
    assert packing_for(model, True, precision="bf16") is True
    assert packing_leak(model, precision="bf16") < 1e-2


def test_a_leak_through_positions_alone_is_found():
    """Attention kept per document, but learned absolute positions counted along the row (as a
    model that ignores position_ids would): a document after a longer one sees other positions.
    (With rotary positions such a shift would be harmless: RoPE sees only relative positions.)"""
    model, _ = make_tiny_model("gpt2")
    model.set_attn_implementation("sdpa")
    use_packed_attention(model)
    assert packing_leak(model) < 1e-4
    wpe = model.transformer.wpe
    original = wpe.forward

    def row_positions(position_ids):
        return original(torch.arange(position_ids.shape[-1]).expand_as(position_ids))
    wpe.forward = row_positions
    assert packing_leak(model) > 0.5


def _default_init(family: str, attn: str):
    """transformers' own init (std 0.02): attention barely moves the hidden states."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import make_tiny_tokenizer, tiny_config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(family, len(make_tiny_tokenizer())),
                                            attn_implementation=attn).eval()


@pytest.mark.parametrize("family,attn", [("bloom", "eager"), ("opt", "sdpa"), ("opt", "eager")])
def test_leaking_architectures_measure_order_one(family, attn):
    """BLOOM's ALiBi mask ignores position_ids; OPT under transformers' own mask lets documents
    attend to each other. Whatever the weights' scale, the ratio is O(1)."""
    assert packing_leak(_default_init(family, attn)) > 0.5
    model, _ = make_tiny_model(family)  # weights ~ N(0, 0.1)
    model.set_attn_implementation(attn)
    assert packing_leak(model) > 0.5


def test_opt_is_isolated_under_the_engines_packed_attention():
    """OPT reads position_ids for its learned positions; the engine's per-document attention then
    keeps its packed rows apart (transformers' mask does not)."""
    model = _default_init("opt", "sdpa")
    use_packed_attention(model)
    assert packing_leak(model) < 1e-4


def test_packing_for_keeps_packing_off_without_probing_and_falls_back_with_a_note(monkeypatch, capsys):
    import engine.model.isolation

    def no_probe(*a, **k):
        raise AssertionError("probed although packing was not requested")
    monkeypatch.setattr(engine.model.isolation, "packing_is_safe", no_probe)
    assert packing_for(object(), False) is False

    monkeypatch.setattr(engine.model.isolation, "packing_is_safe", lambda model, precision: (False, 1.07))
    assert packing_for(torch.nn.Linear(1, 1), True) is False
    err = capsys.readouterr().err
    assert "Linear lets the documents of a packed row see each other (probe ratio 1.07" in err
    assert "using padded rows instead (as data.packing=false)" in err
    assert packing_for(torch.nn.Linear(1, 1), True, announce=False) is False
    assert capsys.readouterr().err == ""

    monkeypatch.setattr(engine.model.isolation, "packing_is_safe", lambda model, precision: (True, 1e-6))
    assert packing_for(torch.nn.Linear(1, 1), True) is True
    assert LEAK_TOLERANCE < 0.5
