"""LoRA projections with their own backward: q, k, v together, or any one linear (speed switch fused_blocks).

K projections that read the same input x [N, h] (q_proj, k_proj, v_proj; or o_proj alone), each

    Y_i = x W_i^T + b_i + s_i (x A_i^T) B_i^T            W_i [o_i, h] frozen, A_i [r_i, h], B_i [o_i, r_i]

as one `torch.autograd.Function` over the stacked output Y = [Y_1 | Y_2 | ...] [N, O] (Hu et al. 2021
for LoRA; the hand-written backward after Unsloth's `fast_lora.py`, LoRA_QKV / LoRA_W):

    W  = [W_1; W_2; ...]  [O, h]      the frozen weights, stacked once at the swap: the members'
                                      own weights become views of it (no second copy)
    SA = [s_1 A_1; ...]   [R, h]      B_bd = diag(B_1, B_2, ...) [O, R] (block-diagonal)
    forward    xa = x SA^T  [N, R];   Y = x W^T (+ b);   Y += xa B_bd^T       three GEMMs for the group
               saves x and xa only (no [N, O] tensor)
    backward   dxa = dY B_bd;  dB_i = (dY^T xa)'s block i;  dA_i = s_i (dxa^T x)_i   (fp32)
               dx = dY W + dxa SA                                              four GEMMs, one addmm_
               the frozen W gets no gradient; a 4-bit W is dequantized again here, not saved

The block-diagonal B costs K times the LoRA-B FLOPs (R x O instead of sum r_i o_i: small beside
x W^T once h >> R) for one GEMM call instead of K each way; a GEMM call, not its FLOPs, is what a
host-bound step pays.

Precision (the choice the issue asks to state): A and B stay fp32 parameters (the optimizer, the
checkpoints and the adapter files see fp32, as everywhere else in the engine); the Function computes
with compute-dtype copies of SA and B_bd made once per optimizer step (`LoRAFactors`: remade after
every optimizer step — a global step hook counts them, since a fused AdamW leaves the version
counters alone —, when a parameter's version counter moves (copy_, load_state_dict), or when the
dtype changes), not once per call as autocast would (autocast's own weight cache skips tensors reached
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
    """A plain LoRA layer (no DoRA, no dropout) that is neither merged (for good or for a rollout's
    decode) nor switched off."""
    return (type(layer) is LoRALinear and isinstance(layer.lora_dropout, nn.Identity)
            and not layer.merged and not layer.disabled and layer.decode_weight is None)


_OPTIMIZER_STEPS = [0]
"""Optimizer steps taken in this process (a global post-hook on torch.optim.Optimizer.step). A fused
AdamW updates its parameters without moving their version counters, so the factor caches key on
this count as well as on the versions (which catch copy_ / mul_ / load_state_dict)."""
_HOOK = []


def _count_optimizer_steps() -> None:
    if not _HOOK:
        def counted(*args) -> None:
            _OPTIMIZER_STEPS[0] += 1
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _HOOK.append(register_optimizer_step_post_hook(counted))


def invalidate_factor_caches() -> None:
    """Make every `LoRAFactors` remake its compute-dtype copies at its next call, as after an
    optimizer step. A captured CUDA graph (engine/speed/cuda_graphs.py) calls this right before
    capture so the refresh is recorded in the graph and runs at every replay: a replay runs no
    Python, so a cache that was fresh at capture would otherwise never see a later optimizer step."""
    _OPTIMIZER_STEPS[0] += 1


def stack_base_weights(members: list[LoRALinear]) -> None:
    """Make the members' frozen float weights (and biases) views of one stacked tensor, so the group's
    base GEMM is one call without a second copy of W. 4-bit or mixed bases are left as they are."""
    bases = [m.base_layer for m in members]
    if len(bases) < 2 or any(is_linear4bit(b) for b in bases):
        return
    w0 = bases[0].weight
    if any(b.weight.dtype != w0.dtype or b.weight.device != w0.device for b in bases):
        return
    if stacked_weight(members) is not None:
        return  # already views of one tensor
    with torch.no_grad():
        for name in ("weight", "bias"):
            tensors = [getattr(b, name) for b in bases]
            if any(t is None for t in tensors):
                continue
            stacked = torch.cat([t.detach() for t in tensors])
            for b, view in zip(bases, stacked.split([t.shape[0] for t in tensors])):
                setattr(b, name, nn.Parameter(view, requires_grad=False))


def stacked_weight(members: list[LoRALinear], name: str = "weight") -> torch.Tensor | None:
    """The stacked tensor [O, ...] the members' float `name` tensors are consecutive views of, or None."""
    tensors = [getattr(m.base_layer, name) for m in members]
    if any(t is None or is_linear4bit(m.base_layer) for t, m in zip(tensors, members)):
        return None
    first = tensors[0]
    if len(tensors) == 1:
        return first
    offset, ptr = first.storage_offset(), first.untyped_storage().data_ptr()
    for t in tensors:
        if t.untyped_storage().data_ptr() != ptr or t.storage_offset() != offset or not t.is_contiguous():
            return None
        offset += t.numel()
    return first.as_strided((sum(t.shape[0] for t in tensors), *first.shape[1:]), first.stride(), first.storage_offset())


