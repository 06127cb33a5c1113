"""The adapter alone as a GGUF LoRA file, what llama.cpp loads with `--lora` (as convert_lora_to_gguf.py writes it).

    python -m engine.export.gguf_lora --model BASE --adapter runs/x/adapter --out adapter-f16.gguf [--type f16]
    llama-cli -m base.gguf --lora adapter-f16.gguf

Layout: metadata general.architecture = the base's GGUF arch, general.type = "adapter",
adapter.type = "lora", adapter.lora.alpha; for every targeted weight `<gguf name>.weight`, two
tensors `<gguf name>.weight.lora_a` = A [r, in] and `.lora_b` = B [out, r]. llama.cpp adds
scale * alpha / r * B @ A to the base weight, so alpha is written as s * r with the engine's
scaling s (= alpha / sqrt(r) for rsLoRA): the product is s either way. Llama-family Q/K rows are
permuted in the base GGUF (engine/export/gguf_arch.py), so B's rows are permuted the same way
(A acts on the input and is unchanged). Types: f32, f16, bf16, q8_0 (rows of A have length
`in`, of B length r; a row that is not a multiple of 32 stays f16 for q8_0).
Refused, with the reason: DoRA adapters (llama.cpp applies plain LoRA only) and an lm_head
target on a base that ties it to the embeddings (the base GGUF has no output.weight to adapt).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import gguf
import numpy as np
import torch
from engine.cli import run_cli
from engine.export.adapter import read_adapter_config
from engine.export.gguf import written_in_place
from engine.export.gguf_arch import family_of, gguf_tensor, GGUFExportError
from engine.export.stream_merge import adapter_tensors
from engine.model.build import _resolve


LORA_TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
              "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}


def _base_config(model_path: str):
    from transformers import AutoConfig


    directory, gguf_file = _resolve(model_path)
    return AutoConfig.from_pretrained(directory, gguf_file=gguf_file)


def _encode(tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType):
    data = tensor.float().numpy()
    if qtype == gguf.GGMLQuantizationType.F32:
        return data, None
    if qtype == gguf.GGMLQuantizationType.F16 or data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return data.astype(np.float16), None
    return gguf.quants.quantize(data, qtype), qtype


def export_lora_gguf(model_path: str, adapter_dir: str, out: str | Path, qtype: str = "f16") -> Path:
    """Write the adapter in `adapter_dir` (for the base at `model_path`) as a GGUF LoRA file."""

    if qtype not in LORA_TYPES:
        raise GGUFExportError(f"GGUF LoRA type must be one of {', '.join(LORA_TYPES)}, got {qtype!r}")
    cfg = read_adapter_config(adapter_dir)
    if cfg.get("use_dora"):
        raise GGUFExportError(f"{adapter_dir}: a DoRA adapter (use_dora: true) has no GGUF LoRA form: llama.cpp "
                              "applies plain LoRA only; merge it instead (engine.export.merge --gguf)")
    config = _base_config(model_path)
    family = family_of(config)
    r = int(cfg["r"])
    scaling = float(cfg["lora_alpha"]) / (math.sqrt(r) if cfg.get("use_rslora") else r)
    name_map = gguf.get_tensor_name_map(family.model_arch, config.num_hidden_layers)
    tensors = adapter_tensors(adapter_dir)
    if not tensors:
        raise GGUFExportError(f"{adapter_dir}: the adapter has no lora_A / lora_B tensors")
    out = Path(out)
    writer = gguf.GGUFWriter(str(out), arch=family.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, scaling * r)
    for module, t in sorted(tensors.items()):
        if "A" not in t or "B" not in t:
            raise GGUFExportError(f"{adapter_dir}: no lora_A / lora_B pair for {module!r}")
        if module.split(".")[-1] == "lm_head" and getattr(config, "tie_word_embeddings", False):
            raise GGUFExportError(f"{adapter_dir}: the adapter targets lm_head but the base ties it to the "
                                  "embeddings (its GGUF has no output.weight for llama.cpp to adapt); merge instead")
        name, b = gguf_tensor(family, config, name_map, f"{module}.weight", t["B"])
        for suffix, value in (("lora_a", t["A"]), ("lora_b", b)):
            data, raw = _encode(value, LORA_TYPES[qtype])
            writer.add_tensor(f"{name}.{suffix}", data, raw_dtype=raw)
    with written_in_place(writer, out) as partial:
        writer.write_header_to_file(partial)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    return out


def main(argv: list[str] | None = None) -> int:

    p = argparse.ArgumentParser(prog="python -m engine.export.gguf_lora",
                                description="Write a LoRA adapter as a GGUF LoRA file for llama.cpp's --lora.")
    p.add_argument("--model", default="default", help="the base: HF dir, .gguf file, or 'default'")
    p.add_argument("--adapter", required=True, help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="output .gguf file (must not exist)")
    p.add_argument("--type", choices=tuple(LORA_TYPES), default="f16")
    args = p.parse_args(argv)

    def body() -> None:
        if Path(args.out).exists():
            raise GGUFExportError(f"output file {args.out!r} exists; nothing is overwritten")
        path = export_lora_gguf(args.model, args.adapter, args.out, args.type)
        print(f"wrote {path} (GGUF LoRA, {args.type}); llama.cpp: llama-cli -m BASE.gguf --lora {path}")

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
