"""Adapter files: PEFT layout on disk, round trips, and every error naming its file and key."""

import copy
import json
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.conftest import make_tiny_model
from engine.export.adapter import AdapterError, AdapterNotFoundError, load_adapter, read_adapter_config, save_adapter
from engine.config import PeftConfig
from engine.layers.lora import lora_modules, lora_state_dict, merge_lora
from engine.layers.inject import inject_lora


def _trained(cfg, family="llama", seed=3):
    base, _ = make_tiny_model(family)
    model = copy.deepcopy(base)
    torch.manual_seed(0)
    inject_lora(model, cfg.targets, cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(lora_state_dict(model).items()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return base, model


@pytest.fixture
def saved(tmp_path):
    cfg = PeftConfig(r=4, alpha=8.0, dropout=0.05, targets=["q_proj", "v_proj"], use_rslora=True)
    base, model = _trained(cfg)
    save_adapter(model, str(tmp_path / "adapter"), cfg, "tiny/llama")
    return base, model, tmp_path / "adapter"


def test_files_follow_peft_layout(saved):
    _, model, directory = saved
    assert sorted(os.listdir(directory)) == ["adapter_config.json", "adapter_model.safetensors"]
    with safe_open(directory / "adapter_model.safetensors", "pt") as f:
        keys = sorted(f.keys())
        assert f.metadata() == {"format": "pt"}
        tensors = {k: f.get_tensor(k) for k in keys}
    assert keys == sorted("base_model.model." + k for k in lora_state_dict(model))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors.values())
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8.0, "lora_dropout": 0.05,
        "target_modules": ["q_proj", "v_proj"], "bias": "none", "use_rslora": True, "fan_in_fan_out": False,
        "base_model_name_or_path": "tiny/llama", "modules_to_save": None, "init_lora_weights": True,
        "use_dora": False, "inference_mode": True, "revision": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}}
    assert read_adapter_config(str(directory)) == config


def test_regex_targets_are_saved_as_the_regex(tmp_path):
    cfg = PeftConfig(r=2, alpha=4.0, targets="re:.*\\.mlp\\.(up|down)_proj")
    base, model = _trained(cfg)
    save_adapter(model, str(tmp_path / "a"), cfg, "tiny")
    assert read_adapter_config(str(tmp_path / "a"))["target_modules"] == ".*\\.mlp\\.(up|down)_proj"
    loaded = load_adapter(copy.deepcopy(base), str(tmp_path / "a"))
    assert sorted(lora_modules(loaded)) == sorted(lora_modules(model))


def test_round_trip_into_fresh_and_injected_models(saved):
    base, model, directory = saved
    ids = torch.randint(0, base.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    fresh = load_adapter(copy.deepcopy(base), str(directory))
    injected = copy.deepcopy(base)
    inject_lora(injected, ["q_proj", "v_proj"], r=4, alpha=8.0, use_rslora=True)
    load_adapter(injected, str(directory), is_trainable=True)
    for loaded in (fresh, injected):
        for key, value in lora_state_dict(model).items():
            assert torch.equal(lora_state_dict(loaded)[key], value), key
        with torch.no_grad():
            assert torch.equal(loaded.eval()(ids).logits, model.eval()(ids).logits)
    assert not any(p.requires_grad for p in fresh.parameters())
    assert {n for n, p in injected.named_parameters() if p.requires_grad} == set(lora_state_dict(injected))


def test_missing_directory_and_files(saved, tmp_path):
    base, _, directory = saved
    with pytest.raises(AdapterNotFoundError, match="adapter directory '.*nowhere' does not exist"):
        load_adapter(copy.deepcopy(base), str(tmp_path / "nowhere"))
    os.remove(directory / "adapter_model.safetensors")
    with pytest.raises(AdapterNotFoundError, match="adapter/adapter_model.safetensors does not exist"):
        load_adapter(copy.deepcopy(base), str(directory))
    os.remove(directory / "adapter_config.json")
    with pytest.raises(AdapterNotFoundError, match="adapter/adapter_config.json does not exist"):
        read_adapter_config(str(directory))


def _edit_weights(directory, edit):
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    return str(path)


def test_key_matching_no_module(saved):
    base, _, directory = saved
    key = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
    path = _edit_weights(directory, lambda t: t.update({key: torch.zeros(4, 64)}))
    with pytest.raises(AdapterError, match=f"{path}: key '{key}' matches no LoRA layer of the model"):
        load_adapter(copy.deepcopy(base), str(directory))


def test_shape_mismatch(saved):
    base, _, directory = saved
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    path = _edit_weights(directory, lambda t: t.update({key: torch.zeros(32, 5)}))
    with pytest.raises(AdapterError) as err:
        load_adapter(copy.deepcopy(base), str(directory))
    assert str(err.value) == (f"{path}: key '{key}' has shape (32, 5), the model's "
                              "model.layers.1.self_attn.v_proj.lora_B.weight has (32, 4)")


def test_missing_key(saved):
    base, _, directory = saved
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    path = _edit_weights(directory, lambda t: t.pop(key))
    with pytest.raises(AdapterError, match=f"{path}: no tensor for key '{key}'"):
        load_adapter(copy.deepcopy(base), str(directory))


def test_keys_without_prefix_or_with_adapter_name(saved):
    base, model, directory = saved

    def rename(t):
        for k in list(t):
            new = k.removeprefix("base_model.model.")
            t[new.replace("lora_B.weight", "lora_B.default.weight")] = t.pop(k)
    _edit_weights(directory, rename)
    loaded = load_adapter(copy.deepcopy(base), str(directory))
    for key, value in lora_state_dict(model).items():
        assert torch.equal(lora_state_dict(loaded)[key], value)


def test_scaling_mismatch_with_injected_model(saved):
    base, _, directory = saved
    model = copy.deepcopy(base)
    inject_lora(model, ["q_proj", "v_proj"], r=4, alpha=8.0, use_rslora=False)
    with pytest.raises(AdapterError, match="q_proj has LoRA scaling 2, the adapter config gives 4 \\(r=4, lora_alpha=8.0"):
        load_adapter(model, str(directory))


@pytest.mark.parametrize("field,value", [("bias", "all"), ("modules_to_save", ["lm_head"]),
                                         ("rank_pattern", {"q_proj": 8})])
def test_unsupported_config_options(saved, field, value):
    base, _, directory = saved
    config = json.loads((directory / "adapter_config.json").read_text())
    config[field] = value
    (directory / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=re.escape(f"adapter_config.json: {field}={value!r} is not supported")):
        load_adapter(copy.deepcopy(base), str(directory))


def test_bad_config_json(saved):
    _, _, directory = saved
    (directory / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="adapter_config.json: not valid JSON"):
        read_adapter_config(str(directory))
    (directory / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    with pytest.raises(AdapterError, match="adapter_config.json: missing field 'target_modules'"):
        read_adapter_config(str(directory))


def test_save_refuses_bad_states(tmp_path):
    cfg = PeftConfig(r=4, alpha=8.0, targets=["q_proj"])
    base, model = _trained(cfg)
    with pytest.raises(AdapterError, match="has no LoRA layers"):
        save_adapter(base, str(tmp_path / "a"), cfg, "tiny")
    with pytest.raises(AdapterError, match="q_proj has r=4, alpha=8.0.*peft config says r=8"):
        save_adapter(model, str(tmp_path / "a"), PeftConfig(r=8, alpha=8.0, targets=["q_proj"]), "tiny")
    merge_lora(model)
    with pytest.raises(AdapterError, match="is merged; unmerge before saving"):
        save_adapter(model, str(tmp_path / "a"), cfg, "tiny")
