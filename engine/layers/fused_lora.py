"""LoRA projections with their own backward: q, k, v together, or any one linear (speed switch fused_blocks).

K projections that read the same input x [N, h] (q_proj, k_proj, v_proj; or o_proj alone), each

    Y_i = x W_i^T + b_i + s_i (x A_i^T) B_i^T            W_i [o_i, h] frozen, A_i [r_i, h], B_i [o_i, r_i]

as one `torch.autograd.Function` (Hu et al. 2021 for LoRA; the hand-written backward after Unsloth's
`fast_lora.py`, LoRA_QKV / LoRA_W):

    forward    xa = x (S A)^T                  [N, R]   one matmul for every member, S A = [s_1 A_1; ...]
               Y_i = x W_i^T (+ b_i);  Y_i += xa_i B_i^T     (addmm_, in place)
               saves x and xa only (the small [N, R] product; no [N, o_i] tensor)
    backward   dxa_i = dY_i B_i;  dB_i = dY_i^T xa_i;  d(SA) = dxa^T x;  dA_i = s_i d(SA)_i (fp32)
               dx = sum_i dY_i W_i + dxa (S A)       (mm then addmm_ chain: no add of [N, h] tensors)
               the frozen W_i get no gradient; 4-bit W_i are dequantized again here, not saved

Precision (the choice the issue asks to state): A and B stay fp32 parameters (the optimizer, the
checkpoints and the adapter files see fp32, as everywhere else in the engine); the Function computes
with compute-dtype copies of S A and B made once per optimizer step (`LoRAFactors`: remade when a
parameter's version counter moves, i.e. after the optimizer's in-place update, or when the dtype
changes), not once per call as autocast would (autocast's own weight cache skips tensors reached
inside a Function and is emptied on every autocast exit). Gradients come back in the compute dtype;
dA is scaled into fp32 by one multiply, dB is cast by autograd on its way to the fp32 parameter.
A frozen float W already in the compute dtype (the engine loads the base in it) is used as it is;
one in another dtype is cast once and kept (`base_weight`); a 4-bit W is dequantized once per
Function call (forward, and again in backward: never kept).

Who can take it: plain `LoRALinear` (not DoRA, whose forward needs W's row norms; no dropout, whose
mask the backward would have to keep) under autocast, or in fp32 without it (the reference path's
numerics: the branch in fp32). Anything else keeps `LoRALinear.forward` (`fusable`).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from engine.layers.lora import LoRALinear
from engine.layers.quant import dequantize_weight, is_linear4bit


def compute_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype a fused block computes in for input x: the autocast dtype under autocast, fp32 for
    an fp32 input without it; None where the reference path must run (a 16-bit input without
    autocast: there the reference computes the LoRA branch in fp32)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return torch.float32 if x.dtype == torch.float32 else None


def fusable(layer: nn.Module) -> bool:
    """A plain LoRA layer (no DoRA, no dropout) that is neither merged nor switched off."""
    return (type(layer) is LoRALinear and isinstance(layer.lora_dropout, nn.Identity)
            and not layer.merged and not layer.disabled)


class _ByTensor:
    """tensor -> value, by identity (tensors compare by value), dropped when the tensor is freed."""

    def __init__(self):
        self._items: dict[int, tuple] = {}

    def get(self, t: torch.Tensor):
        hit = self._items.get(id(t))
        return hit[1] if hit is not None and hit[0]() is t else None

    def put(self, t: torch.Tensor, value):
        key = id(t)
        self._items[key] = (weakref.ref(t, lambda _, key=key: self._items.pop(key, None)), value)
        return value


_CAST_WEIGHTS = _ByTensor()
"""frozen float weight -> (version, dtype, its copy in dtype): cast once, not per call"""


def base_weight(layer: LoRALinear, dtype: torch.dtype) -> torch.Tensor:
    """W [out, in] of the frozen base in `dtype`: a 4-bit W dequantized (per call: never kept),
    a float W as it is or its cached cast."""
    base = layer.base_layer
    if is_linear4bit(base):
        return dequantize_weight(base).to(dtype)
    weight = base.weight  # frozen (requires_grad False): used as it is, no detach op per call
    if weight.dtype == dtype:
        return weight
    hit = _CAST_WEIGHTS.get(base.weight)
    if hit is None or hit[0] != base.weight._version or hit[1] != dtype:
        hit = _CAST_WEIGHTS.put(base.weight, (base.weight._version, dtype, weight.detach().to(dtype)))
    return hit[2]


_TRANSPOSED = _ByTensor()
"""weight kept between calls -> its transpose (a view made once: a `t` op per call saved)"""


def transposed(weight: torch.Tensor, keep: bool) -> torch.Tensor:
    """weight.t(), remembered for a weight that lives on (`keep`: a frozen float W or its cached cast)."""
    if not keep:
        return weight.t()
    t = _TRANSPOSED.get(weight)
    if t is None:
        t = _TRANSPOSED.put(weight, weight.t())
    return t


def base_bias(layer: LoRALinear, dtype: torch.dtype) -> torch.Tensor | None:
    bias = layer.base_layer.bias
    return None if bias is None else bias.to(dtype)  # frozen; .to is free when the dtype matches


class LoRAFactors:
    """Compute-dtype copies of a group's LoRA factors, remade only when a parameter changed:

        a    [R, h]  S A = [s_1 A_1; s_2 A_2; ...]    a_t: its transpose (a view)
        b    [B_1, B_2, ...]  [o_i, r_i]              b_t: their transposes (views)
        scale [R, 1] fp32: s_i on member i's rows (dA = scale * d(SA), in fp32)
        sizes [r_i]: member i's rows in R."""

    def __init__(self, members: list[LoRALinear]):
        self.members = list(members)
        self.sizes = [m.r for m in self.members]
        self.keeps_weights = not any(is_linear4bit(m.base_layer) for m in self.members)  # 4-bit: W per call
        self._key = None

    def params(self) -> list[torch.Tensor]:
        """(A_1, B_1, A_2, B_2, ...): the fp32 parameters, inputs of the Function for autograd."""
        return [w for m in self.members for w in (m.lora_A.weight, m.lora_B.weight)]

    def get(self, dtype: torch.dtype) -> "LoRAFactors":
        params = self.params()
        key = (dtype, *(p._version for p in params), *(id(p) for p in params))
        if key != self._key:
            with torch.no_grad():
                self.a = torch.cat([m.lora_A.weight * m.scaling for m in self.members]).to(dtype)
                self.a_t = self.a.t()
                self.b = [m.lora_B.weight.to(dtype) for m in self.members]
                self.b_t = [b.t() for b in self.b]
                self.scale = torch.cat([torch.full((m.r, 1), float(m.scaling), device=self.a.device)
                                        for m in self.members])
            self._key = key
        return self

    def split(self, t: torch.Tensor, dim: int) -> list[torch.Tensor]:
        """t's members' parts along dim (R wide): one split op, not a slice per member."""
        return [t] if len(self.sizes) == 1 else t.split(self.sizes, dim)


