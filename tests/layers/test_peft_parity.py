"""Parity with PEFT (the oracle, imported in tests only): same base + same LoRA weights -> same logits,
and adapter files cross-load both ways."""

import copy
import json

import pytest
import torch

from tests.conftest import make_tiny_model
from engine.export.adapter import load_adapter, save_adapter
from engine.config import PeftConfig
from engine.layers.lora import lora_state_dict
from engine.layers.inject import inject_lora, target_modules_for_config

peft = pytest.importorskip("peft")

FAMILIES = ["llama", "phi3", "qwen2"]  # plain, fused qkv_proj/gate_up_proj, biased q/k/v


def _base(family):
    # llama with tied embeddings covers the tied-lm_head case
    return make_tiny_model(family, seed=1, tie_word_embeddings=(family == "llama"))


def _randomize_lora(model, seed=123):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(lora_state_dict(model).items()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _ids(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (2, 12), generator=gen)


def _peft_model(base, target_modules, r, alpha, use_rslora=False):
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=target_modules,
                             use_rslora=use_rslora, task_type="CAUSAL_LM")
    return peft.get_peft_model(base, config).eval()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("targets", [["all-linear"], ["all-linear", "lm_head"], ["q_proj", "qkv_proj", "v_proj"],
                                     "re:.*layers\\.1\\..*(down_proj|o_proj)"])
def test_logits_match_peft(family, targets):
    base, _ = _base(family)
    if isinstance(targets, list) and "q_proj" in targets:  # keep only names this family has
        targets = [t for t in targets if t != ("q_proj" if family == "phi3" else "qkv_proj")]
        targets = [t for t in targets if not (family == "phi3" and t == "v_proj")]
    ours = copy.deepcopy(base)
    torch.manual_seed(0)
    inject_lora(ours, targets, r=4, alpha=8.0, use_rslora=(family == "qwen2"))
    _randomize_lora(ours)
    reference = _peft_model(copy.deepcopy(base), target_modules_for_config(ours, targets), 4, 8.0,
                            use_rslora=(family == "qwen2"))
    peft.set_peft_model_state_dict(reference, {"base_model.model." + k: v for k, v in lora_state_dict(ours).items()})
    ids = _ids(base)
    with torch.no_grad():
        ours_logits, ref_logits, base_logits = ours(ids).logits, reference(ids).logits, base(ids).logits
    assert (ours_logits - base_logits).abs().max() > 1e-2  # the adapters really do something
    torch.testing.assert_close(ours_logits, ref_logits, atol=1e-5, rtol=0)
    ref_names = {n.removeprefix("base_model.model.") for n, m in reference.named_modules()
                 if isinstance(m, peft.tuners.lora.LoraLayer)}
    ours_names = {n for n, m in ours.named_modules() if type(m).__name__ == "LoRALinear"}
    assert ref_names == ours_names


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("with_head", [False, True])
def test_our_adapter_loads_in_peft(tmp_path, family, with_head):
    base, _ = _base(family)
    cfg = PeftConfig(r=4, alpha=16.0, targets=["all-linear", "lm_head"] if with_head else "all-linear")
    ours = copy.deepcopy(base)
    torch.manual_seed(0)
    inject_lora(ours, cfg.targets, cfg.r, cfg.alpha)
    _randomize_lora(ours)
    save_adapter(ours, str(tmp_path / "adapter"), cfg, "tiny")

    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter")).eval()
    result = peft.set_peft_model_state_dict(reference, peft.utils.load_peft_weights(str(tmp_path / "adapter")))
    assert result.unexpected_keys == []
    assert [k for k in result.missing_keys if "lora_" in k] == []
    ids = _ids(base)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)
        assert (base(ids).logits - reference(ids).logits).abs().max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("with_head", [False, True])
def test_peft_adapter_loads_in_ours(tmp_path, family, with_head):
    base, _ = _base(family)
    target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_up_proj", "down_proj"]
    target_modules = [t for t in target_modules if any(n.endswith(t) for n, _ in base.named_modules())]
    reference = _peft_model(copy.deepcopy(base), target_modules + (["lm_head"] if with_head else []), 4, 8.0)
    _randomize_lora(reference)  # PEFT's LoRA params are named lora_A.default.weight: handled by the helper
    reference.save_pretrained(str(tmp_path / "peft"))

    ours = load_adapter(copy.deepcopy(base), str(tmp_path / "peft"))
    ids = _ids(base)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)


def test_same_seed_same_init_as_peft():
    base, _ = _base("qwen2")
    ours = copy.deepcopy(base)
    torch.manual_seed(0)
    inject_lora(ours, ["q_proj", "down_proj"], r=4, alpha=8.0)
    torch.manual_seed(0)
    reference = _peft_model(copy.deepcopy(base), ["q_proj", "down_proj"], 4, 8.0)
    ref_state = peft.get_peft_model_state_dict(reference)
    ours_state = lora_state_dict(ours)
    assert set(ref_state) == {"base_model.model." + k for k in ours_state}
    for key, value in ours_state.items():
        assert torch.equal(ref_state["base_model.model." + key], value), key


def test_gpt2_conv1d_layers_match_peft_both_ways(tmp_path):
    """GPT-2's Conv1D layers (W stored [in, out]) become nn.Linear in the engine; PEFT wraps the
    Conv1D itself (fan_in_fan_out). Same logits, and adapters load in either direction."""
    from engine.model.build import conv1d_to_linear

    base, _ = make_tiny_model("gpt2", seed=1)
    ours = copy.deepcopy(base)
    assert conv1d_to_linear(ours)  # c_attn, c_proj, c_fc, ...
    with torch.no_grad():
        torch.testing.assert_close(ours(_ids(base)).logits, base(_ids(base)).logits, atol=1e-5, rtol=0)
    cfg = PeftConfig(r=4, alpha=8.0, targets="all-linear")
    torch.manual_seed(0)
    inject_lora(ours, cfg.targets, cfg.r, cfg.alpha)
    _randomize_lora(ours)
    save_adapter(ours, str(tmp_path / "ours"), cfg, "tiny-gpt2")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    ids = _ids(base)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)
        assert (base(ids).logits - reference(ids).logits).abs().max() > 1e-2

    other = _peft_model(copy.deepcopy(base), ["c_attn", "c_proj", "c_fc"], 4, 8.0)
    _randomize_lora(other, seed=7)
    other.save_pretrained(str(tmp_path / "peft"))
    plain = copy.deepcopy(base)
    conv1d_to_linear(plain)
    back = load_adapter(plain, str(tmp_path / "peft"))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, other(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["gpt_neox", "mixtral", "bloom", "gemma2", "opt", "falcon", "phi"])
def test_our_adapter_loads_in_peft_on_more_families(tmp_path, family):
    """Trained on the engine's load of the model (renamed, fused-on-load, eager ...), the adapter
    gives PEFT on transformers' own load of the same checkpoint the same logits."""
    from transformers import AutoModelForCausalLM

    from engine.model.build import load_base_model
    from tests.conftest import make_tiny_model_dir

    model_dir = make_tiny_model_dir(tmp_path, family)
    ours = load_base_model(str(model_dir))
    cfg = PeftConfig(r=4, alpha=8.0, targets="all-linear")
    torch.manual_seed(0)
    inject_lora(ours, cfg.targets, cfg.r, cfg.alpha)
    _randomize_lora(ours)
    save_adapter(ours, str(tmp_path / "adapter"), cfg, str(model_dir))
    base = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    reference = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids = _ids(ours)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)
        with reference.disable_adapter():
            assert (reference(ids).logits - ours(ids).logits).abs().max() > 1e-3  # the adapter does something
