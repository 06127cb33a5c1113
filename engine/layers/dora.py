"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv:2402.09353).

The adapted weight is split into a learned magnitude per output row and a direction:

    W' = m * (W + s*B A) / ||W + s*B A||_c          m: [out], ||.||_c: L2 norm of each row [out]
    y  = W' x + b

with m initialised to ||W||_c, so a fresh adapter (B = 0) computes W x + b. The row norm is
*detached* (the paper's section 4.3: treat it as a constant in backward), which saves the
backward pass through the norm and keeps training stable. Written the way PEFT computes it
(peft/tuners/lora/dora.py, DoraLinearLayer.forward), as a correction on top of the base output,
so the 4-bit base never has to be materialised inside the autograd graph:

    c = m / ||W + s*B A||_c                                            [out]
    y = (W x + b) + (c - 1) * (W x) + c * s * B A x
      = c * (W + s*B A) x + b

Why a subclass and not a branch in `LoRALinear.forward`: DoRA needs the base weight inside the
forward (its row norms) and a different merge; keeping that here leaves the plain LoRA forward
four lines long, and everything written for `LoRALinear` (injection, `lora_modules`, trainable
marking, `adapters_disabled`, merge) sees a DoRA layer as a LoRA layer with one more tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.lora import LoRALinear
from engine.layers.quant import dequantize_weight


class DoRALinear(LoRALinear):
    """y = c * (W + s*B A) dropout(x) + b, c = m / ||W + s*B A||_c (norm detached); m [out] fp32, trainable.

    `base_layer` is an nn.Linear (any float dtype) or a bitsandbytes Linear4bit: the row norms of
    a 4-bit weight are computed from its dequantized copy, made inside `weight_norm` under no_grad
    and freed when it returns (no float copy of W lives between forwards or in the graph).
    Dropout (training only) applies to the input of both terms that carry c, as in PEFT: then the
    base layer runs a second time on the dropped input.
    Parameters are saved like PEFT's: `<path>.lora_magnitude_vector` next to lora_A / lora_B.
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__(base_layer, r, alpha, dropout, use_rslora)
        # m = ||W + s*B A||_c with B = 0: the fresh layer computes the base output exactly.
        # (a base on the meta device, a skeleton checked for shapes only: a meta magnitude)
        self.lora_magnitude_vector = nn.Parameter(
            torch.empty(self.out_features, device="meta") if self.lora_A.weight.is_meta else self.weight_norm())
        self._merge_scale: torch.Tensor | None = None  # c at merge time (unmerge divides by it)

    def weight_norm(self) -> torch.Tensor:
        """||W + s*B A||_c: the L2 norm of each row, [out] fp32, detached (no grad)."""
        with torch.no_grad(), torch.autocast(self.lora_A.weight.device.type, enabled=False):
            # [out, in] fp32 temporaries, freed on return; for a 4-bit base: W_hat = dequantize(W)
            combined = dequantize_weight(self.base_layer).float() + self.delta_weight()
            return torch.linalg.norm(combined, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.decode_weight is not None:  # a rollout's merged copy (engine/layers/decode_merge.py)
            return super().forward(x)
        out = self.base_layer(x)                                        # W x + b   [..., out]
        if self.merged or self.disabled:
            return out
        if self.training and not isinstance(self.lora_dropout, nn.Identity):
            x = self.lora_dropout(x)
            base = self.base_layer(x)                                   # W drop(x) + b
        else:
            base = out
        if self.base_layer.bias is not None:
            base = base - self.base_layer.bias                          # W x (no bias)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.weight.dtype)                          # fp32 branch
        lora = self.lora_B(self.lora_A(x))                              # B A x   [..., out]
        c = self.lora_magnitude_vector / self.weight_norm()             # [out]; norm is a constant (sec. 4.3)
        update = (c - 1) * base + c * lora * self.scaling
        return out + update.to(out.dtype)

    # merge: W <- c * (W + s*B A). The norm is the one of the *unmerged* weight, as in forward.
    def merge(self, untie: bool = False) -> None:
        if not self.merged:
            self._merge_scale = (self.lora_magnitude_vector / self.weight_norm()).detach()
        super().merge(untie)

    def unmerge(self) -> None:
        super().unmerge()
        self._merge_scale = None

    def _merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        combined = weight.float() + self.delta_weight().detach()        # [out, in]
        c = self.lora_magnitude_vector.detach() / torch.linalg.norm(combined, dim=1)
        return c[:, None] * combined

    def _unmerged_weight(self, merged: torch.Tensor) -> torch.Tensor:
        if self._merge_scale is None:
            raise RuntimeError("DoRA unmerge: the merge-time scale is missing (was this layer merged by merge()?)")
        return merged.float() / self._merge_scale[:, None] - self.delta_weight().detach()

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"
