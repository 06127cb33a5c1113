"""Rotary position embedding with its own backward (speed switch fused_blocks): 3 ops per tensor each way.

transformers' `apply_rotary_pos_emb` (Su et al. 2021, RoFormer, in the half-split layout):

    out = x * cos + rotate_half(x) * sin,      rotate_half(x) = [-x2, x1]      x [B, H, T, D], x1 | x2 halves

is eight ops per tensor forward (two slices, a negation, a concatenation, two multiplies, an add, and
cos / sin unsqueezed) and as many again backward. The same value, for any cos and sin:

    rotate_half(x) * sin = roll(x, D/2) * sin_signed,      sin_signed = [-sin_1, sin_2]
    out = addcmul(x * cos, roll(x, D/2), sin_signed)                       (3 ops)
    dx  = addcmul(dout * cos, roll(dout * sin_signed, D/2))                 (3 ops: roll by D/2 is its own inverse)

sin_signed and the unsqueezed cos are made once per forward (every layer gets the same cos / sin
tensors from the model's rotary module: `_SIGNED` remembers the last pair). Saved for backward: cos
and sin_signed only (autograd keeps x's rotations too).

The swap: the family's modeling module gets `rope_switch(original)` in place of its
`apply_rotary_pos_emb`; the switch runs this Function only inside the forward of an attention
module engine.model.fused_blocks marked (a pre / post hook pair), so other models in the process
(a baseline, a reference) keep transformers' function. Partial rotary (cos narrower than x: Phi,
GPT-NeoX, StableLM) and any call the probe did not match take the original.
"""

from __future__ import annotations

import sys

import torch


class RoPEFunction(torch.autograd.Function):
    """apply(q, k, cos, sin_signed) -> (q_rot, k_rot); cos / sin_signed broadcast against q, k."""

    @staticmethod
    def forward(ctx, q, k, cos, sin_signed):
        half = q.shape[-1] // 2
        ctx.save_for_backward(cos, sin_signed)
        return tuple(torch.addcmul(x * cos, x.roll(half, -1), sin_signed) for x in (q, k))

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin_signed = ctx.saved_tensors
        half = cos.shape[-1] // 2
        grads = [None if g is None else torch.addcmul((g * sin_signed).roll(half, -1), g, cos) for g in (dq, dk)]
        return grads[0], grads[1], None, None


_SIGNED: list = [None, None, None, None]  # [cos, sin, cos unsqueezed, sin_signed unsqueezed] of the last call


def fused_rotary(q, k, cos, sin, unsqueeze_dim: int = 1):
    """transformers' apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim) through `RoPEFunction`."""
    if _SIGNED[0] is not cos or _SIGNED[1] is not sin:
        half = sin.shape[-1] // 2
        signed = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        _SIGNED[:] = [cos, sin, cos.unsqueeze(unsqueeze_dim), signed.unsqueeze(unsqueeze_dim)]
    cos_u, sin_u = _SIGNED[2], _SIGNED[3]
    if cos_u.dim() != q.dim() or cos_u.shape[unsqueeze_dim] != 1:  # another unsqueeze_dim than the cache's
        _SIGNED[0] = None
        return fused_rotary(q, k, cos, sin, unsqueeze_dim)
    return RoPEFunction.apply(q, k, cos_u, sin_u)


class RopeSwitch:
    """Stands in for a modeling module's `apply_rotary_pos_emb`: the fused version inside a marked
    attention module's forward (`enter` / `exit` hooks), the original everywhere else."""

    def __init__(self, original):
        self.original = original
        self.depth = 0

    def enter(self, *args) -> None:
        self.depth += 1

    def exit(self, *args) -> None:
        self.depth = max(0, self.depth - 1)

    def __call__(self, q, k, cos, sin, *args, **kwargs):
        if (self.depth and not args and set(kwargs) <= {"unsqueeze_dim"} and cos.shape[-1] == q.shape[-1]
                and q.shape[-1] % 2 == 0 and k.shape[-1] == q.shape[-1]):
            return fused_rotary(q, k, cos, sin, **kwargs)
        return self.original(q, k, cos, sin, *args, **kwargs)


def _matches(original) -> bool:
    """Does the family's function compute the half-split rotation (checked on a random probe)?"""
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 5, 8, generator=gen), torch.randn(1, 1, 5, 8, generator=gen)
    cos, sin = torch.randn(1, 5, 8, generator=gen), torch.randn(1, 5, 8, generator=gen)
    try:
        want = original(q, k, cos, sin)
    except Exception:  # noqa: BLE001 (another signature: not ours to replace)
        return False
    _SIGNED[0] = None
    got = fused_rotary(q, k, cos, sin)
    _SIGNED[0] = None
    return all(torch.allclose(w, g, atol=1e-5) for w, g in zip(want, got))


def rope_switch_for(attention: torch.nn.Module) -> RopeSwitch | None:
    """The `RopeSwitch` of the module that defines `attention`'s class (installed on first use),
    or None where that module has no `apply_rotary_pos_emb` of the half-split form."""
    module = sys.modules.get(type(attention).__module__)
    current = getattr(module, "apply_rotary_pos_emb", None)
    if isinstance(current, RopeSwitch):
        return current
    if current is None or not _matches(current):
        return None
    switch = RopeSwitch(current)
    module.apply_rotary_pos_emb = switch
    return switch
