"""DoRA (engine/layers/dora.py): the layer math, PEFT parity (logits and gradients, float and 4-bit
bases), fresh-adapter identity, adapter files both ways, merge, build_model, failure paths."""

import copy
import json

import pytest
import torch
from torch import nn

from tests.conftest import counting_run_config, make_tiny_model, make_tiny_model_dir
from engine.export.adapter import AdapterError, load_adapter, save_adapter
from engine.config import ModelConfig, OptimConfig, PeftConfig
from engine.layers.dora import DoRALinear
from engine.layers.lora import LoRALinear, adapters_disabled, lora_modules, lora_state_dict, mark_only_lora_trainable, merge_lora, unmerge_lora
from engine.layers.inject import inject_lora
from engine.layers.quant import QuantSpec, dequantize_weight, quantize_linear, quantize_module_linears

peft = pytest.importorskip("peft")

FAMILIES = ["llama", "phi3"]  # phi3: fused qkv_proj / gate_up_proj


def _ids(vocab, seed=0):
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def _randomize(model, seed=123):
    """Random A, B (non-zero) and magnitudes near ||W||_c: a DoRA adapter that really does something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(lora_state_dict(model).items()):
            if name.endswith("lora_magnitude_vector"):
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _peft_dora(base, target_modules, r=4, alpha=8.0, dropout=0.0, use_rslora=False):
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                             use_dora=True, use_rslora=use_rslora, task_type="CAUSAL_LM")
    return peft.get_peft_model(base, config)


def _targets(family):
    return ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"] if family == "phi3" else \
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _copy_into_peft(reference, ours):
    result = peft.set_peft_model_state_dict(
        reference, {"base_model.model." + k: v.detach().clone() for k, v in lora_state_dict(ours).items()})
    assert result.unexpected_keys == []
    assert [k for k in result.missing_keys if "lora_" in k] == []


# ----------------------------------------------------------------------------- the layer

def test_layer_math():
    torch.manual_seed(0)
    base = nn.Linear(32, 16)
    layer = DoRALinear(base, r=4, alpha=8.0)
    w = base.weight.detach()
    torch.testing.assert_close(layer.lora_magnitude_vector.detach(), w.norm(dim=1), atol=0, rtol=0)
    assert layer.lora_magnitude_vector.dtype == torch.float32 and layer.lora_magnitude_vector.shape == (16,)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        layer.lora_magnitude_vector.mul_(torch.linspace(0.5, 1.5, 16))
    x = torch.randn(3, 5, 32)
    combined = w + 2.0 * layer.lora_B.weight @ layer.lora_A.weight                    # W + s*B A
    w_prime = layer.lora_magnitude_vector[:, None] * combined / combined.norm(dim=1, keepdim=True)
    expected = x @ w_prime.T + base.bias
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_norm_is_detached_and_magnitude_trains():
    """Gradients equal those of the formula with ||W + s*B A||_c treated as a constant (DoRA sec. 4.3)."""
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(12, 6, bias=False), r=2, alpha=4.0)
    mark_only_lora_trainable(layer)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == \
        {"lora_A.weight", "lora_B.weight", "lora_magnitude_vector"}
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(7, 12)
    layer(x).pow(2).sum().backward()
    a, b, m = (t.detach().clone().requires_grad_(True) for t in
               (layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector))
    w = layer.base_layer.weight.detach()
    combined = w + 2.0 * b @ a
    norm = combined.norm(dim=1).detach()
    (x @ (m[:, None] * combined / norm[:, None]).T).pow(2).sum().backward()
    for ours, ref in ((layer.lora_A.weight, a), (layer.lora_B.weight, b), (layer.lora_magnitude_vector, m)):
        torch.testing.assert_close(ours.grad, ref.grad, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("four_bit", [False, True])
def test_fresh_adapter_leaves_output_unchanged(four_bit):
    """m = ||W||_c and B = 0, so c = m / ||W||_c = 1 and the update is 0. Both norms come from the
    same fp32 computation, so here the outputs are even bit-identical; the contract is 1e-6."""
    base, _ = make_tiny_model("llama", tie_word_embeddings=True)
    if four_bit:
        quantize_module_linears(base, [n for n, m in base.named_modules()
                                       if isinstance(m, nn.Linear) and "layers" in n], QuantSpec())
    model = copy.deepcopy(base)
    inject_lora(model, ["all-linear", "lm_head"], r=8, alpha=16, use_dora=True)
    assert all(isinstance(m, DoRALinear) for m in lora_modules(model).values())
    ids = _ids(base.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=1e-6, rtol=0)


def test_dropout_applies_to_both_scaled_terms():
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(16, 8), r=2, alpha=4.0, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(4, 16)
    layer.train()
    torch.manual_seed(1)
    out = layer(x)
    torch.manual_seed(1)
    dropped = layer.lora_dropout(x)  # the same mask
    w = layer.base_layer.weight
    c = layer.lora_magnitude_vector / layer.weight_norm()
    expected = (x @ w.T + layer.base_layer.bias) + (c - 1) * (dropped @ w.T) \
        + c * 2.0 * (dropped @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    layer.eval()
    assert torch.equal(layer(x), layer(x))


# ----------------------------------------------------------------------------- PEFT parity

@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_grads_match_peft(family):
    base, _ = make_tiny_model(family, seed=1, tie_word_embeddings=(family == "llama"))
    ours = copy.deepcopy(base)
    inject_lora(ours, "all-linear", r=4, alpha=8.0, use_dora=True)
    _randomize(ours)
    reference = _peft_dora(copy.deepcopy(base), _targets(family))
    _copy_into_peft(reference, ours)
    ids = _ids(base.config.vocab_size)
    ours_logits, ref_logits = ours(ids).logits, reference(ids).logits
    with torch.no_grad():
        assert (ours_logits - base(ids).logits).abs().max() > 1e-2  # the adapters really do something
    torch.testing.assert_close(ours_logits, ref_logits, atol=1e-5, rtol=0)

    mark_only_lora_trainable(ours)
    ours_logits.float().logsumexp(-1).sum().backward()
    ref_logits.float().logsumexp(-1).sum().backward()
    ref_grads = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad
                 for n, p in reference.named_parameters() if p.requires_grad}
    ours_grads = {n.replace("lora_magnitude_vector", "lora_magnitude_vector.weight"): p.grad
                  for n, p in ours.named_parameters() if p.requires_grad}
    assert set(ours_grads) == set(ref_grads) and any("magnitude" in n for n in ours_grads)
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_dropout_training_forward_matches_peft():
    base, _ = make_tiny_model("llama", seed=1)
    ours = copy.deepcopy(base)
    inject_lora(ours, "all-linear", r=4, alpha=8.0, dropout=0.3, use_dora=True)
    _randomize(ours)
    reference = _peft_dora(copy.deepcopy(base), _targets("llama"), dropout=0.3)
    _copy_into_peft(reference, ours)
    ours.train()
    reference.train()
    ids = _ids(base.config.vocab_size)
    torch.manual_seed(5)
    ours_logits = ours(ids).logits
    torch.manual_seed(5)
    ref_logits = reference(ids).logits
    torch.testing.assert_close(ours_logits, ref_logits, atol=1e-5, rtol=0)


def test_4bit_base_matches_peft():
    """Same NF4 weights on both sides: PEFT's bnb DoRA layer vs ours (norms of the dequantized W)."""
    base, _ = make_tiny_model("llama", seed=1)
    quantize_module_linears(base, [n for n, m in base.named_modules() if isinstance(m, nn.Linear) and "layers" in n],
                            QuantSpec())
    ours = copy.deepcopy(base)
    inject_lora(ours, "all-linear", r=4, alpha=8.0, use_dora=True)
    _randomize(ours)
    reference = _peft_dora(copy.deepcopy(base), _targets("llama"))
    # PEFT wraps the Linear4bit in its generic lora.Linear here; its DoRA path dequantizes the weight too
    assert type(reference.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"
    _copy_into_peft(reference, ours)
    ids = _ids(base.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- files

@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_round_trip_and_peft_loads_it(tmp_path, family):
    base, _ = make_tiny_model(family, seed=1)
    cfg = PeftConfig(r=4, alpha=16.0, targets="all-linear", use_dora=True)
    ours = copy.deepcopy(base)
    inject_lora(ours, cfg.targets, cfg.r, cfg.alpha, use_dora=True)
    _randomize(ours)
    save_adapter(ours, str(tmp_path / "adapter"), cfg, "tiny")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["r"] == 4

    saved = peft.utils.load_peft_weights(str(tmp_path / "adapter"))
    assert all(k.endswith(("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")) for k in saved)
    assert sum(k.endswith("lora_magnitude_vector") for k in saved) == len(lora_modules(ours))
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter")).eval()
    result = peft.set_peft_model_state_dict(reference, saved)
    assert result.unexpected_keys == []
    assert [k for k in result.missing_keys if "lora_" in k] == []
    loaded = load_adapter(copy.deepcopy(base), str(tmp_path / "adapter"))
    assert all(isinstance(m, DoRALinear) for m in lora_modules(loaded).values())
    ids = _ids(base.config.vocab_size)
    with torch.no_grad():
        expected = ours(ids).logits
        torch.testing.assert_close(reference(ids).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(loaded(ids).logits, expected, atol=0, rtol=0)


def test_peft_dora_adapter_loads_in_ours(tmp_path):
    base, _ = make_tiny_model("phi3", seed=1)
    reference = _peft_dora(copy.deepcopy(base), ["qkv_proj", "down_proj"])
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    reference.save_pretrained(str(tmp_path / "peft"))
    ours = load_adapter(copy.deepcopy(base), str(tmp_path / "peft"), is_trainable=True)
    assert sum(p.requires_grad for n, p in ours.named_parameters() if n.endswith("lora_magnitude_vector")) == 4
    ids = _ids(base.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, reference.eval()(ids).logits, atol=1e-5, rtol=0)


@pytest.fixture
def saved_dora(tmp_path):
    base, _ = make_tiny_model("llama", seed=1)
    cfg = PeftConfig(r=4, alpha=8.0, targets=["q_proj", "v_proj"], use_dora=True)
    model = copy.deepcopy(base)
    inject_lora(model, cfg.targets, cfg.r, cfg.alpha, use_dora=True)
    _randomize(model)
    save_adapter(model, str(tmp_path / "a"), cfg, "tiny")
    return base, model, tmp_path / "a"


def _rewrite(directory, edit_tensors=None, edit_config=None):
    from safetensors.torch import load_file, save_file
    if edit_tensors:
        tensors = load_file(str(directory / "adapter_model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(directory / "adapter_model.safetensors"))
    if edit_config:
        config = json.loads((directory / "adapter_config.json").read_text())
        edit_config(config)
        (directory / "adapter_config.json").write_text(json.dumps(config))


def test_load_refuses_missing_magnitude(saved_dora):
    base, _, directory = saved_dora
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    _rewrite(directory, edit_tensors=lambda t: t.pop(key))
    with pytest.raises(AdapterError, match=f"no tensor for key '{key}'"):
        load_adapter(copy.deepcopy(base), str(directory))


def test_load_refuses_magnitude_without_use_dora(saved_dora):
    base, _, directory = saved_dora
    _rewrite(directory, edit_config=lambda c: c.update(use_dora=False))
    with pytest.raises(AdapterError, match="lora_magnitude_vector' is a DoRA magnitude but adapter_config.json "
                                           "has use_dora=false"):
        load_adapter(copy.deepcopy(base), str(directory))


def test_load_refuses_wrong_magnitude_shape(saved_dora):
    base, _, directory = saved_dora
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_magnitude_vector"
    _rewrite(directory, edit_tensors=lambda t: t.update({key: torch.ones(3)}))
    with pytest.raises(AdapterError, match=r"has shape \(3,\), the model's model.layers.1.self_attn.v_proj."
                                           r"lora_magnitude_vector has \(32,\)"):
        load_adapter(copy.deepcopy(base), str(directory))


def test_load_refuses_variant_mismatch_with_injected_layers(saved_dora):
    base, _, directory = saved_dora
    model = copy.deepcopy(base)
    inject_lora(model, ["q_proj", "v_proj"], r=4, alpha=8.0)  # plain LoRA layers
    with pytest.raises(AdapterError, match="q_proj is not a DoRA layer but the adapter config has use_dora=True"):
        load_adapter(model, str(directory))


def test_save_refuses_config_mismatch(tmp_path, saved_dora):
    _, model, _ = saved_dora
    with pytest.raises(AdapterError, match="q_proj is a DoRA layer but peft config says use_dora=False"):
        save_adapter(model, str(tmp_path / "x"), PeftConfig(r=4, alpha=8.0, targets=["q_proj", "v_proj"]), "tiny")


# ----------------------------------------------------------------------------- merge, disable

def test_merge_unmerge_and_merged_linear():
    base, _ = make_tiny_model("llama", seed=1, tie_word_embeddings=True)
    model = copy.deepcopy(base)
    inject_lora(model, ["all-linear", "lm_head"], r=4, alpha=8.0, use_dora=True)
    _randomize(model)
    ids = _ids(base.config.vocab_size)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        adapted = model(ids).logits
        with adapters_disabled(model):
            torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=0, rtol=0)
        merge_lora(model)
        torch.testing.assert_close(model(ids).logits, adapted, atol=1e-5, rtol=0)
        # the tied embeddings were not touched by merging lm_head
        assert torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)
        unmerge_lora(model)
        torch.testing.assert_close(model(ids).logits, adapted, atol=1e-5, rtol=0)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p, before[n], atol=1e-6, rtol=0)

    # 4-bit base: merged_linear = c * (dequantize(W) + s*B A)
    torch.manual_seed(0)
    layer = DoRALinear(quantize_linear(nn.Linear(64, 32), QuantSpec()), r=4, alpha=8.0)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1)
        layer.lora_magnitude_vector.mul_(1.2)
        x = torch.randn(5, 64)
        torch.testing.assert_close(layer.merged_linear()(x), layer(x), atol=1e-5, rtol=0)


def test_unmerge_without_merge_scale_fails():
    layer = DoRALinear(nn.Linear(8, 4), r=2, alpha=4.0)
    with pytest.raises(RuntimeError, match="merge-time scale is missing"):
        layer._unmerged_weight(layer.base_layer.weight)


# ----------------------------------------------------------------------------- build_model / optimizer

@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_build_model_with_dora(tmp_path, method):
    from engine.model.build import build_model
    from engine.training.optim import build_optimizer
    model_dir = make_tiny_model_dir(tmp_path, "llama")
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(path=str(model_dir)), PeftConfig(method=method, r=4, alpha=8, use_dora=True),
                           "cpu", torch.float32)
    layers = lora_modules(model)
    assert layers and all(isinstance(m, DoRALinear) for m in layers.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model)) and len(trainable) == 3 * len(layers)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    layer = layers["model.layers.0.mlp.down_proj"]
    torch.testing.assert_close(layer.lora_magnitude_vector.detach(),
                               dequantize_weight(layer.base_layer).float().norm(dim=1), atol=0, rtol=0)
    opt = build_optimizer(model, OptimConfig(lr=1e-3), loraplus_ratio=4.0)
    groups = {g["name"]: g for g in opt.param_groups}
    assert len(groups["other"]["params"]) == len(layers) and groups["other"]["lr"] == 1e-3  # the magnitudes


