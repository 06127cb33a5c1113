"""Every refusal of the streamed merge and the GGUF writers names the file, tensor or field."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.export.gguf import GGUFExportError, export_gguf, write_gguf
from engine.export.gguf_lora import export_lora_gguf
from engine.export.merge import merge
from engine.export.safetensors_io import SafetensorsFormatError, StreamWriter, read_header
from engine.export.stream_merge import StreamMergeError, checkpoint_dtype
from engine.model.build import ModelLoadError
from tests.conftest import make_tiny_model, make_tiny_model_dir
from tests.export.test_stream_merge import make_adapter


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    model_dir = make_tiny_model_dir(root, "llama")
    return model_dir, make_adapter(model_dir, root / "adapter")


def test_checkpoint_tensor_the_model_lacks(tmp_path, llama):
    import shutil

    model_dir, adapter = llama
    copy = tmp_path / "extra"
    shutil.copytree(model_dir, copy)
    tensors = load_file(copy / "model.safetensors")
    tensors["model.bogus.weight"] = torch.zeros(2)
    save_file(tensors, copy / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"model.safetensors: unexpected tensor 'model.bogus.weight'"):
        merge(str(copy), str(adapter), str(tmp_path / "out"), drift="off")
    assert not (tmp_path / "out").exists()


def test_adapter_target_missing_from_the_checkpoint(tmp_path, llama):
    import shutil

    model_dir, adapter = llama
    copy = tmp_path / "tied"  # a config that ties the head, a checkpoint without lm_head.weight or embeddings
    shutil.copytree(model_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (copy / "config.json").write_text(json.dumps(config))
    from engine.config import PeftConfig
    from engine.export.adapter import save_adapter
    from engine.layers.inject import inject_lora
    from engine.model.build import load_base_model
    model = load_base_model(str(model_dir))
    inject_lora(model, ["lm_head"], 4, 8)
    save_adapter(model, str(tmp_path / "head"), PeftConfig(r=4, alpha=8, targets=["lm_head"]), str(model_dir))
    tensors = load_file(copy / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, copy / "model.safetensors")
    with pytest.raises(ModelLoadError, match="checkpoint tensor 'lm_head.weight' is missing"):
        merge(str(copy), str(tmp_path / "head"), str(tmp_path / "out"), drift="off", streamed=False)
    with pytest.raises(StreamMergeError, match="the adapter targets 'lm_head' but the checkpoint has no tensor "
                                               "'lm_head.weight'"):
        merge(str(copy), str(tmp_path / "head"), str(tmp_path / "out"), drift="off")
    assert not (tmp_path / "out").exists()


def test_no_float_tensors():
    from engine.export.safetensors_io import TensorInfo

    with pytest.raises(StreamMergeError, match="no floating-point tensors"):
        checkpoint_dtype({"ids": TensorInfo(torch.int64, (2,), 0, 16)})


def test_writer_refuses_extra_and_truncated_sources(tmp_path):
    w = StreamWriter(tmp_path / "o.safetensors", [("x", torch.float32, (2,))])
    w.write("x", torch.zeros(2))
    with pytest.raises(SafetensorsFormatError, match="tensor 'y' written after the last one planned"):
        w.write("y", torch.zeros(2))
    w.close()
    save_file({"w": torch.ones(64)}, tmp_path / "src.safetensors")
    info = read_header(tmp_path / "src.safetensors")["w"]
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "src.safetensors").read_bytes()[:-8])
    w = StreamWriter(tmp_path / "c.safetensors", [("w", torch.float32, (64,))])
    with open(tmp_path / "cut.safetensors", "rb") as src, pytest.raises(SafetensorsFormatError,
                                                                         match="cut.safetensors: file ends inside tensor 'w'"):
        w.copy_from("w", src, info)


def test_gguf_refusals_name_the_field(tmp_path):
    model, tokenizer = make_tiny_model("gemma2", head_dim=16, query_pre_attn_scalar=256)
    with pytest.raises(GGUFExportError, match="gemma2 with query_pre_attn_scalar=256: llama.cpp scales queries by "
                                              r"head_dim \(16\) or hidden_size / heads only"):
        export_gguf(model, tokenizer, tmp_path / "m.gguf")
    model, tokenizer = make_tiny_model("llama", attention_bias=True)
    with pytest.raises(GGUFExportError, match="llama models with attention_bias are not supported"):
        export_gguf(model, tokenizer, tmp_path / "m.gguf")
    model, tokenizer = make_tiny_model("llama", rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                 "rope_theta": 10000.0})
    with pytest.raises(GGUFExportError, match="rope type 'linear' / rope_scaling is not supported"):
        export_gguf(model, tokenizer, tmp_path / "m.gguf")
    from transformers import AutoModelForCausalLM
    from tests.conftest import tiny_config
    model = AutoModelForCausalLM.from_config(tiny_config("llama", 100))
    with pytest.raises(GGUFExportError, match=r"tokenizer has \d+ tokens but the model's vocab_size is 100"):
        export_gguf(model, tokenizer, tmp_path / "m.gguf")
    model, tokenizer = make_tiny_model("llama")
    state = dict(model.state_dict(), **{"model.extra.weight": torch.zeros(4, 4)})
    with pytest.raises(GGUFExportError, match="no GGUF name for tensor 'model.extra.weight'"):
        write_gguf(model.config, tokenizer, lambda: ((k, tuple(v.shape), lambda a, b, v=v: v[a:b])
                                                     for k, v in state.items()), tmp_path / "m.gguf")
    calls = []

    def shuffled():  # a source that gives its tensors in another order the second time
        calls.append(1)
        items = list(model.state_dict().items())
        items = items if len(calls) == 1 else items[::-1]
        return ((k, tuple(v.shape), lambda a, b, v=v: v[a:b]) for k, v in items)
    with pytest.raises(GGUFExportError, match="tensors came in a different order the second time"):
        write_gguf(model.config, tokenizer, shuffled, tmp_path / "m.gguf")

    def short_rows():  # rows(a, b) that gives one row too few
        return ((k, tuple(v.shape), lambda a, b, v=v: v[a:max(a + 1, b - 1)] if v.dim() > 1 else v[a:b])
                for k, v in model.state_dict().items())
    with pytest.raises(GGUFExportError, match="came to .* bytes, .* were planned"):
        write_gguf(model.config, tokenizer, short_rows, tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())  # nothing half-written is left


def test_gguf_lora_refuses_a_malformed_adapter(tmp_path, llama):
    model_dir, adapter = llama
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if "q_proj.lora_B" not in k}, bad / "adapter_model.safetensors")
    with pytest.raises(GGUFExportError, match="no lora_A / lora_B pair for 'model.layers.0.self_attn.q_proj'"):
        export_lora_gguf(str(model_dir), str(bad), tmp_path / "x.gguf")
    save_file({"unrelated": torch.zeros(1)}, bad / "adapter_model.safetensors")
    with pytest.raises(GGUFExportError, match="the adapter has no lora_A / lora_B tensors"):
        export_lora_gguf(str(model_dir), str(bad), tmp_path / "x.gguf")
    assert not list(tmp_path.glob("x.gguf*"))


def test_gguf_drift_not_read_back_is_reported(tmp_path):
    """Gemma has no transformers GGUF reader; transformers reads Qwen3's head_dim from its config
    class (128), so a head_dim-16 Qwen3 fails to load: the merge reports both, with the reason."""
    for family, why in (("gemma", "transformers has no GGUF reader for architecture 'gemma'"),
                        ("qwen3", "transformers' GGUF reader failed: ")):
        model_dir = make_tiny_model_dir(tmp_path / family, family)
        adapter = make_adapter(model_dir, tmp_path / family / "adapter")
        report = merge(str(model_dir), str(adapter), str(tmp_path / family / "out"), gguf="f16")
        assert report["gguf"]["drift"] is None and report["gguf"]["not_read_back"].startswith(why), report["gguf"]
        assert (tmp_path / family / "out" / "model-f16.gguf").is_file()


def test_cli_names_the_gguf_types_and_takes_a_comma_list(capsys):
    from engine.export.merge import gguf_type_list, parse_args

    for value in ("q4", "q4_k_m,q3"):
        with pytest.raises(SystemExit):
            parse_args(["--adapter", "a", "--out", "o", "--gguf", value])
        bad = value.split(",")[-1]
        assert (f"invalid choice: {bad!r} (choose from f16, bf16, q8_0, q4_0, q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k, "
                "or a comma list of them)") in capsys.readouterr().err
    assert parse_args(["--adapter", "a", "--out", "o", "--gguf", "q4_0"]).gguf == ["q4_0"]
    assert parse_args(["--adapter", "a", "--out", "o", "--gguf", "q4_k_m,Q8_0,q4_k_m"]).gguf == ["q4_k_m", "q8_0"]
    with pytest.raises(GGUFExportError, match="got 'q2_k'"):
        gguf_type_list("q4_k_m, q2_k")