class BaseWeights:
    """The frozen part of a group: W [O, h] (and b [O]) in the compute dtype, with W^T as a view
    kept between calls. Float: the stacked tensor (`stack_base_weights`) or, where the weights were
    replaced since, their concatenation (per call); cast once per dtype where W is in another.
    4-bit: dequantized and concatenated per call, never kept."""

    def __init__(self, members: list[LoRALinear]):
        self.members = list(members)
        # fixed at the swap: a base layer replaced after it (quantized, say) needs set_fused_blocks again
        self.quantized = any(is_linear4bit(m.base_layer) for m in self.members)
        self._dicts = [m.base_layer._parameters for m in self.members]  # read per call, as LoRAFactors does
        self._key = None

    def get(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(W [O, h], W^T, b [O] or None)."""
        weights = [d["weight"] for d in self._dicts]
        if self.quantized:
            w = torch.cat([dequantize_weight(m.base_layer).to(dtype) for m in self.members])
            return w, w.t(), self._bias(dtype)
        key = (dtype, *(id(w) for w in weights), *(w._version for w in weights))
        if key != self._key:
            with torch.no_grad():
                w = stacked_weight(self.members)
                w = torch.cat(weights) if w is None else w
                self.w = w if w.dtype == dtype else w.to(dtype)
                self.w_t = self.w.t()
                self.b = self._bias(dtype)
            self._key = key
        return self.w, self.w_t, self.b

    def _bias(self, dtype):
        biases = [m.base_layer.bias for m in self.members]
        if all(b is None for b in biases):
            return None
        with torch.no_grad():
            full = [b if b is not None else torch.zeros(m.out_features, device=m.lora_A.weight.device)
                    for b, m in zip(biases, self.members)]
            return (full[0] if len(full) == 1 else torch.cat([b.to(dtype) for b in full])).to(dtype)


class LoRAFactors:
    """Compute-dtype copies of a group's LoRA factors, remade only when a parameter changed:

        a     [R, h]  SA = [s_1 A_1; s_2 A_2; ...]   a_t: its transpose (a view)
        b     [O, R]  B_bd = diag(B_1, B_2, ...)     b_t: its transpose (a view)
        scale [R, 1] fp32: s_i on member i's rows (dA = scale * d(SA), in fp32)
        sizes [r_i], out_sizes [o_i]: the members' rows in R and in O."""

    def __init__(self, members: list[LoRALinear]):
        self.members = list(members)
        self.sizes = [m.r for m in self.members]
        self.out_sizes = [m.out_features for m in self.members]
        self.scalings = [float(m.scaling) for m in self.members]
        # the members' LoRA parameter dicts, read per call: a replaced Parameter is seen, and no
        # Module.__getattr__ runs per call (four per member otherwise)
        self._dicts = [d for m in self.members for d in (m.lora_A._parameters, m.lora_B._parameters)]
        self._key = self.scale = self._buffers_dtype = None
        _count_optimizer_steps()

    def params(self) -> list[torch.Tensor]:
        """(A_1, B_1, A_2, B_2, ...): the fp32 parameters, inputs of the Function for autograd."""
        return [d["weight"] for d in self._dicts]

    def get(self, dtype: torch.dtype) -> "LoRAFactors":
        params = self.params()
        key = (dtype, _OPTIMIZER_STEPS[0], *[p._version for p in params], *map(id, params))
        if key != self._key:
            with torch.no_grad():
                self._refresh(params, dtype)
            self._key = key
        return self

    def _refresh(self, params: list[torch.Tensor], dtype: torch.dtype) -> None:
        """Write s_i A_i and B_i into the compute-dtype buffers in place: two foreach ops per group
        and optimizer step (the buffers, their per-member views and B_bd's zero blocks are made once
        per dtype), instead of a concatenation, a block_diag and two casts into new tensors."""
        device = params[0].device
        if self.scale is None:  # s_i per row of R: fixed by the members' r and alpha
            self.scale = torch.cat([torch.full((r, 1), s, device=device) for r, s in zip(self.sizes, self.scalings)])
        if self._buffers_dtype != dtype:
            self.a = torch.empty(sum(self.sizes), params[0].shape[1], dtype=dtype, device=device)
            self.b = torch.zeros(sum(self.out_sizes), sum(self.sizes), dtype=dtype, device=device)
            self.a_t, self.b_t = self.a.t(), self.b.t()
            rows, cols = [0], [0]
            for r, o in zip(self.sizes, self.out_sizes):
                rows.append(rows[-1] + r)
                cols.append(cols[-1] + o)
            self._views = ([self.a[rows[i]:rows[i + 1]] for i in range(len(self.sizes))]
                           + [self.b[cols[i]:cols[i + 1], rows[i]:rows[i + 1]] for i in range(len(self.sizes))])
            self._buffers_dtype = dtype
        scaled = torch._foreach_mul(params[0::2], self.scalings)  # fp32, rounded once
        torch._foreach_copy_(self._views, [*scaled, *params[1::2]])

    def lora_grads(self, db: torch.Tensor, da: torch.Tensor) -> list[torch.Tensor]:
        """[dA_1, dB_1, dA_2, dB_2, ...] from dA [R, h] and the full dY^T xa [O, R] (its diagonal blocks)."""
        if len(self.sizes) == 1:
            return [da, db]
        out = []
        start = 0
        for da_i, db_i, r in zip(da.split(self.sizes), db.split(self.out_sizes), self.sizes):
            out += [da_i, db_i[:, start:start + r]]
            start += r
        return out


def project(x: torch.Tensor, w_t: torch.Tensor, bias, f: LoRAFactors):
    """Forward of the stacked projections of x [N, h]: (Y [N, O], xa [N, R])."""
    xa = torch.mm(x, f.a_t)
    y = torch.mm(x, w_t) if bias is None else torch.addmm(bias, x, w_t)
    return y.addmm_(xa, f.b_t), xa


def project_backward(x: torch.Tensor, xa: torch.Tensor, dy: torch.Tensor, w: torch.Tensor | None, f: LoRAFactors):
    """Backward of `project`: (dx, or None without w; [dA_1, dB_1, ...])."""
    dxa = torch.mm(dy, f.b)                                              # [N, R]
    grads = f.lora_grads(torch.mm(dy.t(), xa),                            # [O, R]: dB_i on the diagonal
                         torch.mul(torch.mm(dxa.t(), x), f.scale))       # [R, h], fp32 (scale is)
    if w is None:
        return None, grads
    return torch.mm(dy, w).addmm_(dxa, f.a), grads


class LoRAProjections(torch.autograd.Function):
    """apply(group, x [N, h], *params) -> Y [N, O] (the members' outputs side by side)."""

    @staticmethod
    def forward(ctx, group: "FusedProjections", x: torch.Tensor, *params):
        dtype = x.dtype
        _, w_t, bias = group.base.get(dtype)
        y, xa = project(x, w_t, bias, group.factors.get(dtype))
        ctx.group = group
        ctx.save_for_backward(x, xa)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, xa = ctx.saved_tensors
        group, dtype = ctx.group, x.dtype
        w = group.base.get(dtype)[0] if ctx.needs_input_grad[1] else None
        dx, dparams = project_backward(x, xa, dy, w, group.factors.get(dtype))
        return (None, dx, *dparams)


class FusedProjections:
    """The hook a `LoRALinear` calls when it is a member (`LoRALinear.fused_group`): the members'
    outputs for one input, computed together by `LoRAProjections`.

    Members read the same input (q, k, v of an attention module) or there is one member. Inside the
    parent module's forward (between its pre- and post-hook) the first member called computes every
    member's output and the others take theirs, if they read that same tensor (identity); a member
    reading another tensor, or called outside the parent's forward, computes the group again on its
    input (correct, only slower). Nothing outlives the parent's call."""

    def __init__(self, members: list[LoRALinear]):
        self.members = list(members)
        self.index = {m: i for i, m in enumerate(self.members)}
        self.factors, self.base = LoRAFactors(self.members), BaseWeights(self.members)
        self._x = self._outs = None

    def begin(self, *args) -> None:  # forward pre-hook and forward hook of the parent module
        self._x = self._outs = None

    end = begin

    def usable(self, x: torch.Tensor) -> bool:
        return compute_dtype(x) is not None and all(fusable(m) for m in self.members)

    def output(self, member: LoRALinear, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        if len(self.members) == 1:
            y = LoRAProjections.apply(self, x.reshape(-1, x.shape[-1]).to(compute_dtype(x)), *self.factors.params())
            return y.view(*lead, y.shape[-1])
        if x is not self._x or self._outs is None:
            flat = x.reshape(-1, x.shape[-1]).to(compute_dtype(x))
            y = LoRAProjections.apply(self, flat, *self.factors.params())
            self._x, self._outs = x, y.view(*lead, y.shape[-1]).split(self.factors.out_sizes, dim=-1)
        return self._outs[self.index[member]]