def test_inject_plain_lora_is_not_dora():
    model, _ = make_tiny_model("llama")
    inject_lora(model, ["q_proj"], r=2, alpha=4)
    assert all(type(m) is LoRALinear for m in lora_modules(model).values())
    assert not any("magnitude" in k for k in lora_state_dict(model))


def test_run_training_trains_and_saves_the_magnitudes(tmp_path):
    """Through engine.train.run_training: the magnitudes train, land in the checkpoint and in the
    adapter, and PEFT loads the adapter with the same logits as ours."""
    from engine.training.checkpoint import find_resume_checkpoint, load_checkpoint
    from engine.model.build import load_base_model
    from engine.train import run_training
    model_dir = make_tiny_model_dir(tmp_path, "llama")
    cfg = counting_run_config(tmp_path, model_dir, PeftConfig(r=4, alpha=8.0, use_dora=True))
    run_training(cfg)
    _, trainable = load_checkpoint(find_resume_checkpoint(tmp_path / "run" / "checkpoints"))
    magnitudes = {k: v for k, v in trainable.items() if k.endswith("lora_magnitude_vector")}
    assert len(magnitudes) == 14
    base = load_base_model(str(model_dir))
    initial = base.get_submodule("model.layers.0.self_attn.q_proj").weight.norm(dim=1)
    assert not torch.allclose(magnitudes["model.layers.0.self_attn.q_proj.lora_magnitude_vector"], initial)
    adapter = str(tmp_path / "run" / "adapter")
    ours = load_adapter(copy.deepcopy(base), adapter)
    assert torch.equal(ours.get_submodule("model.layers.0.self_attn.q_proj").lora_magnitude_vector,
                       magnitudes["model.layers.0.self_attn.q_proj.lora_magnitude_vector"])
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), adapter).eval()
    ids = _ids(base.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)
