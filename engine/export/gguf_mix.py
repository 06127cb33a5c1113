"""Which ggml type each tensor of a GGUF gets, per file type ("mix"), as llama.cpp's quantizer decides.

A mix such as Q4_K_M is not one type: llama.cpp's `llama_tensor_get_type` (src/llama-quant.cpp,
the version llama-cpp-python 0.3.36 vendors) starts from the mix's default type and moves some
tensors up. For the mixes offered here, without an importance matrix, on dense models:

  tensor                         q4_k_m          q4_k_s            q5_k_m          q5_k_s / q6_k / q4_0 / q8_0
  output.weight (tied: token_embd)  Q6_K          Q6_K              Q6_K            Q6_K (q8_0: Q8_0)
  attn_v / attn_qkv, layer i     Q6_K if more(i)  Q5_K if i < 4    Q6_K if more(i)  default
  ffn_down, layer i              Q6_K if more(i)  Q5_K if i < n/8   Q6_K if more(i)  default
  any other 2-D weight           default (Q4_K / Q4_K / Q5_K / Q5_K, Q6_K, Q4_0, Q8_0)

  more(i) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2      (use_more_bits; n = layer count)
  70B Llama / Qwen2 (80 layers): attn_v Q4_K -> Q5_K.

The output head becomes Q8_0 instead of Q6_K when its rows are not a multiple of the default type's
block (256 for K-quants). Then any tensor whose row length is not a multiple of its type's block falls
back: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0 (32-blocks), and to F16 if even 32 does not divide
it (SmolLM2's 576-wide rows: 2.25 super-blocks, so its K-quant files are mostly Q5_0 / Q5_1 / Q8_0).
1-D tensors (norms, biases) stay F32. The counters i follow llama.cpp's tensor order (by layer, then name).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import gguf

T = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType


@dataclass(frozen=True)
class Mix:
    name: str
    default: T
    file_type: FT                 # general.file_type


MIXES = {m.name: m for m in (
    Mix("f16", T.F16, FT.MOSTLY_F16),
    Mix("bf16", T.BF16, FT.MOSTLY_BF16),
    Mix("q8_0", T.Q8_0, FT.MOSTLY_Q8_0),
    Mix("q4_0", T.Q4_0, FT.MOSTLY_Q4_0),
    Mix("q4_k_s", T.Q4_K, FT.MOSTLY_Q4_K_S),
    Mix("q4_k_m", T.Q4_K, FT.MOSTLY_Q4_K_M),
    Mix("q5_k_s", T.Q5_K, FT.MOSTLY_Q5_K_S),
    Mix("q5_k_m", T.Q5_K, FT.MOSTLY_Q5_K_M),
    Mix("q6_k", T.Q6_K, FT.MOSTLY_Q6_K),
)}
FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
_LAYER = re.compile(r"blk\.(\d+)\.")


@dataclass(frozen=True)
class ModelShape:
    """What the choice reads from the model: general.architecture and the layer and head counts."""
    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int


def block_size(ggml_type: T) -> int:
    return gguf.GGML_QUANT_SIZES[ggml_type][0]


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _llama_order(name: str) -> tuple[int, str]:
    """llama_model_loader's weight_name_comparer: layer number (-1 outside blocks), then name."""
    layer = _LAYER.match(name)
    return (int(layer.group(1)) if layer else -1, name)


def _is_attn_v(name: str) -> bool:
    return "attn_v.weight" in name or "attn_qkv.weight" in name or "attn_kv_b.weight" in name


def _quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """tensor_allows_quantization for the families the engine writes."""
    return len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name


def _fallback(ggml_type: T, row: int) -> T:
    """tensor_type_fallback: a type whose block does not divide the row length."""
    if row % block_size(ggml_type) == 0:
        return ggml_type
    ggml_type = FALLBACK.get(ggml_type, ggml_type)
    return ggml_type if row % block_size(ggml_type) == 0 else T.F16


def _k_mix_type(mix: str, default: T, name: str, row: int, model: ModelShape, tied: bool,
                counters: dict[str, int]) -> T:
    """llama_tensor_get_type_impl's branches that reach these mixes on dense models."""
    is_output = name == "output.weight" or (tied and name == "token_embd.weight")
    if is_output:
        if row % block_size(default) != 0:
            return T.Q8_0
        return default if default == T.Q8_0 else T.Q6_K
    if _is_attn_v(name):
        i, n = counters["attn_v"], counters["n_attn_v"]
        counters["attn_v"] += 1
        chosen = default
        if mix in ("q4_k_m", "q5_k_m") and use_more_bits(i, n):
            chosen = T.Q6_K
        elif mix == "q4_k_s" and i < 4:
            chosen = T.Q5_K
        is_70b = model.n_layer == 80 and (model.arch == "qwen2" or (model.arch == "llama"
                                                                      and model.n_head != model.n_head_kv))
        if is_70b and chosen in (T.Q3_K, T.Q4_K):
            chosen = T.Q5_K
        return chosen
    if "ffn_down" in name:
        i, n = counters["ffn_down"], model.n_layer
        counters["ffn_down"] += 1
        if mix in ("q4_k_m", "q5_k_m") and use_more_bits(i, n):
            return T.Q6_K
        if mix == "q4_k_s" and i < n // 8:
            return T.Q5_K
    return default


def choose_types(mix: str, tensors: list[tuple[str, tuple[int, ...]]], model: ModelShape) -> dict[str, T]:
    """{GGUF name: ggml type} for `tensors` [(GGUF name, torch shape)] written as file type `mix`."""
    default = MIXES[mix].default
    names = [name for name, _ in tensors]
    tied = "output.weight" not in names
    counters = {"attn_v": 0, "ffn_down": 0, "n_attn_v": sum(map(_is_attn_v, names))}
    shapes = dict(tensors)
    types = {}
    for name in sorted(names, key=_llama_order):
        shape = shapes[name]
        row = shape[-1]  # ggml's ne[0]
        if len(shape) < 2:
            types[name] = T.F32
        elif mix in ("f16", "bf16") or not _quantizable(name, shape):
            types[name] = default if mix in ("f16", "bf16") else T.F16
        else:
            types[name] = _fallback(_k_mix_type(mix, default, name, row, model, tied, counters), row)
    return types
