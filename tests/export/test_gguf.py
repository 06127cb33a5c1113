"""GGUF export round-trips through transformers' GGUF reader: weights, logits, tokenizer, template."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.export.gguf import GGUFExportError, export_gguf
from engine.export.gguf_arch import permute_qk
from tests.conftest import make_tiny_model

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 61, 120, 8, 77, 30, 2]])


def test_permutation_is_undone_by_the_reader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(4 * 16, 64)
    for heads, kv in ((4, 4), (4, 2)):
        rows = 16 * kv
        permuted = permute_qk(w[:rows], kv).numpy()
        back = LlamaTensorProcessor({})._reverse_permute_weights(permuted, heads, kv)
        assert np.array_equal(back, w[:rows].numpy())
        assert not np.array_equal(permuted, w[:rows].numpy())


def _roundtrip(tmp_path, qtype: str, tie: bool):
    model, tokenizer = make_tiny_model("llama", tie_word_embeddings=tie)
    path = export_gguf(model, tokenizer, tmp_path / f"m-{qtype}.gguf", qtype)
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        expected, got = model(input_ids=IDS).logits, back(input_ids=IDS).logits
    return model, tokenizer, back, path, expected, got


@pytest.mark.parametrize("tie", [False, True])
def test_f16_roundtrip_through_transformers(tmp_path, tie):
    model, tokenizer, back, path, expected, got = _roundtrip(tmp_path, "f16", tie)
    # every weight comes back as its f16 rounding (so names, permutation and layout are right)
    theirs = back.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(theirs[name], tensor.half().float()), name
    assert back.config.tie_word_embeddings is tie
    assert (got - expected).abs().max() < 2e-2
    assert (got.argmax(-1) == expected.argmax(-1)).all()
    import gguf
    names = {t.name for t in gguf.GGUFReader(str(path)).tensors}
    assert ("output.weight" in names) is (not tie)


def test_q8_0_roundtrip(tmp_path):
    model, tokenizer, back, path, expected, got = _roundtrip(tmp_path, "q8_0", False)
    import gguf
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert (got - expected).abs().max() < 0.1  # 8-bit blocks: looser than f16, far below the logit scale
    assert expected.abs().max() > 1.0


def test_tokenizer_and_template_roundtrip(tmp_path):
    model, tokenizer = make_tiny_model("llama")
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", "f16")
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in ("The quick brown fox, 42!", "<|im_start|>user\nhello<|im_end|>\n", "déjà vu ünïcode"):
        assert back(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert back.eos_token == "<|im_end|>"
    assert back.chat_template == tokenizer.chat_template


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    model, tokenizer = make_tiny_model("gpt2")
    with pytest.raises(GGUFExportError, match="supports model_type llama, .* this model is 'gpt2'"):
        export_gguf(model, tokenizer, tmp_path / "m.gguf", "f16")
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "m.gguf.partial").exists()
    model, tokenizer = make_tiny_model("llama")
    with pytest.raises(GGUFExportError, match="one of f16, bf16, q8_0, q4_0, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k, "
                                              "got 'q3'$"):
        export_gguf(model, tokenizer, tmp_path / "m.gguf", "q3")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("family, qtype", [("llama", "q8_0"), ("qwen2", "q4_0"), ("phi3", "q4_0")])
def test_merge_writes_gguf_and_reports_its_drift(tmp_path, capsys, family, qtype):
    """The merge CLI's GGUF, read back by transformers: drift vs base + adapter and vs the merged
    files, within the type's tolerance; the GGUF is converted from the merged shards."""
    import json

    from engine.export.gguf import DRIFT_TOLERANCE
    from engine.export.merge import main
    from tests.conftest import make_tiny_model_dir
    from tests.export.test_merge import make_adapter

    model_dir = make_tiny_model_dir(tmp_path, family)
    adapter = make_adapter(model_dir, tmp_path / "adapter")
    out = tmp_path / "out"
    assert main(["--model", str(model_dir), "--adapter", str(adapter), "--out", str(out), "--gguf", qtype]) == 0
    assert (out / f"model-{qtype}.gguf").is_file()
    report = json.loads((out / "merge_report.json").read_text())
    entry = report["gguf"]
    assert entry["type"] == qtype and entry["tolerance_mean_kl"] == DRIFT_TOLERANCE[qtype]
    assert 0 < entry["drift_vs_merged"]["mean_kl"] < DRIFT_TOLERANCE[qtype] and entry["within_tolerance"]
    assert entry["drift"]["mean_kl"] > 0 and report["drift"]["max_abs_logit_diff"] < 1e-4  # fp32 base: fp32 out
    printed = capsys.readouterr().out
    assert f"GGUF model-{qtype}.gguf (read back by transformers)" in printed
    assert f"within the {qtype} tolerance" in printed and "(fp32, streamed)" in printed


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp


