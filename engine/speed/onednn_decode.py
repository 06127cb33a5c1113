"""oneDNN's blocked layout for the lean decode step's copies (speed switch rollout_merge=onednn, CPU).

A GRPO rollout's decode step multiplies a few rows by every weight (engine/model/lean_decode.py).
MKL's sgemm packs W into its panel format inside every call, which at a few rows costs about as
much as the multiply; oneDNN's linear reads a weight reordered once into its own blocked layout:

    pack        mkldnn._reorder_linear_weight(W [out, in], rows)      once per rollout (an opaque
                                                                      mkldnn tensor, W's size)
    linear      mkldnn._linear_pointwise(x, packed, bias)             x [N, in] -> [N, out]
    linear_add  mkldnn._linear_pointwise.binary(x, residual, packed, "add")   residual + x W^T in one call

The same values as x @ W^T up to summation order; `rows` only tunes the reorder (any row count
runs). fp32 and bf16 (the CPU's rollout dtypes); another dtype keeps the core's [in, out] copy.
Measured (`python benchmarks/rollout_generation.py --threads 1 --configs engine,engine_in_out,...`,
SmolLM2-135M fp32, 8-16 rows): 11-15% less time per rollout than the in_out copies.
"""

from __future__ import annotations

import torch

from engine.model.lean_decode import PACKED_LAYOUTS

NAME = "onednn"


class OneDNNLinear:
    """The `PackedLinear` of the "onednn" layout (see the module docstring)."""

    dtypes = (torch.float32, torch.bfloat16)

    def pack(self, weight: torch.Tensor, rows: int) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(weight, rows)

    def linear(self, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    def linear_add(self, x: torch.Tensor, residual: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, packed, None, "add")


def available(device: torch.device) -> bool:
    """Does this run's device take the layout (a CPU whose torch has oneDNN)?"""
    return device.type == "cpu" and torch.backends.mkldnn.is_available()


PACKED_LAYOUTS[NAME] = OneDNNLinear()
