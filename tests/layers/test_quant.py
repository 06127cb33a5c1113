"""QLoRA on CPU: bitsandbytes Linear4bit (NF4/FP4, double quant on/off, fp32/fp16/bf16 compute)."""

import itertools

import pytest
import torch
from torch import nn

from tests.conftest import make_tiny_model_dir
from engine.export.adapter import load_adapter, save_adapter
from engine.config import PeftConfig
from engine.layers.lora import LoRALinear, lora_modules, lora_state_dict, mark_only_lora_trainable, merge_lora, parameter_report
from engine.layers.inject import inject_lora
from engine.model.build import load_base_model
from engine.layers.quant import QuantSpec, dequantize_weight, is_linear4bit, logical_numel, quantize_linear

COMBOS = list(itertools.product(["nf4", "fp4"], [True, False]))
# fp32 compute dequantizes and multiplies in fp32: matches the float reference to rounding.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("quant_type,double_quant", COMBOS)
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lora_on_4bit_matches_dequantized_float_layer(quant_type, double_quant, compute_dtype):
    torch.manual_seed(0)
    linear = nn.Linear(128, 64)
    q = quantize_linear(linear, QuantSpec(quant_type, double_quant, compute_dtype))
    assert is_linear4bit(q) and logical_numel(q.weight) == 128 * 64 and q.weight.numel() < 128 * 64
    assert (q.weight.quant_state.state2 is not None) == double_quant
    w_hat = dequantize_weight(q).float()
    rel_err = (w_hat - linear.weight).norm() / linear.weight.norm()
    assert 0 < rel_err < 0.15  # 4 bits: close, not equal

    layer = LoRALinear(q, r=4, alpha=8.0)
    mark_only_lora_trainable(layer)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    reference = LoRALinear(nn.Linear(128, 64), r=4, alpha=8.0)
    with torch.no_grad():
        reference.base_layer.weight.copy_(w_hat)
        reference.base_layer.bias.copy_(linear.bias)
        reference.lora_A.weight.copy_(layer.lora_A.weight)
        reference.lora_B.weight.copy_(layer.lora_B.weight)
    x = torch.randn(2, 5, 128, requires_grad=True)
    out = layer(x)
    torch.testing.assert_close(out, reference(x), atol=TOLERANCE[compute_dtype] * 10, rtol=TOLERANCE[compute_dtype])
    out.square().sum().backward()
    assert layer.lora_A.weight.grad.abs().sum() > 0 and layer.lora_B.weight.grad.abs().sum() > 0
    assert x.grad is not None and q.weight.grad is None


def test_eval_forward_keeps_the_storage_format():
    torch.manual_seed(0)
    q = quantize_linear(nn.Linear(128, 64), QuantSpec("nf4", True, torch.float32))
    before = dequantize_weight(q).clone()
    with torch.no_grad():
        q.eval()(torch.randn(3, 128))  # bnb would repack here on AVX512-BF16 CPUs unless disabled
    assert torch.equal(dequantize_weight(q), before)


def test_bad_quant_type():
    with pytest.raises(ValueError, match="quant_type must be nf4 or fp4, got 'int8'"):
        QuantSpec("int8")


@pytest.mark.parametrize("quant_type,double_quant", COMBOS)
def test_qlora_model_forward_backward_and_adapter_round_trip(tmp_path, quant_type, double_quant):
    directory = make_tiny_model_dir(tmp_path, "qwen2")  # biased q/k/v projections
    spec = QuantSpec(quant_type, double_quant, torch.float32)
    model = load_base_model(str(directory), quant=spec)
    decoder_linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    assert decoder_linears and all(is_linear4bit(model.get_submodule(n)) for n in decoder_linears)
    assert not is_linear4bit(model.lm_head)

    torch.manual_seed(0)
    cfg = PeftConfig(method="qlora", r=4, alpha=8.0, targets=["q_proj", "v_proj", "down_proj"])
    inject_lora(model, cfg.targets, cfg.r, cfg.alpha)
    mark_only_lora_trainable(model)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.normal_(0, 0.1)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    model(ids).logits.square().mean().backward()
    assert all(p.grad is not None for p in lora_state_dict(model).values())

    save_adapter(model, str(tmp_path / "adapter"), cfg, str(directory))
    fresh = load_adapter(load_base_model(str(directory), quant=spec), str(tmp_path / "adapter"))
    for key, value in lora_state_dict(model).items():
        assert torch.equal(lora_state_dict(fresh)[key], value), key
    model.eval()
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_qlora_merge_gives_float_linears_and_same_logits(tmp_path):
    directory = make_tiny_model_dir(tmp_path, "llama")
    model = load_base_model(str(directory), quant=QuantSpec("nf4", True, torch.float32))
    torch.manual_seed(0)
    inject_lora(model, "all-linear", r=4, alpha=8.0)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.normal_(0, 0.1)
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        merge_lora(model)
        assert not lora_modules(model)
        assert not any(is_linear4bit(m) for m in model.modules())
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-4, rtol=0)


def test_parameter_report_counts_4bit_weights_logically(tmp_path):
    directory = make_tiny_model_dir(tmp_path, "llama")
    float_model = load_base_model(str(directory))
    q_model = load_base_model(str(directory), quant=QuantSpec())
    for m in (float_model, q_model):
        torch.manual_seed(0)
        inject_lora(m, "all-linear", r=4, alpha=8.0)
        mark_only_lora_trainable(m)
    assert parameter_report(q_model) == parameter_report(float_model)
    assert sum(p.numel() for p in q_model.parameters()) < parameter_report(q_model).total