@pytest.mark.parametrize("family, qtype", [("llama", "q4_0"), ("qwen2", "q8_0"), ("phi3", "q4_0"),
                                           ("qwen3", "f16"), ("gemma2", "q8_0"), ("gemma", "f16")])
def test_llama_cpp_runs_the_file(tmp_path, family, qtype):
    """Optional: llama.cpp itself (llama-cpp-python, else a llama-cli binary) loads the file; with
    llama-cpp-python its logits on the same token ids are within the type's tolerance."""
    import shutil

    from engine.export.gguf import DRIFT_TOLERANCE
    from tests.export.test_gguf_families import FAMILIES

    llama_cpp, binary = _llama_cpp(), shutil.which("llama-cli")
    if llama_cpp is None and binary is None:
        pytest.skip("neither llama-cpp-python nor a llama-cli binary is installed")
    model, tokenizer = make_tiny_model(family, **FAMILIES.get(family, {}))
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", qtype)
    ids = IDS[0].tolist()
    if llama_cpp is not None:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
        llm.eval(ids)
        got = torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float32)
        with torch.no_grad():
            expected = model(input_ids=IDS).logits[0]
        la, lb = torch.log_softmax(expected.double(), -1), torch.log_softmax(got.double(), -1)
        assert float((la.exp() * (la - lb)).sum(-1).mean()) < DRIFT_TOLERANCE[qtype]
    else:
        import subprocess
        proc = subprocess.run([binary, "-m", str(path), "-p", "hello", "-n", "4", "--temp", "0", "-no-cnv"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]


def test_merge_writes_several_types_and_a_modelfile(tmp_path):
    """--gguf q4_k_m,q8_0: one merge, one file per type (each in the report with its seconds), and an
    Ollama Modelfile FROM the first; --ollama alone writes the Modelfile FROM the merged directory."""
    from engine.export.merge import merge
    from tests.conftest import make_tiny_model_dir
    from tests.export.test_merge import make_adapter

    model_dir = make_tiny_model_dir(tmp_path, "qwen2")
    adapter = make_adapter(model_dir, tmp_path / "adapter")
    report = merge(str(model_dir), str(adapter), str(tmp_path / "out"), gguf="q4_k_m,q8_0", drift="off",
                   system="Answer in JSON.")
    assert [e["file"] for e in report["ggufs"]] == ["model-q4_k_m.gguf", "model-q8_0.gguf"]
    assert report["gguf"] == report["ggufs"][0] and all(e["seconds"] >= 0 for e in report["ggufs"])
    import gguf
    for qtype, file_type in (("q4_k_m", 15), ("q8_0", 7)):
        reader = gguf.GGUFReader(str(tmp_path / "out" / f"model-{qtype}.gguf"))
        assert int(reader.fields["general.file_type"].parts[-1][0]) == file_type
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert "FROM ./model-q4_k_m.gguf\n# FROM ./model-q8_0.gguf\n" in modelfile
    assert 'SYSTEM """Answer in JSON."""' in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    report = merge(str(model_dir), str(adapter), str(tmp_path / "plain"), drift="off", ollama=True)
    assert "ggufs" not in report and "FROM .\n" in (tmp_path / "plain" / "Modelfile").read_text()
