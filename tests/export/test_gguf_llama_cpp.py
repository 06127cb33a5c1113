"""Optional (llama-cpp-python installed): the engine's K-quant GGUFs are the files llama.cpp's own
quantizer makes. For tiny Llama, Mistral, Qwen2, Phi-3 and Gemma models (rows of 256 and 512, and a
576-wide Llama for the fallbacks), `llama_model_quantize` is run on the engine's f16 export and its
output is compared with the engine's q4_k_m / q5_k_m / q6_k / q4_k_s export tensor by tensor: same
types, same bytes. llama.cpp then loads the engine's file and computes the same logits as from its own."""

from __future__ import annotations

import numpy as np
import pytest

from engine.export.gguf import export_gguf
from engine.export.gguf_mix import MIXES
from tests.conftest import make_tiny_model

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

SHAPES = {"llama": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4),
          "mistral": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2),
          "qwen2": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=3),
          "phi3": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2),
          "gemma": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, head_dim=64),
          "llama576": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9,
                           num_key_value_heads=3)}
IDS = [5, 17, 42, 99, 3, 250, 7, 61]


def _quantize_with_llama_cpp(f16, out, mix: str) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = int(MIXES[mix].file_type), 1
    assert llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), params) == 0


def _logits(path) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=32, logits_all=True, verbose=False, n_threads=1)
    llm.eval(IDS)
    return np.array(llm.scores[: len(IDS)])


@pytest.mark.parametrize("mix", ["q4_k_m", "q5_k_m", "q6_k", "q4_k_s"])
@pytest.mark.parametrize("family", list(SHAPES))
def test_same_file_as_llama_quantize(tmp_path, family, mix):
    model, tokenizer = make_tiny_model(family.removesuffix("576"), **SHAPES[family])
    f16 = export_gguf(model, tokenizer, tmp_path / "f16.gguf", "f16")
    ours = export_gguf(model, tokenizer, tmp_path / f"{mix}.gguf", mix)
    theirs = tmp_path / f"llama-{mix}.gguf"
    _quantize_with_llama_cpp(f16, theirs, mix)
    a = {t.name: t for t in gguf.GGUFReader(str(ours)).tensors}
    b = {t.name: t for t in gguf.GGUFReader(str(theirs)).tensors}
    assert set(a) == set(b)
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type, (name, a[name].tensor_type, b[name].tensor_type)
        assert np.array_equal(np.asarray(a[name].data), np.asarray(b[name].data)), name
    if mix == "q4_k_m":
        assert np.array_equal(_logits(ours), _logits(theirs))


def test_phi3_named_file_with_a_bpe_vocabulary_loads(tmp_path):
    """A merge names the GGUF after its base ("tiny-phi3 + adapter"); llama.cpp's Phi-3 name rule
    would look up <s>, </s>, <unk>, <|endoftext|> in this BPE vocabulary and fail (unordered_map::at)."""
    model, tokenizer = make_tiny_model("phi3", **SHAPES["phi3"])
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", "q4_k_m", name="tiny-phi3 + adapter")
    assert _logits(path).shape == (len(IDS), model.config.vocab_size)


def test_phi3_sentencepiece_vocabulary_keeps_its_name_and_loads(tmp_path):
    """A Phi-3 style SentencePiece vocabulary (<unk>, <s>, </s>, <|endoftext|>, <|end|>) keeps the
    Phi-3 name, so llama.cpp applies Phi-3's token attributes, and loads."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config
    from tests.export.test_gguf_tokenizers import spm_tokenizer

    tokenizer = spm_tokenizer(phi3_style=True)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|end|>", "<|user|>",
                                                                "<|assistant|>"]})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("phi3", len(tokenizer), **SHAPES["phi3"])).eval()
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", "q4_k_m", name="Phi-3-mini-4k-instruct + adapter")
    reader = gguf.GGUFReader(str(path))
    assert bytes(reader.fields["general.name"].parts[-1]).decode() == "Phi-3-mini-4k-instruct + adapter"
    assert _logits(path).shape == (len(IDS), len(tokenizer))
