"""LoRA: a low-rank trainable update around a frozen linear layer (float or 4-bit bitsandbytes).

    y = W x + b + s * B (A (dropout(x)))        A: [r, in], B: [out, r], s = alpha / r
                                                 (or alpha / sqrt(r) with rsLoRA)

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685);
QLoRA (W stored in 4 bits): Dettmers et al. 2023 (arXiv:2305.14314); rsLoRA scaling:
Kalajdzievski 2023 (arXiv:2312.03732).

Research variants, each one config switch (PeftConfig) and one small file:
  DoRA (use_dora)      engine/layers/dora.py: `DoRALinear(LoRALinear)`, magnitude x direction
  PiSSA (init=pissa)   engine/layers/pissa.py: A, B from the top-r SVD of W, base keeps the residual
  LoRA+ (loraplus_ratio) engine/training/optim.py: B's learning rate is ratio x A's

The swap is explicit: `inject_lora` replaces each targeted linear by a `LoRALinear` that keeps
the original module as `base_layer`, so module paths and state-dict keys stay the ones PEFT uses
(`<path>.base_layer.weight`, `<path>.lora_A.weight`, `<path>.lora_B.weight`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.quant import dequantize_weight, is_linear4bit, logical_numel


class LoRATargetError(ValueError):
    """`targets` matched nothing, or named something that cannot carry LoRA."""


class LoRALinear(nn.Module):
    """y = base_layer(x) + s * B(A(dropout(x))), with A, B trainable and fp32, base_layer frozen.

    `base_layer` is an `nn.Linear` (any float dtype) or a bitsandbytes `Linear4bit`; the forward
    is the same for both because the LoRA branch never touches W.
    Init (as PEFT / the paper): A ~ Kaiming-uniform(a=sqrt(5)), B = 0, so a fresh adapter adds
    exactly 0 and leaves the base output bit-identical.
    Precision: A and B are fp32 whatever the base dtype. Under autocast the branch runs in the
    autocast dtype like every other matmul; outside autocast the input is cast to fp32 for the
    branch and the update back to the base output's dtype (PEFT does the same).
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):  # Linear4bit subclasses nn.Linear
            raise LoRATargetError(f"LoRA wraps nn.Linear or bitsandbytes Linear4bit, got {type(base_layer).__name__}")
        if r <= 0:
            raise ValueError(f"LoRA rank r must be > 0, got {r}")
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = _real_device(base_layer)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.reset_lora_parameters()
        self.merged = False
        self.disabled = False  # set by `adapters_disabled`: forward is the base layer alone
        # When merging into a weight shared with another module (tied lm_head / embeddings) the
        # merged weight gets its own tensor and the shared one waits here to be put back.
        self._shared_weight: nn.Parameter | None = None

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    # transformers reads/ties `lm_head.weight`; route those through to the frozen base layer so
    # a wrapped lm_head keeps sharing its weight with the input embeddings.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def __setattr__(self, name, value):
        if name in ("weight", "bias") and "base_layer" in self.__dict__.get("_modules", {}):
            setattr(self.base_layer, name, value)
        else:
            super().__setattr__(name, value)

    fused: bool = True
    """Speed switch (speed switch fused_lora): add the update inside B's GEMM, out + s * (xA^T) B^T as one
    addmm, instead of three passes over [tokens, out] (B's matmul, the scale, the add) and their
    backward counterparts. Same math; used when `out` and the branch share a dtype."""

    shared_input = None
    """Speed switch (speed switch grouped_lora): the `SharedInputGroup` (engine/layers/groups.py) whose one
    stacked A matmul serves this layer and its siblings reading the same input, or None."""

    fused_group = None
    """Speed switch (speed switch fused_blocks): the `FusedProjections` (engine/layers/fused_lora.py)
    that computes this layer with its siblings in one autograd Function with its own backward, or None."""

    decode_weight: torch.Tensor | None = None
    """Speed switch (generate_rollouts' merge_lora): W + s*B@A (DoRA: its merged weight) in W's dtype,
    a separate copy set by `engine.layers.decode_merge.lora_merged_for_decode` for the length of a
    rollout (no grad); the forward is then one linear. None: the adapter runs as a branch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.decode_weight is not None:
            return F.linear(x, self.decode_weight, self.base_layer.bias)
        if self.merged or self.disabled:
            return self.base_layer(x)
        if self.fused_group is not None and self.fused_group.usable(x):
            return self.fused_group.output(self, x)
        lead = x.shape[:-1]
        # the base on the flattened tokens: a fresh [tokens, out] tensor the fused update can add
        # into in place (nothing saved for backward aliases it: a linear saves its input and weight)
        out = self.base_layer(x.reshape(-1, self.in_features))          # [tokens, out]
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.weight.dtype)                          # fp32 branch
        if self.shared_input is not None:  # speed switch grouped_lora: one A matmul for the siblings
            xa = self.shared_input.project(self, x)                     # [..., r]
        else:
            xa = self.lora_A(self.lora_dropout(x))                      # [..., r]
        if self.fused and xa.dtype == out.dtype:
            # out += s * xa @ B^T inside B's GEMM (addmm_, beta = 1): no pass over [tokens, out]
            # besides the GEMM's own; B is cast to out's dtype by hand (in-place ops bypass
            # autocast), as autocast would. In backward the scale lands on the [r]-wide gradients
            # (of xa and of B), never on a [tokens, out] tensor.
            out.addmm_(xa.reshape(-1, self.r), self.lora_B.weight.t().to(out.dtype), alpha=self.scaling)
            return out.view(*lead, self.out_features)
        update = self.lora_B(xa) * self.scaling                         # [..., r] -> [..., out]
        return (out + update.reshape(-1, self.out_features).to(out.dtype)).view(*lead, self.out_features)

    def delta_weight(self) -> torch.Tensor:
        """s * B @ A in fp32, shape [out, in]: what merging adds to W (DoRA also rescales the rows)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    # What merge stores in place of W, and how unmerge gets W back; DoRALinear overrides both.
    def _merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.float() + self.delta_weight().detach()             # W + s*B@A, fp32

    def _unmerged_weight(self, merged: torch.Tensor) -> torch.Tensor:
        return merged.float() - self.delta_weight().detach()

    def merge(self, untie: bool = False) -> None:
        """W <- W + s*B@A for a float base (sum in fp32, stored in W's dtype). `untie=True` gives
        the merged weight its own tensor so a module sharing W (tied embeddings) is unchanged."""
        if is_linear4bit(self.base_layer):
            raise TypeError("a 4-bit base cannot be merged in place; use merged_linear() (merge_lora does)")
        if self.merged:
            raise RuntimeError("LoRA is already merged into this layer; unmerge() first")
        weight = self.base_layer.weight
        merged = self._merged_weight(weight.detach()).to(weight.dtype)
        if untie:
            self._shared_weight = weight
            self.base_layer.weight = nn.Parameter(merged, requires_grad=False)
        else:
            with torch.no_grad():
                weight.copy_(merged)
        self.merged = True

    def unmerge(self) -> None:
        """W <- W - s*B@A (exact in fp32 up to rounding; a weight untied by merge() is restored exactly)."""
        if not self.merged:
            raise RuntimeError("LoRA is not merged into this layer")
        if self._shared_weight is not None:
            self.base_layer.weight = self._shared_weight
            self._shared_weight = None
        else:
            weight = self.base_layer.weight
            with torch.no_grad():
                weight.copy_(self._unmerged_weight(weight).to(weight.dtype))
        self.merged = False

    def merged_linear(self) -> nn.Linear:
        """A new float nn.Linear holding dequantize(W) + s*B@A (for a 4-bit base: QLoRA merge,
        in the dtype the weight was quantized from) or W + s*B@A (float base, same dtype);
        for DoRA the rescaled sum (see `_merged_weight`)."""
        weight = dequantize_weight(self.base_layer)
        bias = self.base_layer.bias
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            merged = weight.float() if self.merged else self._merged_weight(weight)
            linear.weight.copy_(merged.to(weight.dtype))
            if bias is not None:
                linear.bias.copy_(bias)
        linear.requires_grad_(False)
        return linear

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}, merged={self.merged}"


