"""LoRALinear, target matching, injection, merge/unmerge, trainable marking, parameter report."""

import copy
import math

import pytest
import torch
from torch import nn

from tests.conftest import make_tiny_model
from engine.layers.lora import LoRALinear, adapters_disabled, LoRATargetError, lora_modules, lora_state_dict, mark_only_lora_trainable, merge_lora, parameter_report, unmerge_lora
from engine.layers.inject import find_targets, inject_lora, target_modules_for_config


def _ids(vocab, seed=0):
    return torch.randint(0, vocab, (2, 10), generator=torch.Generator().manual_seed(seed))


def _randomize_lora(model, seed=7):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(lora_state_dict(model).items()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("family", ["llama", "phi3", "qwen2"])
def test_fresh_adapter_is_bit_identical(family):
    base, _ = make_tiny_model(family, tie_word_embeddings=True)
    model = copy.deepcopy(base)
    inject_lora(model, ["all-linear", "lm_head"], r=8, alpha=16)
    ids = _ids(base.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base(ids).logits)


def test_layer_math_and_init():
    torch.manual_seed(0)
    base = nn.Linear(32, 16)
    layer = LoRALinear(base, r=4, alpha=8.0, use_rslora=False)
    assert layer.scaling == 2.0
    assert LoRALinear(nn.Linear(32, 16), r=4, alpha=8.0, use_rslora=True).scaling == 4.0  # alpha / sqrt(r)
    assert layer.lora_A.weight.dtype == torch.float32 and torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(32)  # kaiming_uniform(a=sqrt(5)): bound = sqrt(6 / (6 * fan_in))
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.abs().max() > bound / 2
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 5, 32)
    expected = base(x) + 2.0 * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(32, 16), r=4, alpha=8.0, dropout=0.5)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 32)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.allclose(layer(x), layer.eval()(x))


@pytest.mark.parametrize("base_dtype", [torch.float16, torch.bfloat16])
def test_half_base_outside_autocast_runs_branch_in_fp32(base_dtype):
    torch.manual_seed(0)
    base = nn.Linear(32, 16).to(base_dtype)
    layer = LoRALinear(base, r=4, alpha=8.0)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 32).to(base_dtype)
    out = layer(x)
    assert out.dtype == base_dtype and layer.lora_A.weight.dtype == torch.float32
    update = (x.float() @ layer.lora_A.weight.T @ layer.lora_B.weight.T) * 2.0
    torch.testing.assert_close(out, (base(x) + update.to(base_dtype)), atol=0, rtol=0)


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_cpu_autocast_forward_backward(autocast_dtype):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(32, 16), r=4, alpha=8.0)
    mark_only_lora_trainable(layer)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 32)
    with torch.autocast("cpu", dtype=autocast_dtype):
        out = layer(x)
    assert out.dtype == autocast_dtype
    torch.testing.assert_close(out.float(), layer(x), atol=0.1, rtol=0.05)
    out.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32 and layer.lora_A.weight.grad.abs().sum() > 0


