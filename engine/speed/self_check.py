"""Kernel self-check (speed.self_check): every switch of the plan that replaces the core's reference
implementation is run once on this device, on a small input shaped like the model's, and compared
with the reference, values and gradients, before the run trusts it.

The switches were written and tested against checking references on a CPU; a user's GPU, driver
or torch version can make one raise or compute something else. A switch that raises or disagrees
is turned off (the plan minus it is applied again) with one line naming it, the error or the
difference, and how to report it; the run goes on with the reference path for that piece.

A check is a function registered for a switch name (`register_check`): given the plan and the
model's `Shape` (and the model), it returns a `Case` (or None: nothing of that switch to check here), two
callables computing the same outputs the fast way and the reference way over shared leaves:

    case.fast()      -> outputs        the switch's implementation, on a small module / input
    case.reference() -> outputs        the core's reference for the same math
    case.leaves                        inputs and parameters whose gradients are compared too

Each is run with the same seeded cotangent on every output that has a gradient; outputs and
leaf gradients must agree in relative norm, ||fast - ref|| / ||ref|| <= 8 eps(dtype) + 1e-6 sqrt(K)
(K: the longest reduction behind an element), and a non-finite value where the reference has
none is a disagreement. A new switch (a fused block with its own backward) adds its check with
one decorated function beside its code or here:

    @register_check("fused_mlp")
    def _fused_mlp(plan, shape, model): ... return Case(fast=..., reference=..., leaves=(...), reduction=...)

Checks run in registration order on the plan as it stands (a kernel check sees the plan with the
switches already turned off gone). Cost: a few small forwards and backwards per switch; compiled
switches compile here what the first step would otherwise compile (printed with the verdicts).
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from engine.layers.groups import set_grouped_lora
from engine.layers.lora import LoRALinear
from engine.model.attention import exact_document_attention
from engine.model.fused_blocks import set_fused_blocks
from engine.model.packing import PackingContext
from engine.model.tiling import find_mlps, find_norms
import engine.speed.plan as speed_plan
from engine.training.loss import StepKernels, cross_entropy_and_grad_fused

REPORT = "the reference path runs instead; please report it with this line and `python -m torch.utils.collect_env`"


@dataclass(frozen=True)
class Shape:
    """What a check needs of the model: widths, heads, the compute dtype and device."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    dtype: torch.dtype          # the autocast (compute) dtype; fp32 without autocast
    base_dtype: torch.dtype     # the frozen linears' weight dtype
    device: torch.device
    precision: str

    @classmethod
    def of(cls, model: nn.Module, precision: str) -> "Shape":
        from engine.training.amp import DTYPES

        config = getattr(model, "config", None)
        get = (lambda key, default: getattr(config, key, None) or default)
        hidden = int(get("hidden_size", 64))
        heads = int(get("num_attention_heads", 4))
        param = next(p for p in model.parameters() if p.is_floating_point())
        base = next((m.base_layer.weight.dtype for m in model.modules() if isinstance(m, LoRALinear)
                     and m.base_layer.weight.is_floating_point()), DTYPES[precision])
        return cls(hidden=hidden, heads=heads, kv_heads=int(get("num_key_value_heads", heads)),
                   head_dim=int(get("head_dim", hidden // heads)), vocab=int(get("vocab_size", 256)),
                   dtype=DTYPES[precision], base_dtype=base, device=param.device, precision=precision)

    def autocast(self):
        from engine.training.amp import autocast
        return autocast(self.precision, self.device)


@dataclass
class Case:
    fast: Callable[[], Sequence[torch.Tensor]]
    reference: Callable[[], Sequence[torch.Tensor]]
    leaves: Sequence[torch.Tensor] = ()
    reduction: int = 1
    dtype: torch.dtype = torch.float32


CHECKS: dict[str, Callable[[speed_plan.SpeedPlan, Shape, nn.Module], Case | None]] = {}


def register_check(switch: str):
    """Register `build(plan, shape, model) -> Case | None` as the self-check of speed switch `switch`
    (`model`: the run's model, with the plan applied, for a check that needs one of its modules)."""
    def register(build):
        CHECKS[switch] = build
        return build
    return register


def tolerance(dtype: torch.dtype, reduction: int) -> float:
    return 8 * torch.finfo(dtype).eps + 1e-6 * math.sqrt(max(reduction, 1))


def _run(fn: Callable, leaves: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    for t in leaves:
        t.grad = None
    outputs = list(fn())
    diffable = [o for o in outputs if o.requires_grad]
    if diffable:
        gen = torch.Generator().manual_seed(0)
        cotangents = [torch.randn(o.shape, generator=gen).to(o.device, o.dtype) for o in diffable]
        torch.autograd.backward(diffable, cotangents)
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]
    return [t.detach().float() for t in outputs + grads]


def compare(case: Case) -> str | None:
    """None when fast and reference agree; else what differs (the worst output or gradient)."""
    ref, fast = _run(case.reference, case.leaves), _run(case.fast, case.leaves)
    n_out = len(ref) - len(case.leaves)
    tol = tolerance(case.dtype, case.reduction)
    worst = None
    for i, (f, r) in enumerate(zip(fast, ref)):
        what = f"output {i}" if i < n_out else f"gradient {i - n_out}"
        if f.shape != r.shape:
            return f"{what} has shape {tuple(f.shape)}, the reference {tuple(r.shape)}"
        if not torch.isfinite(f).all() and torch.isfinite(r).all():  # sync: start-up, outside the steps
            return f"{what} holds inf/NaN where the reference has none"
        rel = float((f - r).norm() / r.norm().clamp_min(1e-30))  # sync: start-up
        if not rel <= tol and (worst is None or rel > worst[1]):
            worst = (what, rel)
    return None if worst is None else (f"{worst[0]} differs from the reference by {worst[1]:.2e} "
                                       f"(relative norm; tolerance {tol:.1e} for {str(case.dtype)[6:]})")


def check_plan(plan: speed_plan.SpeedPlan, model: nn.Module, *, precision: str) -> tuple[speed_plan.SpeedPlan, list[str], float]:
    """(the plan minus the switches that failed, one line per failure, seconds taken)."""
    t0 = time.perf_counter()
    shape = Shape.of(model, precision)
    lines = []
    for switch, build in CHECKS.items():
        if not getattr(plan, switch, False):
            continue
        try:
            case = build(plan, shape, model)
            problem = None if case is None else compare(case)
        except Exception as e:  # noqa: BLE001 -- whatever a kernel raises turns it off
            problem = f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if problem:
            plan = plan.off(switch)
            lines.append(f"speed: self-check turned {switch} off on {_device_name(shape.device)} "
                         f"({shape.precision}): {problem}; {REPORT}")
    return plan, lines, time.perf_counter() - t0


def check_and_apply(plan: speed_plan.SpeedPlan, model: nn.Module, *, precision: str,
                    announce: bool = True) -> tuple[speed_plan.SpeedPlan, StepKernels]:
    """Check the applied `plan`'s switches; apply the plan minus the failures. Returns it and the
    loss's kernels. Prints the failures and the cost in one line each (on `announce`)."""
    checked, lines, seconds = check_plan(plan, model, precision=precision)
    kernels = speed_plan.apply(checked, model)
    if announce:
        for line in lines:
            print(line, file=sys.stderr)
        print(f"speed: self-check {'passed' if not lines else f'turned {len(lines)} switch(es) off'} "
              f"in {seconds:.2f} s", file=sys.stderr)
    return checked, kernels


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


# ---------------------------------------------------------------- the checks
TOKENS = (24, 40, 64)
"""Document lengths of the checks' input: three documents, 128 tokens."""


def _randn(*shape, shape_of: Shape, dtype=None, scale=1.0, grad=True, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    t = (torch.randn(*shape, generator=gen) * scale).to(shape_of.device, dtype or shape_of.dtype)
    return t.requires_grad_(grad)


def _lora(in_features: int, out_features: int, shape: Shape, seed: int, r: int = 8) -> LoRALinear:
    torch.manual_seed(seed)
    base = nn.Linear(in_features, out_features, bias=False, device=shape.device,
                     dtype=shape.base_dtype if shape.base_dtype.is_floating_point else shape.dtype)
    base.weight.requires_grad_(False)
    layer = LoRALinear(base, r=r, alpha=2 * r)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0.0, 0.05)  # a trained adapter: the update is not zero
    return layer


@register_check("fused_lora")
def _fused_lora(plan, shape: Shape, model) -> Case:
    """LoRALinear with the update added inside B's GEMM vs the plain three-pass update."""
    layer = _lora(shape.hidden, shape.hidden, shape, seed=1)
    x = _randn(sum(TOKENS), shape.hidden, shape_of=shape, dtype=torch.float32 if shape.precision == "fp32" else shape.dtype)

    def run(fused: bool):
        def call():
            layer.fused = fused
            try:
                with shape.autocast():
                    return (layer(x),)
            finally:
                layer.fused = LoRALinear.fused
        return call

    return Case(fast=run(True), reference=run(False), leaves=(x, layer.lora_A.weight, layer.lora_B.weight),
                reduction=max(shape.hidden, sum(TOKENS)), dtype=shape.dtype)


class _Siblings(nn.Module):
    """q / k / v-shaped LoRA linears reading one input, as in an attention module."""

    def __init__(self, shape: Shape):
        super().__init__()
        kv = shape.kv_heads * shape.head_dim
        self.q_proj = _lora(shape.hidden, shape.heads * shape.head_dim, shape, seed=2)
        self.k_proj = _lora(shape.hidden, kv, shape, seed=3)
        self.v_proj = _lora(shape.hidden, kv, shape, seed=4)

    def forward(self, x):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


@register_check("grouped_lora")
def _grouped_lora(plan, shape: Shape, model) -> Case:
    """One stacked A matmul for siblings reading the same input vs one A matmul each."""
    return _swap_case(_Siblings(shape), set_grouped_lora, shape, reduction=max(shape.hidden, sum(TOKENS)))


def _swap_case(block: nn.Module, swap: Callable[[nn.Module, bool], object], shape: Shape, *, reduction: int) -> Case:
    """`block` on one token batch with `swap(block, True)` (fast) and `swap(block, False)` (reference);
    the input and every trainable parameter are the leaves."""
    x = _randn(sum(TOKENS), shape.hidden, shape_of=shape, dtype=torch.float32 if shape.precision == "fp32" else shape.dtype)

    def run(on: bool):
        def call():
            swap(block, on)
            try:
                with shape.autocast():
                    out = block(x)
                return out if isinstance(out, tuple) else (out,)
            finally:
                swap(block, False)
        return call

    leaves = [x] + [p for p in block.parameters() if p.requires_grad]
    return Case(fast=run(True), reference=run(False), leaves=leaves, reduction=reduction, dtype=shape.dtype)


def _attention_case(kernel, shape: Shape) -> Case:
    """A DocumentKernel on three packed documents vs the eager per-document attention."""
    T = sum(TOKENS)
    q = _randn(1, shape.heads, T, shape.head_dim, shape_of=shape, seed=5)
    k = _randn(1, shape.kv_heads, T, shape.head_dim, shape_of=shape, seed=6)
    v = _randn(1, shape.kv_heads, T, shape.head_dim, shape_of=shape, seed=7)
    packing = PackingContext([list(TOKENS)], torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                             T, 0).to(shape.device)
    docs, start = [], 0
    for n in TOKENS:
        docs.append((0, start, n))
        start += n
    scale = shape.head_dim ** -0.5
    extra = {"window": None} if getattr(kernel, "takes_window", False) else {}

    def fast():
        return (kernel(q, k, v, docs, scale=scale, dropout=0.0, packing=packing, **extra),)

    def reference():
        outs = [exact_document_attention(q[:, :, s:s + n], k[:, :, s:s + n], v[:, :, s:s + n], scale=scale,
                                         window=None, softcap=None, dropout=0.0, training=False)
                for _, s, n in docs]
        return (torch.cat(outs, dim=2).transpose(1, 2),)              # [1, T, H, D]

    return Case(fast=fast, reference=reference, leaves=(q, k, v), reduction=max(TOKENS) * shape.head_dim,
                dtype=shape.dtype)


def _attention_check(switch: str, keep: tuple[str, ...]):
    """The check of `switch`: the kernel of the plan with the packed path's other kernels off."""
    others = [s for s in ("varlen_attention", "short_attention", "batch_short_documents", "row_attention")
              if s not in keep]

    def build(plan, shape: Shape, model) -> Case | None:
        if not plan.packed_attention:
            return None
        chosen = speed_plan.document_kernel(plan.off(*others) if others else plan)
        return None if chosen is None else _attention_case(chosen[1], shape)
    return build


register_check("varlen_attention")(_attention_check("varlen_attention", ("varlen_attention",)))
register_check("batch_short_documents")(
    _attention_check("batch_short_documents", ("short_attention", "batch_short_documents")))
register_check("short_attention")(_attention_check("short_attention", ("short_attention",)))
register_check("row_attention")(_attention_check("row_attention", ("row_attention",)))
register_check("packed_attention")(_attention_check("packed_attention", ()))


class _GatedMLP(nn.Module):
    """gate / up / act / down, every projection LoRA: what fused_blocks computes in one Function."""

    def __init__(self, shape: Shape, act: nn.Module):
        super().__init__()
        inner = 2 * shape.hidden
        self.gate_proj = _lora(shape.hidden, inner, shape, seed=11)
        self.up_proj = _lora(shape.hidden, inner, shape, seed=12)
        self.down_proj = _lora(inner, shape.hidden, shape, seed=13)
        self.act_fn = act

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class _Block(nn.Module):
    """A small stand-in for one decoder block's LoRA work: q / k / v siblings, the model's own
    activation in a gated MLP, and a copy of the model's first RMSNorm (its family's form)."""

    def __init__(self, shape: Shape, model: nn.Module):
        super().__init__()
        mlp = next(iter(find_mlps(model).values()), None)
        act = (getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None)) if mlp is not None else None
        self.attn = _Siblings(shape)
        self.mlp = _GatedMLP(shape, act if act is not None else nn.SiLU())
        norm = next((m for m in find_norms(model).values()
                     if getattr(m, "weight", None) is not None and m.weight.shape[-1] == shape.hidden), None)
        self.norm = copy.deepcopy(norm) if norm is not None else nn.Identity()

    def forward(self, x):
        return (*self.attn(x), self.mlp(x), self.norm(x))


@register_check("fused_blocks")
def _fused_blocks(plan, shape: Shape, model: nn.Module) -> Case:
    """The fused q/k/v group, gated MLP and RMSNorm Functions (engine/model/fused_blocks.py) vs the
    modules' own forwards, on the same weights (RoPE's Function is tested, not checked here)."""
    return _swap_case(_Block(shape, model), set_fused_blocks, shape, reduction=max(2 * shape.hidden, sum(TOKENS)))


@register_check("compile_norms")
def _compile_norms(plan, shape: Shape, model: nn.Module) -> Case | None:
    """The model's first compiled RMSNorm: its compiled forward vs its own eager one."""
    from engine.speed.compiled import _EAGER

    norm = next((m for m in model.modules() if _EAGER in m.__dict__), None)
    if norm is None:
        return None
    width = next((p.shape[-1] for p in norm.parameters()), shape.hidden)
    x = _randn(sum(TOKENS), width, shape_of=shape, dtype=shape.base_dtype, seed=10)
    return Case(fast=lambda: (norm(x),), reference=lambda: (norm.__dict__[_EAGER](x),), leaves=(x,),
                reduction=width, dtype=shape.base_dtype)


@register_check("compile_loss")
def _compile_loss(plan, shape: Shape, model) -> Case:
    """The compiled cross-entropy and its gradient vs the eager function it compiles."""
    from engine.speed.compiled import compiled_cross_entropy

    vocab = min(shape.vocab, 1 << 17)
    z = _randn(16, vocab, shape_of=shape, grad=False, seed=8)
    y = torch.randint(0, vocab, (16,), generator=torch.Generator().manual_seed(9)).to(shape.device)
    return Case(fast=lambda: compiled_cross_entropy()(z, y), reference=lambda: cross_entropy_and_grad_fused(z, y),
                reduction=vocab, dtype=shape.dtype)
