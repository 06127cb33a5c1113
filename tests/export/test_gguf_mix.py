"""llama.cpp's per-tensor type choice (engine/export/gguf_mix.py), tensor by tensor, and the file it writes."""

from __future__ import annotations

import gguf
import pytest

from engine.export.gguf_mix import choose_types, ModelShape, use_more_bits

T = gguf.GGMLQuantizationType


def llama_tensors(n_layer: int, hidden: int = 256, ff: int = 512, tied: bool = False, fused: bool = False):
    names = [("token_embd.weight", (100, hidden)), ("output_norm.weight", (hidden,))]
    if not tied:
        names.append(("output.weight", (100, hidden)))
    for i in range(n_layer):
        attn = ([(f"blk.{i}.attn_qkv.weight", (3 * hidden, hidden))] if fused else
                [(f"blk.{i}.attn_{p}.weight", (hidden, hidden)) for p in "qkv"])
        names += attn + [(f"blk.{i}.attn_output.weight", (hidden, hidden)), (f"blk.{i}.attn_norm.weight", (hidden,)),
                         (f"blk.{i}.ffn_gate.weight", (ff, hidden)), (f"blk.{i}.ffn_up.weight", (ff, hidden)),
                         (f"blk.{i}.ffn_down.weight", (hidden, ff)), (f"blk.{i}.ffn_norm.weight", (hidden,))]
    return names


def test_use_more_bits_layers():
    # first eighth, last eighth, every third layer between (llama.cpp's use_more_bits)
    assert [i for i in range(8) if use_more_bits(i, 8)] == [0, 3, 6, 7]
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


def test_q4_k_m_and_q5_k_m():
    shape = ModelShape("llama", 8, 4, 2)
    for mix, default in (("q4_k_m", T.Q4_K), ("q5_k_m", T.Q5_K)):
        types = choose_types(mix, llama_tensors(8), shape)
        assert types["output.weight"] == T.Q6_K and types["token_embd.weight"] == default
        assert types["output_norm.weight"] == T.F32
        for i in range(8):
            more = T.Q6_K if i in (0, 3, 6, 7) else default
            assert types[f"blk.{i}.attn_v.weight"] == more and types[f"blk.{i}.ffn_down.weight"] == more
            for other in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
                assert types[f"blk.{i}.{other}.weight"] == default


def test_q4_k_s_q5_k_s_q6_k_q4_0_q8_0():
    shape = ModelShape("qwen2", 16, 4, 2)
    s = choose_types("q4_k_s", llama_tensors(16), shape)
    assert [s[f"blk.{i}.attn_v.weight"] for i in range(6)] == [T.Q5_K] * 4 + [T.Q4_K] * 2
    assert [s[f"blk.{i}.ffn_down.weight"] for i in range(3)] == [T.Q5_K] * 2 + [T.Q4_K]
    for mix, default in (("q5_k_s", T.Q5_K), ("q6_k", T.Q6_K), ("q4_0", T.Q4_0)):
        types = choose_types(mix, llama_tensors(16), shape)
        assert types["output.weight"] == T.Q6_K
        assert {types[n] for n, s in llama_tensors(16) if len(s) == 2 and n != "output.weight"} == {default}
    q8 = choose_types("q8_0", llama_tensors(16), shape)
    assert {q8[n] for n, s in llama_tensors(16) if len(s) == 2} == {T.Q8_0}


def test_tied_head_phi3_fused_qkv_and_70b():
    tied = choose_types("q4_k_m", llama_tensors(8, tied=True), ModelShape("gemma", 8, 4, 4))
    assert tied["token_embd.weight"] == T.Q6_K  # the tied embedding is the head
    phi3 = choose_types("q4_k_m", llama_tensors(8, fused=True), ModelShape("phi3", 8, 4, 4))
    assert [phi3[f"blk.{i}.attn_qkv.weight"] for i in range(8)] == [T.Q6_K if i in (0, 3, 6, 7) else T.Q4_K
                                                                    for i in range(8)]
    big = choose_types("q4_k_m", llama_tensors(80), ModelShape("llama", 80, 64, 8))
    assert big["blk.20.attn_v.weight"] == T.Q5_K and big["blk.21.attn_v.weight"] == T.Q6_K
    mha = choose_types("q4_k_m", llama_tensors(80), ModelShape("llama", 80, 64, 64))  # 65B: no bump
    assert mha["blk.20.attn_v.weight"] == T.Q4_K


