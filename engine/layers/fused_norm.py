"""RMSNorm with its own backward (speed switch fused_blocks): fewer ops each way, two tensors saved.

    y = w * (x / rms(x)).to(dtype)              "scale"  (Llama, Mistral, Qwen2/3, Phi-3, Mixtral, ...)
    y = ((x / rms(x)) * (1 + w)).to(dtype)      "offset" (Gemma 1/2/3: the weight is stored minus one)
    rms(x) = sqrt(mean(x^2) + eps) over the last dimension, in fp32     (Zhang & Sennrich 2019)

Backward with w frozen (LoRA never trains the norms), n = x / rms(x), g = dy * w (or dy * (1 + w)):

    dx = (g - n * mean(g * n)) / rms(x)

Saves x (in its own dtype) and 1 / rms(x) [..., 1]; autograd's version keeps fp32 copies and makes
about twice the ops. Which form a module computes is recognised by running it once on a probe with
its own weight (`form_of`), not from its class name; a module that matches neither, or whose weight
is trainable, keeps its forward.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn


class RMSNormFunction(torch.autograd.Function):
    """apply(x, weight, eps, offset) -> y; see the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, eps: float, offset: bool):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))          # [..., 1] fp32
        n = xf * rstd
        y = (n * (weight.float() + 1.0)).to(x.dtype) if offset else weight * n.to(x.dtype)
        ctx.offset = offset
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        g = dy.float() * (weight.float() + 1.0) if ctx.offset else (dy * weight).float()
        n = x.float() * rstd
        dx = (g - n * (g * n).mean(-1, keepdim=True)).mul_(rstd)
        return dx.to(x.dtype), None, None, None


def _eps(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def form_of(module: nn.Module) -> str | None:
    """"scale" or "offset" where the module's forward computes that form (checked in fp32 on a
    probe, with its own weight and eps), else None."""
    weight, eps = getattr(module, "weight", None), _eps(module)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or eps is None:
        return None
    probe = torch.randn(3, weight.shape[0], generator=torch.Generator().manual_seed(0)).to(weight.device)
    with torch.no_grad():
        try:
            got = type(module).forward(module, probe).float()
        except Exception:  # noqa: BLE001 (a norm that cannot run on a probe is left alone)
            return None
        for form, offset in (("scale", False), ("offset", True)):
            want = RMSNormFunction.apply(probe, weight.float(), eps, offset)
            if got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-5):
                return form
    return None


class FusedNormForward:
    """An RMSNorm module's `forward` replaced by `RMSNormFunction` (its trainable-weight case runs
    the module's own forward)."""

    runs_in_tiles = True  # tiling (engine/model/tiling.py) may run it per tile

    def __init__(self, module: nn.Module, offset: bool):
        self.module, self.offset, self.eps = module, offset, _eps(module)

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        weight = self.module.weight
        if args or kwargs or weight.requires_grad:
            return type(self.module).forward(self.module, x, *args, **kwargs)
        return RMSNormFunction.apply(x, weight, self.eps, self.offset)


def set_fused_norms(model: nn.Module, enabled: bool, left: Counter | None = None) -> int:
    """Swap `FusedNormForward` into every RMSNorm (a class named *RMSNorm) whose form is recognised,
    or take it out again; returns how many run it. Norms already swapped by something else (tiled,
    compiled) keep that; reasons for the rest go into `left`."""
    count = 0
    for module in model.modules():
        if not type(module).__name__.endswith("RMSNorm"):
            continue
        current = module.__dict__.get("forward")
        if isinstance(current, FusedNormForward):
            del module.forward
        elif isinstance(getattr(current, "inner", None), FusedNormForward):
            current.inner = None  # a tiled norm: its tiles run the class's forward again
        if not enabled:
            continue
        current = module.__dict__.get("forward")
        if current is not None and type(current).__name__ == "TiledForward" and current.inner is None:
            form = form_of(module)
            if form is not None:  # the tiles run the fused norm
                current.inner = FusedNormForward(module, form == "offset")
                count += 1
                continue
        if "forward" in module.__dict__:
            if left is not None:
                left["RMSNorms already tiled or compiled"] += 1
            continue
        form = form_of(module)
        if form is None:
            if left is not None:
                left["RMSNorms of another form"] += 1
            continue
        module.forward = FusedNormForward(module, form == "offset")
        count += 1
    return count