def project(x: torch.Tensor, weights: list[torch.Tensor], biases: list, f: LoRAFactors):
    """Forward of K projections of x [N, h]: ([Y_i [N, o_i]], xa [N, R])."""
    xa = torch.mm(x, f.a_t)
    outs = []
    for w, b, b_t, xa_i in zip(weights, biases, f.b_t, f.split(xa, 1)):
        w_t = transposed(w, f.keeps_weights)
        y = torch.mm(x, w_t) if b is None else torch.addmm(b, x, w_t)
        outs.append(y.addmm_(xa_i, b_t))
    return outs, xa


def project_backward(x: torch.Tensor, xa: torch.Tensor, grads: list, weights: list, f: LoRAFactors,
                     want_x: bool):
    """Backward of `project`: (dx or None, [dA_1, dB_1, dA_2, dB_2, ...]); a None dY_i (an
    output nobody used) contributes nothing."""
    grads = [g if g is not None else torch.zeros(x.shape[0], b.shape[0], dtype=x.dtype, device=x.device)
             for g, b in zip(grads, f.b)]
    parts = [torch.mm(g, b) for g, b in zip(grads, f.b)]                 # dxa_i [N, r_i]
    dxa = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)       # [N, R]
    da = torch.mul(torch.mm(dxa.t(), x), f.scale)                       # [R, h], fp32 (scale is)
    out = []
    for g, xa_i, da_i in zip(grads, f.split(xa, 1), f.split(da, 0)):
        out += [da_i, torch.mm(g.t(), xa_i)]
    dx = None
    if want_x:
        dx = torch.mm(grads[0], weights[0])
        for g, w in zip(grads[1:], weights[1:]):
            dx.addmm_(g, w)
        dx.addmm_(dxa, f.a)
    return dx, out


class LoRAProjections(torch.autograd.Function):
    """apply(group, x [N, h], *params) -> (Y_1, ..., Y_K); see the module docstring."""

    @staticmethod
    def forward(ctx, group: "FusedProjections", x: torch.Tensor, *params):
        dtype = x.dtype
        f = group.factors.get(dtype)
        weights = [base_weight(m, dtype) for m in group.members]
        outs, xa = project(x, weights, [base_bias(m, dtype) for m in group.members], f)
        ctx.group, ctx.dtype = group, dtype
        ctx.save_for_backward(x, xa)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        x, xa = ctx.saved_tensors
        group = ctx.group
        f = group.factors.get(ctx.dtype)
        weights = [base_weight(m, ctx.dtype) for m in group.members] if ctx.needs_input_grad[1] else []
        dx, dparams = project_backward(x, xa, list(grads), weights, f, ctx.needs_input_grad[1])
        return (None, dx, *dparams)


class FusedProjections:
    """The hook a `LoRALinear` calls when it is a member (`LoRALinear.fused`): the members' outputs
    for one input, computed together by `LoRAProjections`.

    Members read the same input (q, k, v of an attention module) or there is one member. Inside the
    parent module's forward (between its pre- and post-hook) the first member called computes every
    member's output and the others take theirs, if they read that same tensor (identity); a member
    reading another tensor, or called outside the parent's forward, computes the group again on its
    input (correct, only slower). Nothing outlives the parent's call."""

    def __init__(self, members: list[LoRALinear]):
        self.members = list(members)
        self.index = {m: i for i, m in enumerate(self.members)}
        self.factors = LoRAFactors(self.members)
        self._x = self._outs = None

    def begin(self, *args) -> None:  # forward pre-hook and forward hook of the parent module
        self._x = self._outs = None

    end = begin

    def usable(self, x: torch.Tensor) -> bool:
        return compute_dtype(x) is not None and all(fusable(m) for m in self.members)

    def output(self, member: LoRALinear, x: torch.Tensor) -> torch.Tensor:
        if x is not self._x or self._outs is None:
            dtype = compute_dtype(x)
            flat = x.reshape(-1, x.shape[-1]).to(dtype)
            self._outs = LoRAProjections.apply(self, flat, *self.factors.params())
            self._x = x if len(self.members) > 1 else None  # one member: nothing to share
        out = self._outs[self.index[member]]
        if len(self.members) == 1:
            self._outs = None
        return out.view(*x.shape[:-1], out.shape[-1])
