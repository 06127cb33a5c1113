"""GGUF for every family llama.cpp has: read back by transformers' GGUF loader, per type.

f16: every weight comes back as its f16 rounding (names, permutation, fused layouts and Gemma's
1 + w norms are exact); every type: next-token distributions within the type's tolerance
(engine.export.gguf.DRIFT_TOLERANCE). Gemma (1) has no transformers reader: its tensors are
checked with gguf-py's reader instead."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from engine.export.gguf import DRIFT_TOLERANCE, GGUF_TYPES, export_gguf
from engine.export.merge import GGUF_CHOICES
from tests.conftest import make_tiny_model

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 61, 120, 8, 77, 30, 2]])
# transformers' reader takes Qwen3's head_dim and Gemma 2's query_pre_attn_scalar from the config
# class defaults (128, 256), not the file; llama.cpp scales Gemma 2's queries by head_dim
FAMILIES = {"llama": {}, "mistral": {}, "qwen2": {}, "phi3": {}, "gemma2": {"head_dim": 256},
            "qwen3": {"head_dim": 128}}
# Mistral is llama.cpp's llama architecture (sliding window ignored, as llama.cpp does); the reader
# builds a Mistral only for a file whose general.name is exactly "mistral"
CLASSES = {"llama": "LlamaForCausalLM", "mistral": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
           "phi3": "Phi3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def mean_kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    a, b = F.log_softmax(reference.double(), -1), F.log_softmax(other.double(), -1)
    return float((a.exp() * (a - b)).sum(-1).mean())


@pytest.fixture(scope="module")
def models():
    return {family: make_tiny_model(family, **overrides) for family, overrides in FAMILIES.items()}


def test_cli_choices_are_the_writer_types():
    assert GGUF_CHOICES == GGUF_TYPES


@pytest.mark.parametrize("family", list(FAMILIES))
def test_f16_weights_come_back_exactly(tmp_path, models, family):
    model, tokenizer = models[family]
    export_gguf(model, tokenizer, tmp_path / "m.gguf", "f16")
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    assert type(back).__name__ == CLASSES[family]
    theirs = back.state_dict()
    for name, tensor in model.state_dict().items():
        if "rotary_emb" in name:
            continue
        # 1-D tensors (norms, Qwen2's biases) are stored f32; Gemma 2 norms go through 1 + w and back
        expected = tensor if tensor.dim() == 1 else tensor.half().float()
        assert torch.allclose(theirs[name], expected, atol=1e-6, rtol=0), name


# K-quant mixes on these 64-wide models are their 32-block fallbacks (Q5_0 / Q5_1 / Q8_0): two
# families each; 256-wide K-quant blocks are read back in tests/export/test_gguf_mix.py
CASES = [(family, qtype) for qtype in GGUF_TYPES for family in FAMILIES
         if "_k" not in qtype or family in ("llama", "phi3")]


@pytest.mark.parametrize("family, qtype", CASES)
def test_logits_within_the_type_tolerance(tmp_path, models, family, qtype):
    model, tokenizer = models[family]
    export_gguf(model, tokenizer, tmp_path / "m.gguf", qtype)
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        expected, got = model(input_ids=IDS).logits[0], back(input_ids=IDS).logits[0]
    kl = mean_kl(expected, got)
    assert 0 < kl < DRIFT_TOLERANCE[qtype], (family, qtype, kl)


def test_quantized_types_and_fused_phi3_layout(tmp_path, models):
    import gguf

    model, tokenizer = models["phi3"]
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", "q4_0")
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    qkv = tensors["blk.0.attn_qkv.weight"]
    assert qkv.tensor_type == gguf.GGMLQuantizationType.Q4_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    # fused [q; k; v] rows and ffn_up = [gate; up], as llama.cpp's phi3 graph splits them
    layer = model.model.layers[0]
    original = layer.self_attn.qkv_proj.weight.detach().numpy()
    q4 = gguf.GGMLQuantizationType.Q4_0
    w = gguf.quants.dequantize(qkv.data, qkv.tensor_type).reshape(original.shape)
    # quantized from the f16 values, as llama-quantize quantizes an f16 file
    half = original.astype(np.float16).astype(np.float32)
    assert np.array_equal(w, gguf.quants.dequantize(gguf.quants.quantize(half, q4), q4))
    assert 0 < np.abs(w - original).max() < 0.05
    assert tuple(tensors["blk.0.ffn_up.weight"].shape[::-1]) == tuple(layer.mlp.gate_up_proj.weight.shape)
    assert "blk.0.ffn_gate.weight" not in tensors


def test_gemma_has_no_transformers_reader_but_its_tensors_are_llama_cpp_layout(tmp_path):
    import gguf

    model, tokenizer = make_tiny_model("gemma")
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", "f16")
    reader = gguf.GGUFReader(str(path))
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "gemma"
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # Gemma ties its head
    norm = model.model.layers[0].input_layernorm.weight.detach().numpy()
    assert np.allclose(tensors["blk.0.attn_norm.weight"].data, 1 + norm)  # llama.cpp computes x * w
    q = model.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    assert np.array_equal(tensors["blk.0.attn_q.weight"].data, q.astype(np.float16))  # no permutation
    with pytest.raises(ValueError, match="gemma"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf")


@pytest.mark.parametrize("qtype", ["f16", "q4_0"])
def test_blocks_of_rows_write_the_same_bytes(tmp_path, models, monkeypatch, qtype):
    model, tokenizer = models["gemma2"]  # norms shifted by 1 block by block, too
    whole = export_gguf(model, tokenizer, tmp_path / "whole.gguf", qtype).read_bytes()
    monkeypatch.setattr("engine.export.gguf.BLOCK_BYTES", 3 * 64 * 4)  # 3 rows at a time
    assert export_gguf(model, tokenizer, tmp_path / "blocks.gguf", qtype).read_bytes() == whole
