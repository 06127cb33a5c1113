"""The streamed merge: sharded bf16 in, bf16 out by default, the same weights as the in-memory
merge, PEFT's base + adapter logits, DoRA / rsLoRA / tied heads; what it refuses and why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from engine.config import PeftConfig
from engine.export.adapter import load_adapter, save_adapter
from engine.export.merge import MergeError, main, merge
from engine.layers.lora import lora_modules
from engine.layers.inject import inject_lora
from engine.model.build import load_base_model
from tests.conftest import make_tiny_model_dir

IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 61, 120, 8, 77, 30]])


def make_adapter(model_dir: Path, out: Path, seed: int = 0, **peft) -> Path:
    """Random non-zero A, B (and DoRA magnitudes) on every linear of the model in model_dir."""
    model = load_base_model(str(model_dir))
    torch.manual_seed(seed)
    cfg = PeftConfig(r=4, alpha=8, targets="all-linear", **peft)
    inject_lora(model, cfg.targets, cfg.r, cfg.alpha, use_rslora=cfg.use_rslora, use_dora=cfg.use_dora)
    with torch.no_grad():
        for m in lora_modules(model).values():
            torch.nn.init.normal_(m.lora_B.weight, std=0.2)
            if cfg.use_dora:
                m.lora_magnitude_vector.mul_(1 + 0.3 * torch.rand_like(m.lora_magnitude_vector))
    save_adapter(model, str(out), cfg, base_model_name_or_path=str(model_dir))
    return out


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@torch.no_grad()
def logits(directory: Path) -> torch.Tensor:
    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()(input_ids=IDS).logits


@pytest.fixture(scope="module")
def bf16_sharded(tmp_path_factory):
    """A tiny Llama saved in bf16 in ~20 KB shards, and an adapter for it."""
    from tests.conftest import make_tiny_model

    root = tmp_path_factory.mktemp("bf16")
    model, tokenizer = make_tiny_model("llama")
    model_dir = root / "tiny-llama-bf16"
    model.to(torch.bfloat16).save_pretrained(model_dir, max_shard_size="20KB")
    tokenizer.save_pretrained(model_dir)
    return model_dir, make_adapter(model_dir, root / "adapter")


def test_bf16_stays_bf16_and_matches_peft(tmp_path, bf16_sharded):
    from peft import PeftModel

    model_dir, adapter = bf16_sharded
    assert len(set(json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"].values())) > 2
    report = merge(str(model_dir), str(adapter), str(tmp_path / "bf16"), max_shard_size="20KB")
    out = tmp_path / "bf16"
    assert report["streamed"] is True and report["dtype"] == "bf16"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    merged, base = tensors(out), tensors(model_dir)
    assert set(merged) == set(base) and all(t.dtype == torch.bfloat16 for t in merged.values())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(base) and len(set(index["weight_map"].values())) > 2
    # W + s*B@A summed in fp32, rounded once to bf16; untargeted tensors byte-identical
    a_b = {k: v for k, v in tensors(adapter).items()}
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    expected = (base["model.layers.0.self_attn.q_proj.weight"].float()
                + 2.0 * a_b[f"{prefix}.lora_B.weight"] @ a_b[f"{prefix}.lora_A.weight"]).to(torch.bfloat16)
    assert torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], expected)
    assert torch.equal(merged["model.norm.weight"], base["model.norm.weight"])
    assert not torch.equal(merged["model.layers.1.mlp.down_proj.weight"], base["model.layers.1.mlp.down_proj.weight"])
    # merged in fp32: PEFT's base + adapter (on the bf16 weights read in fp32) within today's 1e-4
    merge(str(model_dir), str(adapter), str(tmp_path / "fp32"), dtype="fp32")
    peft_base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(peft_base, str(adapter)).eval()(input_ids=IDS).logits
    assert (logits(tmp_path / "fp32") - peft_logits).abs().max() < 1e-4
    assert (logits(model_dir) - peft_logits).abs().max() > 1e-2  # the adapter changes something


@pytest.mark.parametrize("peft, dtype", [({"use_dora": True}, "fp32"), ({"use_rslora": True}, "fp32"), ({}, "bf16")],
                         ids=["dora", "rslora", "fp32-to-bf16"])
def test_streamed_equals_in_memory(tmp_path, monkeypatch, peft, dtype):
    """Merged in blocks of 3 rows (so every weight takes several blocks) = the whole-model merge."""
    monkeypatch.setattr("engine.export.stream_merge.BLOCK_BYTES", 3 * 64 * 4)
    model_dir = make_tiny_model_dir(tmp_path, "qwen2")  # q/k/v biases pass through untouched
    adapter = make_adapter(model_dir, tmp_path / "adapter", **peft)
    streamed = merge(str(model_dir), str(adapter), str(tmp_path / "s"), dtype=dtype, drift="off")
    whole = merge(str(model_dir), str(adapter), str(tmp_path / "m"), dtype=dtype, drift="off", streamed=False)
    assert streamed["streamed"] and not whole["streamed"] and streamed["dtype"] == whole["dtype"] == dtype
    a, b = tensors(tmp_path / "s"), tensors(tmp_path / "m")
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        if dtype == "bf16":  # fp32 sums (equal up to fp32 rounding) each rounded once: one bf16 step apart
            assert torch.allclose(a[name].float(), b[name].float(), atol=1e-6, rtol=2 ** -7), name
        else:
            assert torch.allclose(a[name], b[name], atol=2e-6, rtol=0), name
    if dtype == "fp32":
        with torch.no_grad():
            ours = load_adapter(load_base_model(str(model_dir)), str(adapter))(input_ids=IDS).logits
        assert (logits(tmp_path / "s") - ours).abs().max() < 1e-4


def test_drift_off_and_gguf_base_is_merged_in_memory(tmp_path, capsys):
    from engine.export.gguf import export_gguf
    from tests.conftest import make_tiny_model

    model, tokenizer = make_tiny_model("llama")
    (tmp_path / "g").mkdir()
    path = export_gguf(model, tokenizer, tmp_path / "g" / "tiny.gguf", "bf16")
    adapter = make_adapter(path, tmp_path / "adapter")
    assert main(["--model", str(path), "--adapter", str(adapter), "--out", str(tmp_path / "out"), "--drift", "off"]) == 0
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["streamed"] is False and report["not_streamed_because"] == "it is a GGUF file"
    assert report["dtype"] == "bf16"  # the GGUF's weights were bf16
    assert report["drift"] is None
    out = capsys.readouterr().out
    assert "in memory (it is a GGUF file)" in out and "drift not measured (--drift off)" in out
    with pytest.raises(MergeError, match="cannot be merged streamed: it is a GGUF file"):
        merge(str(path), str(adapter), str(tmp_path / "again"), streamed=True)


def test_pre_quantized_checkpoint_is_not_streamed(tmp_path):
    from engine.export.stream_merge import stream_refusal

    model_dir = make_tiny_model_dir(tmp_path, "llama")
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes"}
    (model_dir / "config.json").write_text(json.dumps(config))
    assert stream_refusal(str(model_dir)) == "its config.json has a quantization_config (a pre-quantized checkpoint)"


def test_bad_shard_size_and_bad_drift_are_named(tmp_path):
    from engine.export.stream_merge import StreamMergeError, parse_size

    assert parse_size("30KB") == 30_000 and parse_size("1GiB") == 2**30 and parse_size(7) == 7
    with pytest.raises(StreamMergeError, match="--max-shard-size '2 gigs'"):
        parse_size("2 gigs")
    model_dir = make_tiny_model_dir(tmp_path, "llama")
    adapter = make_adapter(model_dir, tmp_path / "adapter")
    with pytest.raises(MergeError, match="--drift must be auto, on or off, got 'maybe'"):
        merge(str(model_dir), str(adapter), str(tmp_path / "out"), drift="maybe")
    assert not (tmp_path / "out").exists()


def test_drift_auto_skips_what_does_not_fit(tmp_path, monkeypatch):
    from engine.export import merge as merge_module

    model_dir = make_tiny_model_dir(tmp_path, "llama")
    monkeypatch.setattr(merge_module, "_available_bytes", lambda: 10**9)
    assert merge_module.want_drift("auto", str(model_dir), None) == (True, "--drift auto: the fp32 model fits in memory")
    monkeypatch.setattr(merge_module, "_available_bytes", lambda: 2**18)  # a quarter: 64 KiB
    measure, why = merge_module.want_drift("auto", str(model_dir), None)
    assert not measure and why.startswith("--drift auto: skipped, the fp32 model (~0.0 GiB) needs more than a "
                                          "quarter of the available memory (0.0 GiB); --drift on forces it")
    assert merge_module.want_drift("on", str(model_dir), None) == (True, "--drift on")
