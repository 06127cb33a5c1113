"""Fold a LoRA adapter into a safetensors checkpoint tensor by tensor, in bounded host memory.

    W_merged = W + s * B @ A                     s = alpha / r (alpha / sqrt(r) with rsLoRA)
    DoRA:      W_merged = m / ||W + s*B A||_c * (W + s*B A)      (row norms, m [out])

Every tensor of every input shard is read alone (seek + read of its bytes) and appended to an
output shard whose header was written first (engine/export/safetensors_io.py). A targeted weight
is merged in blocks of rows, ~4 MiB of fp32 each: W[rows] + s * B[rows] @ A (DoRA's norms are per
row too), cast to the output dtype and written; untouched tensors in the output dtype are copied
as raw bytes in 4 MiB chunks, others cast block by block. So peak memory is a few blocks plus the
adapter, whatever the checkpoint's or the largest tensor's size; nothing holds a shard. Two cases
take one whole tensor at a time: Conv1D targets and --from-dequantized weights (below).

Layout rules, as the in-memory merge (`merge_lora` + `linear_to_conv1d`):
  * Conv1D checkpoints (GPT-2) store W^T [in, out]: the delta is added transposed;
  * a targeted lm_head tied to the embeddings (absent from the checkpoint) is written as its own
    `lm_head.weight` = embeddings + delta, right after the embeddings, and the config untied;
  * --from-dequantized (QLoRA): every decoder linear's W becomes dequantize(quantize_4bit(W))
    (what training saw, bitsandbytes on the CPU), targeted or not, before the delta is added.
Checkpoints this cannot stream (GGUF, .bin, weights transformers fuses on load, pre-quantized)
are reported by `stream_refusal` and merged in memory by engine/export/merge.py instead.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from engine.export.adapter import _KEY, load_adapter, PREFIX, read_adapter_config, WEIGHTS_NAME
from engine.export.safetensors_io import StreamWriter, TensorInfo, read_header, read_rows, read_tensor, row_blocks
from engine.layers.quant import dequantize_weight, quantize_linear
from engine.model.build import (ModelLoadError, _checkpoint_names, _model_class, _slots, _weight_files,
                                conv1d_to_linear, decoder_linear_names, params_on_meta)


INDEX_NAME = "model.safetensors.index.json"
BLOCK_BYTES = 4 << 20  # fp32 bytes of one block of rows merged at a time
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class StreamMergeError(ValueError):
    """The checkpoint or adapter cannot be merged as asked; the message names the file and tensor."""


def parse_size(size: str | int) -> int:
    """'2GB' -> 2e9, '30KB' -> 30e3, '1GiB' -> 2**30, 1000 -> 1000 (bytes)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", size, flags=re.IGNORECASE)
    if match is None:
        raise StreamMergeError(f"--max-shard-size {size!r}: expected a size like 500MB, 2GB or 1GiB")
    return int(float(match[1]) * _UNITS.get((match[2] or "B").upper(), 1))


def stream_refusal(directory: str) -> str | None:
    """Why the checkpoint in `directory` cannot be streamed (then merge in memory), or None."""
    config = json.loads(Path(directory, "config.json").read_text())
    if config.get("quantization_config"):
        return "its config.json has a quantization_config (a pre-quantized checkpoint)"
    if not (Path(directory, "model.safetensors").is_file() or Path(directory, INDEX_NAME).is_file()):
        return "it has no safetensors weights"
    return None


def _skeleton(directory: str, trust_remote_code: bool):
    """(config, the model on the meta device with Conv1D swapped for nn.Linear, conv1d module names)."""
    from transformers import AutoConfig


    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    auto_class = _model_class(config, directory, trust_remote_code)
    with params_on_meta():
        model = auto_class.from_config(config, trust_remote_code=trust_remote_code)
    return config, model, set(conv1d_to_linear(model))


def adapter_tensors(adapter_dir: str) -> dict[str, dict[str, torch.Tensor]]:
    """module path -> {"A", "B"[, "m"]} from adapter_model.safetensors (PEFT key forms)."""
    from safetensors.torch import load_file


    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(os.path.join(adapter_dir, WEIGHTS_NAME)).items():
        match = _KEY.fullmatch(key.removeprefix(PREFIX))
        if match is None:
            continue  # a base weight PEFT saved alongside (load_adapter checked it is unchanged)
        slot = {"lora_A": "A", "lora_B": "B"}.get(match["which"], "m")
        out.setdefault(match["module"], {})[slot] = tensor.float()
    return out


def _dequantized(weight: torch.Tensor, spec) -> torch.Tensor:
    """dequantize(quantize_4bit(W)) in fp32: the weight a QLoRA adapter was trained on."""
    from torch import nn


    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight = nn.Parameter(weight.float(), requires_grad=False)
    return dequantize_weight(quantize_linear(linear, spec, "cpu")).float()


def checkpoint_dtype(infos: dict[str, TensorInfo]) -> torch.dtype:
    """The float dtype holding most of the checkpoint's bytes (what 'the base's dtype' means)."""
    totals: dict[torch.dtype, int] = {}
    for info in infos.values():
        if info.dtype.is_floating_point:
            totals[info.dtype] = totals.get(info.dtype, 0) + info.nbytes
    if not totals:
        raise StreamMergeError("the checkpoint has no floating-point tensors")
    return max(totals, key=totals.get)