def test_only_lora_params_get_grads():
    model, _ = make_tiny_model("qwen2")
    inject_lora(model, "all-linear", r=4, alpha=8)
    mark_only_lora_trainable(model)
    _randomize_lora(model)
    model.train()
    model(_ids(model.config.vocab_size)).logits.square().mean().backward()
    for name, p in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_targets_all_linear_suffix_regex():
    model, _ = make_tiny_model("llama")
    all_linear = find_targets(model, "all-linear")
    assert len(all_linear) == 2 * 7 and "lm_head" not in all_linear
    assert find_targets(model, ["all-linear", "lm_head"]) == all_linear + ["lm_head"]
    assert find_targets(model, ["q_proj", "v_proj"]) == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert find_targets(model, "re:model\\.layers\\.1\\.mlp\\..*") == [
        f"model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    with pytest.raises(LoRATargetError, match="'proj' matches no linear layer"):  # whole components only
        find_targets(model, ["proj"])
    with pytest.raises(LoRATargetError, match="'qkv_proj' matches no linear layer.*q_proj"):
        find_targets(model, ["q_proj", "qkv_proj"])
    assert find_targets(model, ["q_proj", "qkv_proj"], require_each=False)[0].endswith("q_proj")
    with pytest.raises(LoRATargetError, match="regex 'nothing.*' matches no linear layer"):
        find_targets(model, "re:nothing.*")
    with pytest.raises(LoRATargetError, match="does not compile"):
        find_targets(model, "re:(")


def test_target_modules_for_config_is_exact():
    model, _ = make_tiny_model("llama")
    inject_lora(model, ["q_proj", "model.layers.0.self_attn.v_proj"], r=2, alpha=4)
    assert target_modules_for_config(model, None) == ["model.layers.0.self_attn.v_proj", "q_proj"]
    assert target_modules_for_config(model, "re:.*q_proj") == ".*q_proj"


def test_inject_twice_does_not_wrap_wrappers():
    model, _ = make_tiny_model("llama")
    inject_lora(model, ["q_proj"], r=2, alpha=4)
    with pytest.raises(LoRATargetError, match="'q_proj' matches no linear layer"):
        inject_lora(model, ["q_proj"], r=2, alpha=4)  # q_proj is a LoRALinear now, its base_layer is skipped
    assert len(lora_modules(model)) == 2


@pytest.mark.parametrize("family", ["llama", "phi3", "qwen2"])
def test_merge_unmerge(family):
    base, _ = make_tiny_model(family, tie_word_embeddings=True)
    model = copy.deepcopy(base)
    inject_lora(model, ["all-linear", "lm_head"], r=4, alpha=8)
    _randomize_lora(model)
    ids = _ids(base.config.vocab_size)
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    embed = model.get_input_embeddings().weight
    with torch.no_grad():
        unmerged = model(ids).logits
        merge_lora(model)
        merged = model(ids).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    assert not torch.equal(merged, unmerged)  # really went through the merged weights
    assert torch.equal(embed, before["model.embed_tokens.weight"])  # tied embeddings untouched
    with pytest.raises(RuntimeError, match="already merged"):
        model.lm_head.merge()
    merge_lora(model)  # merging a merged model again is a no-op, not a double merge
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-5, rtol=0)
    unmerge_lora(model)
    for k, v in model.state_dict().items():
        if "lora_" not in k:
            torch.testing.assert_close(v, before[k], atol=1e-6, rtol=0)
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tie restored exactly
    with pytest.raises(RuntimeError, match="not merged"):
        model.lm_head.unmerge()


def test_merge_and_unload_gives_plain_model():
    base, _ = make_tiny_model("llama")
    model = copy.deepcopy(base)
    inject_lora(model, "all-linear", r=4, alpha=8)
    _randomize_lora(model)
    ids = _ids(base.config.vocab_size)
    with torch.no_grad():
        expected = model(ids).logits
        merge_lora(model, unload=True)
        assert not lora_modules(model)
        assert set(model.state_dict()) == set(base.state_dict())
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=0)


def test_tied_lm_head_stays_tied_when_wrapped():
    model, _ = make_tiny_model("llama", tie_word_embeddings=True)
    inject_lora(model, ["lm_head"], r=2, alpha=4)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.tie_weights()  # transformers re-ties through the wrapper without error
    assert model.lm_head.base_layer.weight is model.model.embed_tokens.weight


def test_parameter_report():
    model, _ = make_tiny_model("llama", tie_word_embeddings=True)
    total_base = sum(p.numel() for p in model.parameters())
    inject_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    mark_only_lora_trainable(model)
    # q_proj: 64 -> 64, v_proj: 64 -> 32 (2 KV heads of 16): A [4, 64] + B [out, 4]
    lora = 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4))
    report = parameter_report(model)
    trainable, total, percent = report
    assert (trainable, total) == (lora, total_base + lora)
    assert percent == pytest.approx(100 * lora / (total_base + lora))
    assert str(report) == f"trainable params: {lora:,} || all params: {total_base + lora:,} || trainable%: {percent:.2f}"


def test_wraps_only_linears():
    with pytest.raises(LoRATargetError, match="Embedding"):
        LoRALinear(nn.Embedding(4, 4), r=2, alpha=4)


def test_adapters_disabled_gives_the_base_model():
    base, _ = make_tiny_model("phi3")
    model = copy.deepcopy(base)
    inject_lora(model, "all-linear", r=4, alpha=8)
    _randomize_lora(model)
    ids = _ids(base.config.vocab_size)
    with torch.no_grad():
        adapted = model(ids).logits
        with adapters_disabled(model):
            assert torch.equal(model(ids).logits, base(ids).logits)
        assert torch.equal(model(ids).logits, adapted)
        merge_lora(model)
        with pytest.raises(RuntimeError, match="merged into the base weights"):
            with adapters_disabled(model):
                pass
