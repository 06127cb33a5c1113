"""The adapter as a GGUF LoRA file: base GGUF tensor + alpha/r * B @ A (llama.cpp's formula,
rank read from lora_a) equals the merged model's GGUF tensor for every targeted weight, in
llama.cpp's layout (Q/K rows permuted for Llama, Phi-3's fused projections); what is refused."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from engine.export.gguf import export_gguf
from engine.export.gguf_arch import GGUFExportError
from engine.export.gguf_lora import export_lora_gguf, main
from engine.export.merge import merge
from tests.export.test_stream_merge import make_adapter
from tests.conftest import make_tiny_model_dir


def _tensors(path) -> dict[str, np.ndarray]:
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(x) for x in t.shape[::-1]])
            for t in gguf.GGUFReader(str(path)).tensors}


def _field(reader, key):
    part = reader.fields[key].parts[-1]
    return bytes(part).decode() if part.dtype == np.uint8 else float(part[0])


@pytest.mark.parametrize("family, peft", [("llama", {"use_rslora": True}), ("phi3", {})])
def test_base_plus_lora_equals_the_merged_gguf(tmp_path, family, peft):
    from transformers import AutoModelForCausalLM

    from engine.model.build import load_tokenizer

    model_dir = make_tiny_model_dir(tmp_path, family)
    adapter = make_adapter(model_dir, tmp_path / "adapter", **peft)
    lora = export_lora_gguf(str(model_dir), str(adapter), tmp_path / "lora.gguf", "f32")
    merge(str(model_dir), str(adapter), str(tmp_path / "merged"), dtype="fp32", drift="off")
    tokenizer = load_tokenizer(str(model_dir))
    base = export_gguf(AutoModelForCausalLM.from_pretrained(str(model_dir)), tokenizer, tmp_path / "b.gguf", "f16")
    merged = export_gguf(AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")), tokenizer,
                         tmp_path / "m.gguf", "f16")
    reader = gguf.GGUFReader(str(lora))
    assert _field(reader, "general.type") == "adapter" and _field(reader, "adapter.type") == "lora"
    alpha = _field(reader, "adapter.lora.alpha")
    lora_t, base_t, merged_t = _tensors(lora), _tensors(base), _tensors(merged)
    targets = sorted(n.removesuffix(".lora_a") for n in lora_t if n.endswith(".lora_a"))
    expected_targets = 4 * 2 if family == "phi3" else 7 * 2  # qkv, o, gate_up, down | q, k, v, o, gate, up, down
    assert len(targets) == expected_targets
    assert "blk.0.attn_qkv.weight" in targets if family == "phi3" else "blk.0.attn_q.weight" in targets
    for name in targets:
        a, b = lora_t[f"{name}.lora_a"], lora_t[f"{name}.lora_b"]
        rank = a.shape[0]
        got = base_t[name].astype(np.float32) + alpha / rank * (b @ a)
        # both sides round to f16 once: equal up to one f16 step of the merged weight
        assert np.abs(got - merged_t[name]).max() < 2e-3, name
        assert np.abs(base_t[name] - merged_t[name]).max() > 1e-2, name  # the adapter changes it


def test_refusals_are_named(tmp_path, capsys):
    model_dir = make_tiny_model_dir(tmp_path, "llama", tie_word_embeddings=True)
    dora = make_adapter(model_dir, tmp_path / "dora", use_dora=True)
    with pytest.raises(GGUFExportError, match="DoRA adapter .* llama.cpp applies plain LoRA only"):
        export_lora_gguf(str(model_dir), str(dora), tmp_path / "x.gguf")
    head = make_adapter(model_dir, tmp_path / "head")
    from engine.config import PeftConfig
    from engine.export.adapter import save_adapter
    from engine.layers.inject import inject_lora
    from engine.model.build import load_base_model
    model = load_base_model(str(model_dir))
    inject_lora(model, ["q_proj", "lm_head"], 4, 8)
    save_adapter(model, str(tmp_path / "tied"), PeftConfig(r=4, alpha=8, targets=["q_proj", "lm_head"]), str(model_dir))
    with pytest.raises(GGUFExportError, match="targets lm_head but the base ties it"):
        export_lora_gguf(str(model_dir), str(tmp_path / "tied"), tmp_path / "x.gguf")
    with pytest.raises(GGUFExportError, match="one of f32, f16, bf16, q8_0, got 'q4_0'"):
        export_lora_gguf(str(model_dir), str(head), tmp_path / "x.gguf", "q4_0")
    assert not list(tmp_path.glob("x.gguf*"))
    (tmp_path / "exists.gguf").write_text("keep")
    assert main(["--model", str(model_dir), "--adapter", str(head), "--out", str(tmp_path / "exists.gguf")]) == 1
    assert "exists; nothing is overwritten" in capsys.readouterr().err
    assert (tmp_path / "exists.gguf").read_text() == "keep"


def test_llama_cpp_applies_the_lora(tmp_path):
    """Optional (llama-cpp-python): base GGUF + --lora file = the merged HF model's logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from engine.model.build import load_tokenizer

    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python is not installed")
    model_dir = make_tiny_model_dir(tmp_path, "llama")
    adapter = make_adapter(model_dir, tmp_path / "adapter")
    lora = export_lora_gguf(str(model_dir), str(adapter), tmp_path / "lora.gguf", "f32")
    base = export_gguf(AutoModelForCausalLM.from_pretrained(str(model_dir)), load_tokenizer(str(model_dir)),
                       tmp_path / "b.gguf", "f16")
    merge(str(model_dir), str(adapter), str(tmp_path / "merged"), dtype="fp32", drift="off")
    ids = [5, 17, 42, 99, 3, 250, 7, 61, 120, 8, 77, 30]
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))(input_ids=torch.tensor([ids])).logits[0]
    scores = {}
    for name, kwargs in (("base", {}), ("lora", {"lora_path": str(lora)})):
        llm = llama_cpp.Llama(model_path=str(base), n_ctx=64, logits_all=True, verbose=False, n_threads=1, **kwargs)
        llm.eval(ids)
        scores[name] = torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float32)

    def kl(a, b):
        la, lb = torch.log_softmax(a.double(), -1), torch.log_softmax(b.double(), -1)
        return float((la.exp() * (la - lb)).sum(-1).mean())
    assert kl(expected, scores["lora"]) < 1e-3 < kl(expected, scores["base"])
