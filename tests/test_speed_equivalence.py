"""Speed switches compute the same thing as the plain path: train.fused_lora (LoRALinear's addmm
forward) on a float and a 4-bit base, in fp32 and under autocast, and a whole tiny-model step."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from engine.config import ModelConfig, PeftConfig
from engine.loss import causal_lm_loss
from engine.lora import LoRALinear, lora_state_dict, set_fused_lora
from engine.model import build_model
from tests.conftest import make_tiny_model_dir


def _layer(base: nn.Module, dropout: float = 0.0) -> LoRALinear:
    torch.manual_seed(0)
    layer = LoRALinear(base, r=4, alpha=8.0, dropout=dropout)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.5)  # a fresh B is 0: make the update visible
    return layer


def _run(layer: LoRALinear, fused: bool, x: torch.Tensor, autocast_dtype=None):
    layer.fused = fused
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(123)  # same dropout mask for both paths
    with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
        y = layer(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach(), x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_lora_equals_plain_fp32(dropout):
    torch.manual_seed(0)
    layer = _layer(nn.Linear(16, 24, bias=True), dropout).train()
    x = torch.randn(2, 5, 16)
    plain, fused = _run(layer, False, x), _run(layer, True, x)
    assert plain[0].shape == fused[0].shape == (2, 5, 24) and fused[0].dtype == torch.float32
    for a, b in zip(plain, fused):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
    assert plain[3].abs().sum() > 0


def test_fused_lora_equals_plain_under_bf16_autocast():
    torch.manual_seed(0)
    layer = _layer(nn.Linear(16, 24))
    x = torch.randn(3, 16)
    plain, fused = _run(layer, False, x, torch.bfloat16), _run(layer, True, x, torch.bfloat16)
    assert fused[0].dtype == plain[0].dtype == torch.bfloat16
    for a, b in zip(plain, fused):
        torch.testing.assert_close(b.float(), a.float(), atol=3e-2, rtol=2e-2)  # bf16 rounding of one add
    assert fused[2].dtype == torch.float32  # LoRA grads stay fp32


def test_fused_lora_half_base_without_autocast_keeps_the_plain_path():
    """fp16 base outside autocast: out is fp16, the branch fp32 -> dtypes differ, so the layer
    must take the plain path (cast the update) and return fp16 either way."""
    layer = _layer(nn.Linear(16, 24).half())
    x = torch.randn(3, 16).half()
    plain, fused = _run(layer, False, x), _run(layer, True, x)
    assert fused[0].dtype == torch.float16
    torch.testing.assert_close(fused[0], plain[0], atol=0, rtol=0)


def test_fused_lora_equals_plain_on_a_4bit_base():
    from engine.quant import QuantSpec, quantize_linear

    torch.manual_seed(0)
    base = quantize_linear(nn.Linear(64, 32), QuantSpec("nf4", True, torch.float32), "cpu")
    layer = _layer(base)
    x = torch.randn(4, 64)
    plain, fused = _run(layer, False, x), _run(layer, True, x)
    for a, b in zip(plain, fused):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_fused_lora_switch_changes_the_path():
    """The switch must really select the addmm path (else the tests above compare a path with itself)."""
    layer = _layer(nn.Linear(8, 8))
    calls = []
    original = torch.addmm

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    torch.addmm = spy
    try:
        layer.fused = False
        layer(torch.randn(2, 8))
        assert not calls
        layer.fused = True
        layer(torch.randn(2, 8))
        assert calls
    finally:
        torch.addmm = original


def test_tiny_model_step_same_loss_and_grads_with_fused_lora(tmp_path):
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(path=str(make_tiny_model_dir(tmp_path, "llama"))),
                           PeftConfig(r=4, alpha=8.0), "cpu", torch.float32)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.normal_(0, 0.1)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, model.config.vocab_size, (2, 12), generator=g),
             "labels": torch.randint(0, model.config.vocab_size, (2, 12), generator=g)}
    results = []
    for fused in (False, True):
        m = copy.deepcopy(model).train()
        set_fused_lora(m, fused)
        loss, _ = causal_lm_loss(m, batch, chunk_size=5)
        loss.backward()
        results.append((loss.detach(), {k: v.grad for k, v in lora_state_dict(m).items()}))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-6)
    for key, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][key], grad, atol=1e-6, rtol=1e-5)
