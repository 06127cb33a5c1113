"""bitsandbytes 4-bit weights (QLoRA, Dettmers et al. 2023, arXiv:2305.14314): every bnb detail lives here.

A weight W [out, in] is cut into blocks of 64 values; each block stores 4-bit codes into a
16-value table (NF4: quantiles of N(0, 1); FP4: a 4-bit float) and one absmax scale:
    W_hat[i] = table[code[i]] * absmax[block(i)]
Double quantization stores the fp32 absmax constants themselves in 8 bits (blocks of 256),
saving ~0.37 bit per weight. The matmul dequantizes W_hat to `compute_dtype` on the fly.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from bitsandbytes.nn import Linear4bit
# bitsandbytes (~50 MB resident once imported) is imported where a 4-bit layer is made or read:
# a model without one (a LoRA merge, a float run) never pays for it. No Linear4bit can exist
# before bitsandbytes.nn is imported, so the type checks look it up in sys.modules.


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize: quant_type nf4 | fp4, double_quant, and the dtype of the matmul."""
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: torch.dtype = torch.float32

    def __post_init__(self):
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type must be nf4 or fp4, got {self.quant_type!r}")


def is_linear4bit(module: nn.Module) -> bool:
    bnb_nn = sys.modules.get("bitsandbytes.nn")
    return bnb_nn is not None and isinstance(module, bnb_nn.Linear4bit)


def logical_numel(param: torch.Tensor) -> int:
    """Elements the tensor stands for: out*in for a quantized 4-bit weight (its storage holds
    out*in/2 packed bytes), numel() otherwise."""
    bnb_nn = sys.modules.get("bitsandbytes.nn")
    if bnb_nn is not None and isinstance(param, bnb_nn.Params4bit) and param.bnb_quantized \
            and param.quant_state is not None:
        return int(torch.Size(param.quant_state.shape).numel())
    return param.numel()


def empty_linear4bit(in_features: int, out_features: int, bias: bool, spec: QuantSpec) -> Linear4bit:
    """A Linear4bit with its weight and bias on the meta device, waiting for `set_4bit_weight`."""
    from bitsandbytes.nn import Linear4bit

    module = Linear4bit(in_features, out_features, bias=bias, compute_dtype=spec.compute_dtype,
                        compress_statistics=spec.double_quant, quant_type=spec.quant_type, device="meta")
    # bitsandbytes repacks the weight (with bf16 scales) on the first no-grad eval forward on CPUs
    # with AVX512-BF16: that changes the numbers, and undoing it (to save) re-quantizes the
    # double-quant constants. Keep one storage format everywhere.
    module.support_avx512bf16_for_cpu = False
    if bias:
        module.bias.requires_grad_(False)
    return module


def swap_in_empty_linear4bit(model: nn.Module, names: list[str], spec: QuantSpec) -> None:
    """Replace each named nn.Linear of `model` by an `empty_linear4bit` of the same shape (weights
    then arrive through `set_4bit_weight`, quantized as they are read)."""
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, leaf)
        setattr(parent, leaf, empty_linear4bit(linear.in_features, linear.out_features,
                                               linear.bias is not None, spec))


def set_4bit_weight(module: Linear4bit, weight: torch.Tensor, device: torch.device | str) -> None:
    """Quantize a float weight [out, in] on `device` (the GPU when there is one) into `module`."""
    if tuple(weight.shape) != (module.out_features, module.in_features):
        raise ValueError(f"4-bit weight shape {tuple(weight.shape)} != ({module.out_features}, {module.in_features})")
    from bitsandbytes.nn import Params4bit

    param = Params4bit(weight.detach(), requires_grad=False, compress_statistics=module.weight.compress_statistics,
                       quant_type=module.weight.quant_type, quant_storage=module.quant_storage, module=module)
    module.weight = param._quantize(torch.device(device))


def quantize_linear(linear: nn.Linear, spec: QuantSpec, device: torch.device | str | None = None) -> Linear4bit:
    """A frozen Linear4bit holding `linear`'s weight quantized (and its bias, kept in float)."""
    device = torch.device(device) if device is not None else linear.weight.device
    module = empty_linear4bit(linear.in_features, linear.out_features, linear.bias is not None, spec)
    set_4bit_weight(module, linear.weight.data, device)
    if linear.bias is not None:
        module.bias = nn.Parameter(linear.bias.detach().to(device), requires_grad=False)
    return module


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The float weight [out, in] the layer computes with: W_hat for a Linear4bit (in the dtype
    it was quantized from), W itself for an nn.Linear."""
    if not is_linear4bit(module):
        return module.weight.detach()
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    weight = module.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):  # repacked by a bnb CPU forward
        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)


def quantize_module_linears(model: nn.Module, names: list[str], spec: QuantSpec,
                            device: torch.device | str | None = None) -> None:
    """Replace each named float nn.Linear of `model` by its Linear4bit (already-loaded models, e.g. GGUF)."""
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, quantize_linear(getattr(parent, leaf), spec, device))