def test_fallbacks_when_rows_are_not_256_multiples():
    # SmolLM2: hidden 576 (2.25 super-blocks), ffn 1536 (6 super-blocks), tied head
    types = choose_types("q4_k_m", llama_tensors(30, hidden=576, ff=1536, tied=True), ModelShape("llama", 30, 9, 3))
    assert types["token_embd.weight"] == T.Q8_0  # head: 576 % 256 != 0 -> Q8_0
    assert types["blk.1.attn_q.weight"] == T.Q5_0  # Q4_K -> Q5_0
    assert types["blk.0.attn_v.weight"] == T.Q8_0  # Q6_K -> Q8_0
    assert types["blk.0.ffn_down.weight"] == T.Q6_K  # rows of 1536: K-quant fits
    assert types["blk.4.ffn_down.weight"] == T.Q4_K  # 30 layers: 0-2, 5, 8, ... get more bits
    assert choose_types("q5_k_s", llama_tensors(2, hidden=576, ff=1536), ModelShape("llama", 2, 9, 3))[
        "blk.0.attn_q.weight"] == T.Q5_1
    odd = choose_types("q4_k_m", [("blk.0.attn_q.weight", (40, 40))], ModelShape("llama", 1, 1, 1))
    assert odd["blk.0.attn_q.weight"] == T.F16  # not even 32 divides it


@pytest.mark.parametrize("mix, file_type", [("q4_k_m", 15), ("q6_k", 18), ("q4_0", 2)])
def test_file_says_the_mix_and_types(tmp_path, mix, file_type):
    from engine.export.gguf import export_gguf
    from tests.conftest import make_tiny_model

    model, tokenizer = make_tiny_model("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2)
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", mix)
    reader = gguf.GGUFReader(str(path))
    assert int(reader.fields["general.file_type"].parts[-1][0]) == file_type
    assert int(reader.fields["general.quantization_version"].parts[-1][0]) == gguf.GGML_QUANT_VERSION
    names = [(t.name, tuple(int(d) for d in t.shape[::-1])) for t in reader.tensors]
    expected = choose_types(mix, names, ModelShape("llama", 2, 4, 2))
    assert {t.name: t.tensor_type for t in reader.tensors} == expected


def test_k_quant_file_reads_back_in_transformers(tmp_path):
    """A 256-wide Llama in q4_k_m / q6_k (real K-quant blocks, no fallback) read back by transformers'
    GGUF reader: next-token distributions within the type's tolerance, q6_k closer than q4_k_m."""
    import torch
    from transformers import AutoModelForCausalLM

    from engine.export.gguf import DRIFT_TOLERANCE, export_gguf
    from tests.conftest import make_tiny_model
    from tests.export.test_gguf_families import IDS, mean_kl

    model, tokenizer = make_tiny_model("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2)
    with torch.no_grad():
        expected = model(input_ids=IDS).logits[0]
    kls = {}
    for mix in ("q4_k_m", "q6_k"):
        export_gguf(model, tokenizer, tmp_path / f"{mix}.gguf", mix)
        types = {t.tensor_type for t in gguf.GGUFReader(str(tmp_path / f"{mix}.gguf")).tensors}
        assert T.Q6_K in types and (mix == "q6_k" or T.Q4_K in types)
        back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=f"{mix}.gguf", dtype=torch.float32)
        with torch.no_grad():
            kls[mix] = mean_kl(expected, back.eval()(input_ids=IDS).logits[0])
        assert 0 < kls[mix] < DRIFT_TOLERANCE[mix], (mix, kls[mix])
    assert kls["q6_k"] < kls["q4_k_m"]
