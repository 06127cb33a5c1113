"""The gated MLP with LoRA on its three projections as one autograd Function (speed switch fused_blocks).

    y = down( act(gate(x)) * up(x) )          every projection  P(z) = z W^T + b + s (z A^T) B^T

(Llama, Mistral, Qwen2/3, Gemma's gelu-tanh, Mixtral's and Qwen2-MoE's shared MLPs where LoRA'd;
Phi-3 computes gate and up as one `gate_up_proj` and splits its output). After Unsloth's `LoRA_MLP`
(unsloth/kernels/fast_lora.py):

    forward    gu = project(x; gate, up)            stacked [gate | up], 3 GEMMs (engine/layers/fused_lora.py)
               h = act(g) * u;  y = project(h; down)
               saves x, xa [N, 2r], [g | u], ha [N, r]  (not act(g) nor h: two [N, I] tensors fewer than
               autograd keeps; backward remakes them, two elementwise ops)
    backward   dh = dy W_d + (dy B_d) (S A_d)   and the down factors' gradients
               du = dh * act(g);  dg = act'(g) * (dh * u)   (one fused activation-backward op)
               dx = dg W_g + du W_u + (dxa) (S A_gu)       and the gate / up factors' gradients

Same math as the module's own forward (tests/layers/test_fused_blocks.py: values and gradients).
The activation is recognised by what it computes (`activation_of`), not by its class name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.fused_lora import BaseWeights, LoRAFactors, compute_dtype, fusable, project, project_backward

ACTIVATIONS = {
    "silu": (F.silu, lambda g, z: torch.ops.aten.silu_backward(g, z)),
    "gelu_tanh": (lambda z: F.gelu(z, approximate="tanh"), lambda g, z: torch.ops.aten.gelu_backward(g, z, approximate="tanh")),
    "gelu": (F.gelu, lambda g, z: torch.ops.aten.gelu_backward(g, z)),
}


def activation_of(fn) -> str | None:
    """The ACTIVATIONS name whose values `fn` reproduces on a probe (fp32), or None."""
    probe = torch.linspace(-6.0, 6.0, 97)
    with torch.no_grad():
        try:
            got = fn(probe)
        except Exception:  # noqa: BLE001 (a module that cannot run on a CPU probe: not ours to fuse)
            return None
        for name, (act, _) in ACTIVATIONS.items():
            if isinstance(got, torch.Tensor) and got.shape == probe.shape and torch.allclose(got, act(probe), atol=1e-6):
                return name
    return None


class GatedMLPParts:
    """What the Function needs of one MLP module: the upper projections (gate, up; or gate_up),
    down, the activation; factors cached per optimizer step (LoRAFactors)."""

    def __init__(self, upper: list, down, activation: str):
        self.upper, self.down, self.activation = list(upper), down, activation
        self.upper_factors, self.down_factors = LoRAFactors(self.upper), LoRAFactors([down])
        self.upper_base, self.down_base = BaseWeights(self.upper), BaseWeights([down])

    def usable(self, x: torch.Tensor) -> bool:
        return compute_dtype(x) is not None and all(fusable(m) for m in (*self.upper, self.down))

    def params(self) -> list[torch.Tensor]:
        return self.upper_factors.params() + self.down_factors.params()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(compute_dtype(x))
        return LoRAGatedMLP.apply(self, flat, *self.params()).view(*x.shape[:-1], -1)


class LoRAGatedMLP(torch.autograd.Function):
    """apply(parts, x [N, h], *params) -> y [N, h]; see the module docstring."""

    @staticmethod
    def forward(ctx, parts: GatedMLPParts, x: torch.Tensor, *params):
        dtype = x.dtype
        _, w_t, bias = parts.upper_base.get(dtype)
        gu, xa = project(x, w_t, bias, parts.upper_factors.get(dtype))       # [N, 2I]: [gate | up]
        g, u = gu.chunk(2, dim=-1)
        h = ACTIVATIONS[parts.activation][0](g).mul_(u)                      # [N, I]
        _, w_t, bias = parts.down_base.get(dtype)
        y, ha = project(h, w_t, bias, parts.down_factors.get(dtype))
        ctx.parts = parts
        ctx.save_for_backward(x, xa, gu, ha)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, xa, gu, ha = ctx.saved_tensors
        parts, dtype = ctx.parts, x.dtype
        g, u = gu.chunk(2, dim=-1)
        act, act_backward = ACTIVATIONS[parts.activation]
        a = act(g)
        dh, d_down = project_backward(a * u, ha, dy, parts.down_base.get(dtype)[0],   # h = act(g) * u, remade
                                      parts.down_factors.get(dtype))
        du = dh * a
        dgu = torch.cat([act_backward(dh.mul_(u), g), du], dim=1)           # [N, 2I]
        w = parts.upper_base.get(dtype)[0] if ctx.needs_input_grad[1] else None
        dx, d_upper = project_backward(x, xa, dgu, w, parts.upper_factors.get(dtype))
        return (None, dx, *d_upper, *d_down)


class FusedMLPForward:
    """A gated MLP module's `forward` replaced by `LoRAGatedMLP` (installed by
    engine.model.fused_blocks); where the parts cannot take it now (an adapter merged or switched off,
    a 16-bit input without autocast) the module's own forward runs."""

    runs_in_tiles = True  # tiling (engine/model/tiling.py) may run it per tile

    def __init__(self, module: nn.Module, parts: GatedMLPParts):
        self.module, self.parts = module, parts

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs or not self.parts.usable(x):
            return type(self.module).forward(self.module, x, *args, **kwargs)
        return self.parts(x)