def stream_merge(directory: str, adapter_dir: str, out: Path, *, dtype: torch.dtype | None,
                 max_shard_size: str | int = "2GB", dequantize_spec=None, trust_remote_code: bool = False) -> dict:
    """Write the merged checkpoint's safetensors (+ index when sharded) and config.json into `out`.

    dtype: output dtype of the float tensors; None = the checkpoint's own (`checkpoint_dtype`).
    dequantize_spec: a QuantSpec for --from-dequantized, else None. Returns {"dtype", "files",
    "tensors", "merged", "untied"} for the report."""

    config, model, conv1d = _skeleton(directory, trust_remote_code)
    files = _weight_files(directory, allow_bin=False)
    slots = _slots(model)
    to_name = _checkpoint_names(model, slots)  # raises NeedsConversion for fused-on-load weights
    sources: list[tuple[str, str, str, TensorInfo]] = []  # (file, key, parameter name, info)
    for file in files:
        for key, info in read_header(file).items():
            name = to_name(key)
            if name not in slots:
                raise ModelLoadError(f"{file}: unexpected tensor {key!r} (no such parameter in {type(model).__name__})")
            sources.append((file, key, name, info))
    tied = dict(getattr(model, "all_tied_weights_keys", {}) or {})
    decoder = set(decoder_linear_names(model)) if dequantize_spec is not None else set()  # before LoRA wraps them
    # names, shapes and the adapter's config are checked against the meta skeleton (no memory)
    load_adapter(model, adapter_dir)
    adapter = adapter_tensors(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    del model

    out_dtype = dtype or checkpoint_dtype({f"{f}:{k}": i for f, k, _, i in sources})
    present = {name for _, _, name, _ in sources}
    extra: dict[str, str] = {}  # source tensor (the embeddings) -> the tied lm_head written from it
    for module in adapter:
        weight = f"{module}.weight"
        if weight not in present:
            if weight in tied and tied[weight] in present:
                extra[tied[weight]] = weight
            else:
                raise StreamMergeError(f"{directory}: the adapter targets {module!r} but the checkpoint has no "
                                       f"tensor {weight!r}")

    # the output plan: (written name, parameter name, input file, info) in input order, cut into shards
    plan = []
    for file, key, name, info in sources:
        plan.append((key, name, file, info))
        if name in extra:
            plan.append((extra[name], extra[name], file, info))

    def out_dtype_of(info: TensorInfo) -> torch.dtype:
        return out_dtype if info.dtype.is_floating_point else info.dtype

    def nbytes(info: TensorInfo) -> int:
        return math.prod(info.shape) * torch.empty((), dtype=out_dtype_of(info)).element_size()

    limit = parse_size(max_shard_size)
    shards: list[list] = [[]]
    size = 0
    for item in plan:
        if shards[-1] and size + nbytes(item[3]) > limit:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes(item[3])
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])

    def merged_whole(module: str, raw: torch.Tensor) -> torch.Tensor:
        """Conv1D targets (stored W^T) and --from-dequantized weights (4-bit blocks and their
        double-quantized constants span the whole tensor): one tensor at a time."""
        w = raw.float()
        del raw
        if module in conv1d:
            w = w.t()
        if module in decoder:
            w = _dequantized(w, dequantize_spec)
        if module in adapter:
            t = adapter[module]  # load_adapter checked every module has its A and B (and m for DoRA)
            w.addmm_(t["B"], t["A"], alpha=scaling)                      # W + s * B @ A, in place
            if "m" in t:  # DoRA
                w.mul_((t["m"] / torch.linalg.norm(w, dim=1))[:, None])
        w = w.t() if module in conv1d else w
        return w.to(out_dtype).contiguous()

    def merged_blocks(module: str, src, info: TensorInfo):
        """Row blocks of W + s * B[rows] @ A (DoRA: each row rescaled by its own norm), ~4 MiB of fp32 each."""
        t = adapter.get(module)
        for start, stop in row_blocks(info.shape, BLOCK_BYTES):
            w = read_rows(src, info, start, stop).float()
            if t is not None:
                w.addmm_(t["B"][start:stop], t["A"], alpha=scaling)
                if "m" in t:
                    w.mul_((t["m"][start:stop] / torch.linalg.norm(w, dim=1))[:, None])
            yield w.to(out_dtype)

    index, merged_count = {}, 0
    total = 0
    handles: dict[str, object] = {}
    try:
        for shard_name, items in zip(names, shards):
            entries = [(written, out_dtype_of(info), info.shape) for written, _, _, info in items]
            with StreamWriter(out / shard_name, entries) as writer:
                for written, name, file, info in items:
                    if file not in handles:  # inputs are read in order: keep one open
                        for h in handles.values():
                            h.close()
                        handles = {file: open(file, "rb")}
                    src = handles[file]
                    module = name.removesuffix(".weight") if name.endswith(".weight") else None
                    if module in decoder or (module in adapter and module in conv1d):
                        writer.write(written, merged_whole(module, read_tensor(src, info)))
                    elif module in adapter or out_dtype_of(info) != info.dtype:
                        target = out_dtype_of(info)
                        blocks = (merged_blocks(module, src, info) if module in adapter else
                                  (read_rows(src, info, a, b).to(target) for a, b in row_blocks(info.shape, BLOCK_BYTES)))
                        writer.write_blocks(written, target, info.shape, blocks)
                    else:
                        writer.copy_from(written, src, info)
                    merged_count += module in adapter
                    index[written] = shard_name
                    total += nbytes(info)
    finally:
        for h in handles.values():
            h.close()
    if len(shards) > 1:
        (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2))
    config.dtype = out_dtype
    config.use_cache = True
    if any(f"{m}.weight" in tied for m in adapter):  # a merged tied lm_head differs from the embeddings
        config.tie_word_embeddings = False
        if hasattr(config, "get_text_config"):
            config.get_text_config().tie_word_embeddings = False
    config.save_pretrained(out)
    return {"dtype": out_dtype, "files": names, "tensors": len(index), "merged": merged_count,
            "untied": sorted(extra.values())}
