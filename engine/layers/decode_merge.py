"""LoRA merged for a rollout: each adapted linear decodes as one GEMM on a separate merged copy.

During a GRPO rollout the adapter does not change, yet every decode step would run each LoRA
layer as three ops and more (the base GEMM, x A^T, the addmm of B, their views): 7 projections x
30 layers of SmolLM2 is ~1,000 dispatcher trips per token. For the length of the rollout each
adapted layer instead gets a decode copy of its merged weight

    W' = W + s * B @ A              (DoRA: c * (W + s*B@A), c = m / ||W + s*B@A||_c, its merge)

computed once under no_grad in W's dtype, and its forward is F.linear(x, W', b). The original
weights are never written: leaving the block drops the copies, so W is bit for bit what it was
(nothing to unmerge, no rounding), and training after the rollout sees the same parameters.

Memory: one copy of every merged base weight while the rollout runs (for SmolLM2-135M with LoRA
on all linears, ~106M values = 424 MB fp32, 212 MB bf16); the memory planner counts it as the
rollout's `decode_weights` (engine/plan/grpo.py).

Left unmerged (their branch runs as in training), counted by reason in the report:
  - a 4-bit base (bitsandbytes Linear4bit): QLoRA keeps W in 4 bits and never merges into it;
    `dequantize_4bit=True` gives such a layer a 16-bit decode copy W_hat + s*B@A instead (what its
    forward computes, in the dtype it was quantized from, at 16-bit memory: the caller decides);
  - a layer whose adapter is switched off (`adapters_disabled`) or merged for good (`merge_lora`):
    its forward is already the base alone.
LoRA dropout is off in a rollout (eval mode), so merging loses nothing there.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from engine.layers.lora import LoRALinear, lora_modules
from engine.layers.quant import dequantize_weight, is_linear4bit


@dataclass
class DecodeMerge:
    """What `lora_merged_for_decode` merged (layers, bytes of decode copies) and what it left (reason -> count)."""

    layers: int = 0
    bytes: int = 0
    left: Counter = field(default_factory=Counter)

    def describe(self) -> str:
        line = f"rollout: LoRA merged for decoding in {self.layers} layers ({self.bytes / 2**20:.0f} MiB of decode copies)"
        if self.left:
            line += "; unmerged: " + ", ".join(f"{n} {why}" for why, n in sorted(self.left.items()))
        return line


def _left_unmerged(layer: LoRALinear, dequantize_4bit: bool) -> str | None:
    if layer.merged or layer.disabled:
        return "merged or switched off"
    if is_linear4bit(layer.base_layer) and not dequantize_4bit:
        return "4-bit base"
    return None


def decode_copy_bytes(model: nn.Module, dequantize_4bit: bool = False) -> int:
    """Bytes the decode copies of `lora_merged_for_decode` take (for the memory planner)."""
    total = 0
    for m in lora_modules(model).values():
        if _left_unmerged(m, dequantize_4bit) is None:
            total += m.in_features * m.out_features * _copy_dtype(m).itemsize
    return total


def _copy_dtype(layer: LoRALinear) -> torch.dtype:
    """W's dtype; for a 4-bit base the dtype it was quantized from (its compute dtype)."""
    weight = layer.base_layer.weight
    return weight.quant_state.dtype if is_linear4bit(layer.base_layer) else weight.dtype


def merged_weight(layer: LoRALinear) -> torch.Tensor:
    """What the layer's forward multiplies by, [out, in] in W's dtype (a 4-bit base: W_hat's):
    W + s*B@A summed in fp32 (plain fp32 LoRA as one addmm; otherwise the layer's own merge, DoRA's
    rescaled sum), or W alone where the adapter is switched off or already merged into W."""
    weight = dequantize_weight(layer.base_layer)                                  # [out, in]
    if layer.merged or layer.disabled:
        return weight
    if type(layer)._merged_weight is LoRALinear._merged_weight and weight.dtype == torch.float32:
        return torch.addmm(weight, layer.lora_B.weight, layer.lora_A.weight, alpha=layer.scaling)
    return layer._merged_weight(weight).to(weight.dtype)


def _merged_copy(layer: LoRALinear, layout: str) -> torch.Tensor:
    """`merged_weight` stored in `layout`: in_out is one transposing copy (PyTorch's blocked 2-D
    transpose: faster than an addmm reading W^T strided)."""
    merged = merged_weight(layer)
    return merged.t().contiguous().t() if layout == "in_out" else merged


LAYOUTS = ("out_in", "in_out")


@contextlib.contextmanager
def lora_merged_for_decode(model: nn.Module, dequantize_4bit: bool = False,
                           layout: str = "out_in") -> Iterator[DecodeMerge]:
    """Inside the block every mergeable LoRA layer of `model` computes F.linear(x, W + s*B@A, b) on
    a decode copy (see the module docstring); on leaving, the copies are dropped. Yields the report.

    `layout` (speed switch) is how a copy is stored: "out_in" as nn.Linear stores W ([out, in]
    contiguous), "in_out" transposed ([in, out] contiguous, handed to F.linear as its [out, in]
    view: the same values and the same call, but the GEMM reads B = W^T without a transpose). On a
    CPU with MKL the decode GEMMs ([rows, in] x W^T at a few rows) are 15-25% faster in_out
    (benchmarks/results/rollout_generation_*); a GPU's cuBLAS is at home with out_in."""
    if layout not in LAYOUTS:
        raise ValueError(f"decode copy layout must be one of {LAYOUTS}, got {layout!r}")
    report, merged = DecodeMerge(), []
    try:
        with torch.no_grad(), torch.autocast(next(model.parameters()).device.type, enabled=False):
            for m in lora_modules(model).values():
                why = _left_unmerged(m, dequantize_4bit)
                if why is not None:
                    report.left[why] += 1
                    continue
                m.decode_weight = _merged_copy(m, layout)                              # [out, in]
                merged.append(m)
                report.layers += 1
                report.bytes += m.decode_weight.numel() * m.decode_weight.element_size()
        yield report
    finally:
        for m in merged:
            m.decode_weight = None