def _real_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def set_fused_lora(model: nn.Module, fused: bool) -> None:
    """Turn the fused addmm forward of every LoRALinear on or off (speed switch fused_lora)."""
    for m in lora_modules(model).values():
        m.fused = fused


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"<module path>.lora_A.weight": [r, in], "<module path>.lora_B.weight": [out, r]} (fp32),
    plus "<module path>.lora_magnitude_vector": [out] for DoRA layers (PEFT's key names)."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A.weight"] = m.lora_A.weight
        out[f"{name}.lora_B.weight"] = m.lora_B.weight
        if getattr(m, "lora_magnitude_vector", None) is not None:
            out[f"{name}.lora_magnitude_vector"] = m.lora_magnitude_vector
    return out


def mark_only_lora_trainable(model: nn.Module) -> None:
    """requires_grad=True for the adapter tensors (LoRA A/B, DoRA magnitude), False for every
    other parameter (the frozen base)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in lora_state_dict(model).values():
        p.requires_grad_(True)


class ParameterReport(NamedTuple):
    trainable: int
    total: int
    percent: float

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} "
                f"|| trainable%: {self.percent:.2f}")


def parameter_report(model: nn.Module) -> ParameterReport:
    """(trainable, total, percent). Shared (tied) tensors count once; 4-bit weights count their
    logical out*in elements, not the packed bytes that store them."""
    trainable = total = 0
    for p in model.parameters():  # deduplicates tied parameters
        n = logical_numel(p)
        total += n
        trainable += n if p.requires_grad else 0
    return ParameterReport(trainable, total, 100.0 * trainable / total if total else 0.0)


# ----------------------------------------------------------------------------- merge

def _shared_param_ids(model: nn.Module) -> dict[int, int]:
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    return counts


def merge_lora(model: nn.Module, unload: bool = False) -> nn.Module:
    """Fold every adapter into its base: W <- W + s*B@A.

    Float bases are merged in place (the flag stops a second merge; `unmerge_lora` undoes it). A
    weight shared with another module (lm_head tied to the embeddings) gets its own merged copy
    so the embeddings stay untouched. 4-bit bases cannot hold the sum: their LoRALinear is
    replaced by a float nn.Linear with dequantize(W) + s*B@A (QLoRA merge; note FIELD.md bug 7:
    this is not the 16-bit model the adapter was trained against). `unload=True` also replaces
    the float LoRALinears by their merged base layers, leaving a plain model.
    """
    shared = _shared_param_ids(model)
    for name, module in lora_modules(model).items():
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if is_linear4bit(module.base_layer):
            setattr(parent, leaf, module.merged_linear())
            continue
        if not module.merged:
            module.merge(untie=shared.get(id(module.base_layer.weight), 1) > 1)
        if unload:
            setattr(parent, leaf, module.base_layer)
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes the base model only (evaluation's "before" column,
    merge drift) without unloading anything: every LoRA branch is skipped (y = W x + b).

    A PiSSA layer's base holds the residual W_res = W - s*B0@A0 (engine/layers/pissa.py), so instead
    of being skipped it runs with its initial A0, B0: W_res + s*B0@A0 = W up to fp32 rounding
    (for QLoRA: quantize(W_res) + s*B0@A0). A merged layer cannot be switched off (its W already
    holds s*B@A): that is an error."""
    modules = list(lora_modules(model).values())
    if any(m.merged for m in modules):
        raise RuntimeError("adapters_disabled: LoRA is merged into the base weights; unmerge_lora first")
    previous = [m.disabled for m in modules]
    swapped = []  # (module, trained A, trained B) of PiSSA layers running their initial adapter
    with torch.no_grad():
        for m in modules:
            if getattr(m, "pissa_A0", None) is not None:
                swapped.append((m, m.lora_A.weight.clone(), m.lora_B.weight.clone()))
                m.lora_A.weight.copy_(m.pissa_A0)
                m.lora_B.weight.copy_(m.pissa_B0)
            else:
                m.disabled = True
    try:
        yield model
    finally:
        for m, was in zip(modules, previous):
            m.disabled = was
        with torch.no_grad():
            for m, a, b in swapped:
                m.lora_A.weight.copy_(a)
                m.lora_B.weight.copy_(b)


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo `merge_lora` (without unload) on every merged float-base LoRALinear."""
    for module in lora_modules(model).values():
        if module.merged:
            module.unmerge()
    return model
