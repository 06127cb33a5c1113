"""Merge: the exported HF directory reproduces base + adapter; PEFT agrees with our adapters;
QLoRA merges report their drift; bad inputs fail with one clear line and overwrite nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.export.adapter import AdapterError, AdapterNotFoundError, save_adapter
from engine.config import DataConfig, ModelConfig, OptimConfig, PeftConfig, RunConfig, TrainConfig
from engine.layers.lora import LoRATargetError, lora_modules
from engine.layers.inject import inject_lora
from engine.export.merge import MergeError, main, merge
from engine.model.build import load_base_model
from tests.conftest import make_tiny_model_dir

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 61, 120, 8, 77, 30]])


def make_adapter(model_dir: Path, out: Path, targets="all-linear", seed: int = 0, **peft) -> Path:
    """An adapter with random (non-zero) A and B for the model in model_dir."""
    model = load_base_model(str(model_dir))
    torch.manual_seed(seed)
    cfg = PeftConfig(r=4, alpha=8, targets=targets, **peft)
    inject_lora(model, cfg.targets, cfg.r, cfg.alpha, use_rslora=cfg.use_rslora)
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.2)
    save_adapter(model, str(out), cfg, base_model_name_or_path=str(model_dir))
    return out


@torch.no_grad()
def ours_logits(model_dir: Path, adapter: Path, quant=None) -> torch.Tensor:
    from engine.export.adapter import load_adapter
    model = load_adapter(load_base_model(str(model_dir), quant=quant), str(adapter))
    return model(input_ids=IDS, use_cache=False).logits


@torch.no_grad()
def plain_logits(directory: Path, **kwargs) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32, **kwargs).eval()
    return model(input_ids=IDS, use_cache=False).logits


@pytest.mark.parametrize("family", ["llama", pytest.param("phi3", marks=pytest.mark.slow),
                                    pytest.param("qwen2", marks=pytest.mark.slow), "gpt2"])
def test_merged_export_reproduces_base_plus_adapter(tmp_path, family):
    """Llama, Phi-3 (fused qkv_proj / gate_up_proj), Qwen2 (q/k/v biases), GPT-2 (Conv1D layers,
    trained as nn.Linear and written back as Conv1D): fp32 export within 1e-4."""
    model_dir = make_tiny_model_dir(tmp_path, family)
    adapter = make_adapter(model_dir, tmp_path / "adapter")
    report = merge(str(model_dir), str(adapter), str(tmp_path / "merged"), dtype="fp32")
    out = tmp_path / "merged"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "merge_report.json"):
        assert (out / name).is_file(), name
    expected = ours_logits(model_dir, adapter)
    got = plain_logits(out)
    assert (got - expected).abs().max() < 1e-4
    assert (plain_logits(model_dir) - expected).abs().max() > 1e-2  # the adapter changes something
    assert report["drift"]["max_abs_logit_diff"] < 1e-4
    assert report["drift"]["mean_kl"] < 1e-8
    assert json.loads((out / "merge_report.json").read_text())["drift"] == report["drift"]


def test_tied_lm_head_target_is_untied_in_export(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path, "llama", tie_word_embeddings=True)
    adapter = make_adapter(model_dir, tmp_path / "adapter", targets=["q_proj", "v_proj", "lm_head"])
    merge(str(model_dir), str(adapter), str(tmp_path / "merged"), dtype="fp32")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert (plain_logits(tmp_path / "merged") - ours_logits(model_dir, adapter)).abs().max() < 1e-4


def test_sharded_fp16_export_and_generation_config(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path, "llama")
    adapter = make_adapter(model_dir, tmp_path / "adapter")
    report = merge(str(model_dir), str(adapter), str(tmp_path / "merged"), dtype="fp16", max_shard_size="30KB")
    out = tmp_path / "merged"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.dtype == torch.float16
    gen = json.loads((out / "generation_config.json").read_text())
    from engine.model.build import load_tokenizer
    assert load_tokenizer(str(out)).convert_ids_to_tokens(gen["eos_token_id"]) == "<|im_end|>"
    # fp16 rounding of the weights is the only drift, and it is small but not zero
    assert 0 < report["drift"]["max_abs_logit_diff"] < 0.05


# ----------------------------------------------------------------------------- trained adapters vs PEFT

def _write_chats(path: Path, n: int, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    words = "the quick brown fox jumps over lazy dog capital of france paris hello how are you".split()
    with open(path, "w") as f:
        for _ in range(n):
            user = " ".join(words[int(i)] for i in torch.randint(0, len(words), (6,), generator=g))
            f.write(json.dumps({"messages": [{"role": "user", "content": user},
                                             {"role": "assistant", "content": " ".join(reversed(user.split()))}]}) + "\n")
    return path


def train_tiny(tmp_path: Path, method: str, steps: int = 4) -> tuple[Path, Path]:
    """(model dir, run dir) after a few optimizer steps of engine.train on a tiny Llama."""
    from engine.train import run_training

    model_dir = make_tiny_model_dir(tmp_path, "llama")
    data = _write_chats(tmp_path / "train.jsonl", 16, seed=1)
    cfg = RunConfig(output_dir=str(tmp_path / f"run-{method}"), model=ModelConfig(path=str(model_dir)),
                    data=DataConfig(train_path=str(data), max_seq_len=64, cache_dir=str(tmp_path / "cache")),
                    peft=PeftConfig(method=method, r=4, alpha=8, targets="all-linear"),
                    optim=OptimConfig(lr=3e-2), train=TrainConfig(max_steps=steps, micro_batch_size=2, plots=False))
    run_training(cfg.validate())
    return model_dir, Path(cfg.output_dir)


@pytest.mark.slow
def test_trained_adapter_loads_in_peft_and_merges(tmp_path):
    from peft import PeftModel

    model_dir, run = train_tiny(tmp_path, "lora")
    adapter = run / "adapter"
    ours = ours_logits(model_dir, adapter)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(base, str(adapter)).eval()(input_ids=IDS).logits
    assert (peft_logits - ours).abs().max() < 1e-5
    assert (ours - plain_logits(model_dir)).abs().max() > 1e-3  # training moved the adapter off zero
    merge(str(model_dir), str(adapter), str(tmp_path / "merged"), dtype="fp32")
    assert (plain_logits(tmp_path / "merged") - ours).abs().max() < 1e-4


@pytest.mark.slow
def test_qlora_merge_reports_drift_both_ways(tmp_path):
    from peft import PeftModel

    from engine.layers.quant import QuantSpec

    model_dir, run = train_tiny(tmp_path, "qlora")
    adapter = run / "adapter"
    # the run's config.yaml says qlora: merge picks that up without --method
    original = merge(str(model_dir), str(adapter), str(tmp_path / "to16"), dtype="fp32")
    dequant = merge(str(model_dir), str(adapter), str(tmp_path / "todq"), dtype="fp32", from_dequantized=True)
    assert original["method"] == dequant["method"] == "qlora"
    assert "original 16-bit" in original["merged_into"] and "dequantized" in dequant["merged_into"]
    assert original["reference"] == "4-bit base + LoRA, as trained"
    for report in (original, dequant):
        assert all(torch.isfinite(torch.tensor(v)) for v in report["drift"].values())
    # merging into W_hat is the trained function (up to fp32 rounding); into W it is not
    assert dequant["drift"]["max_abs_logit_diff"] < 1e-3
    assert original["drift"]["mean_kl"] > dequant["drift"]["mean_kl"]
    trained = ours_logits(model_dir, adapter, quant=QuantSpec("nf4", True, torch.float32))
    assert (plain_logits(tmp_path / "todq") - trained).abs().max() < 1e-3
    # PEFT onto the 16-bit base equals our 16-bit merge (the adapter is PEFT-loadable)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(base, str(adapter)).eval()(input_ids=IDS).logits
    assert (peft_logits - plain_logits(tmp_path / "to16")).abs().max() < 1e-4


# ----------------------------------------------------------------------------- bad inputs

@pytest.fixture
def llama_and_adapter(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path, "llama")
    return model_dir, make_adapter(model_dir, tmp_path / "adapter")


def _snapshot(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_non_empty_output_dir_is_refused_and_untouched(tmp_path, llama_and_adapter, capsys):
    model_dir, adapter = llama_and_adapter
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    (out / "config.json").write_text("{}")
    before = _snapshot(out)
    with pytest.raises(MergeError, match="exists and is not empty"):
        merge(str(model_dir), str(adapter), str(out))
    assert main(["--model", str(model_dir), "--adapter", str(adapter), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not empty" in err and "Traceback" not in err
    assert _snapshot(out) == before
    assert not any(p.name.startswith(".out.partial") for p in tmp_path.iterdir())


def test_empty_output_dir_is_used(tmp_path, llama_and_adapter):
    model_dir, adapter = llama_and_adapter
    (tmp_path / "out").mkdir()
    merge(str(model_dir), str(adapter), str(tmp_path / "out"), dtype="fp32")
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_missing_adapter_file(tmp_path, llama_and_adapter, capsys):
    model_dir, adapter = llama_and_adapter
    os.remove(adapter / "adapter_model.safetensors")
    with pytest.raises(AdapterNotFoundError, match="adapter_model.safetensors does not exist"):
        merge(str(model_dir), str(adapter), str(tmp_path / "out"))
    assert main(["--model", str(model_dir), "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope" in err and "does not exist" in err
    assert not (tmp_path / "out").exists()


def test_adapter_with_other_targets(tmp_path, llama_and_adapter, capsys):
    model_dir, adapter = llama_and_adapter
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_modules"] = ["c_attn"]  # a GPT-2 name: no such layer in a Llama
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LoRATargetError, match="c_attn"):
        merge(str(model_dir), str(adapter), str(tmp_path / "out"))
    config["target_modules"] = ["q_proj"]  # fewer targets than the file holds tensors for
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert main(["--model", str(model_dir), "--adapter", str(adapter), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "AdapterError" in err and "matches no LoRA layer" in err
    assert not (tmp_path / "out").exists()


def test_adapter_for_other_shapes(tmp_path, capsys):
    small = make_tiny_model_dir(tmp_path / "a", "llama")
    wide = make_tiny_model_dir(tmp_path / "b", "llama", intermediate_size=96)
    adapter = make_adapter(wide, tmp_path / "adapter")
    with pytest.raises(AdapterError, match=r"down_proj.lora_A.weight' has shape \(4, 96\)"):
        merge(str(small), str(adapter), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_from_dequantized_needs_a_qlora_adapter(tmp_path, llama_and_adapter):
    model_dir, adapter = llama_and_adapter
    with pytest.raises(MergeError, match="QLoRA adapters only"):
        merge(str(model_dir), str(adapter), str(tmp_path / "out"), from_dequantized=True)


def test_cli_error_has_no_traceback(tmp_path, llama_and_adapter):
    """The real entry point: one line on stderr, exit status 1."""
    import subprocess
    import sys

    model_dir, adapter = llama_and_adapter
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("x")
    proc = subprocess.run([sys.executable, "-m", "engine.export.merge", "--model", str(model_dir), "--adapter", str(adapter),
                           "--out", str(out)], capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 1
    lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "not empty" in lines[0] and "Traceback" not in proc.stderr


def test_gguf_base_merges_into_its_dequantized_tensors(tmp_path):
    """A GGUF base (here a tiny Llama written by our exporter; the default SmolLM2 is one too):
    the "original weights" are the GGUF tensors as transformers dequantizes them."""
    from engine.export.gguf import export_gguf
    from tests.conftest import make_tiny_model

    model, tokenizer = make_tiny_model("llama")
    gguf_dir = tmp_path / "gguf"
    gguf_dir.mkdir()
    path = export_gguf(model, tokenizer, gguf_dir / "tiny.gguf", "f16")
    adapter = make_adapter(path, tmp_path / "adapter")
    report = merge(str(path), str(adapter), str(tmp_path / "merged"), dtype="fp32")
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    assert (plain_logits(tmp_path / "merged") - ours_logits(path, adapter)).abs().max() < 1e-4
    assert report["drift"]["max_abs_logit_diff"] < 1e-4
