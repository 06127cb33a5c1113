"""The explicit swap that puts the LoRA blocks with their own backward into a model (speed switch fused_blocks).

    attention   q_proj, k_proj, v_proj of one module -> one `LoRAProjections` call (engine/layers/fused_lora.py)
                (Phi-3's qkv_proj, o_proj, and every other plain LoRA linear: the same Function, one member)
    gated MLP   gate / up (or gate_up) -> act -> down  -> one `LoRAGatedMLP` call (engine/layers/fused_mlp.py)
    RMSNorm     the blocks' norms -> `RMSNormFunction` (engine/layers/fused_norm.py), where its math is recognised
    RoPE        inside each attention module's forward, the family's apply_rotary_pos_emb -> `RoPEFunction`
                (engine/layers/fused_rope.py), where the family's function is the half-split rotation

No family-specific forward is written here: the model's own attention and decoder-layer code runs,
and the modules it calls compute faster. That keeps every family transformers ships (sliding
windows, soft-capping, q/k norms, biases) on its own code, and the speed plan's other hooks (packed
attention, tiling, checkpointing) where they were.

What stays on the reference path, and why (counted in `FusedBlocks.left`, printed by speed.apply):
  - DoRA layers and layers with LoRA dropout (their forward needs W's row norms / keeps a mask);
  - an MLP whose projections are not all plain LoRA layers, or whose activation is not one
    `fused_mlp.ACTIVATIONS` reproduces — its LoRA linears still take the one-member Function
    (a tiled MLP, train.mlp_tile_tokens, runs the fused Function once per tile);
  - at run time, per call: an adapter merged or switched off (`adapters_disabled`), or a 16-bit input
    without autocast.
Under FSDP the plan leaves this off (parameters are DTensor shards outside the block's forward).

`set_fused_blocks(model, True / False)` is idempotent and reversible: the kernel self-check (and any
test) can run a module both ways on the same weights.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from torch import nn

from engine.layers.fused_lora import FusedProjections, stack_base_weights
from engine.layers.fused_mlp import FusedMLPForward, GatedMLPParts, activation_of
from engine.layers.fused_norm import set_fused_norms
from engine.layers.fused_rope import RopeSwitch, rope_switch_for
from engine.layers.lora import LoRALinear
from engine.model.tiling import find_mlps, is_tiled

ATTENTION_GROUPS = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))
"""Sibling linears that read the same input and are computed in one Function."""


@dataclass
class FusedBlocks:
    """What `set_fused_blocks` swapped in, and what it left on the reference path (reason -> count)."""

    mlps: int = 0
    groups: int = 0
    projections: int = 0
    norms: int = 0
    rope: int = 0
    left: Counter = field(default_factory=Counter)

    def describe(self) -> str:
        line = f"fused_blocks: {self.mlps} MLPs, {self.groups} q/k/v groups, {self.projections} single projections, {self.norms} norms, {self.rope} RoPE"
        if self.left:
            line += "; reference path for " + ", ".join(f"{n} {why}" for why, n in sorted(self.left.items()))
        return line


def _plain(layer) -> bool:
    return type(layer) is LoRALinear and isinstance(layer.lora_dropout, nn.Identity)


def _why_not(layer) -> str | None:
    if not isinstance(layer, LoRALinear):
        return None
    if type(layer) is not LoRALinear:
        return f"{type(layer).__name__} layers"
    if not isinstance(layer.lora_dropout, nn.Identity):
        return "layers with LoRA dropout"
    return None


def _remove(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.fused_group = None
        if isinstance(module.__dict__.get("forward"), FusedMLPForward):
            del module.forward
        if is_tiled(module) and isinstance(module.forward.inner, FusedMLPForward):
            module.forward.inner = None
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, fn in hooks.items()
                        if isinstance(getattr(fn, "__self__", None), (FusedProjections, RopeSwitch))]:
                del hooks[key]


def _gated_parts(mlp: nn.Module) -> tuple[GatedMLPParts | None, str | None]:
    children = dict(mlp.named_children())
    upper = [children[n] for n in ("gate_proj", "up_proj") if n in children] or [children.get("gate_up_proj")]
    down = children.get("down_proj")
    layers = [*upper, down]
    if any(not isinstance(m, LoRALinear) for m in layers):
        return None, "MLPs without LoRA on every projection"
    if any(not _plain(m) for m in layers):
        return None, "MLPs with DoRA or dropout"
    if "forward" in mlp.__dict__ and not is_tiled(mlp):
        return None, "MLPs whose forward is already replaced"
    act = getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None)
    name = activation_of(act) if act is not None else None
    if name is None:
        return None, "MLPs with an unrecognised activation"
    return GatedMLPParts(upper, down, name), None


def set_fused_blocks(model: nn.Module, enabled: bool, norms: bool = True) -> FusedBlocks:
    """Swap the fused blocks into `model` (or take them out again); see the module docstring.
    `norms=False` leaves the RMSNorms alone (the plan compiles them instead)."""
    _remove(model)
    report = FusedBlocks()
    report.norms = set_fused_norms(model, enabled and norms, report.left)
    if not enabled:
        return report
    taken: set[int] = set()
    for mlp in find_mlps(model).values():
        parts, why = _gated_parts(mlp)
        if parts is None:
            report.left[why] += 1
            continue
        stack_base_weights(parts.upper)
        if is_tiled(mlp):  # the tiles run the fused MLP, one call per tile
            mlp.forward.inner = FusedMLPForward(mlp, parts)
        else:
            mlp.forward = FusedMLPForward(mlp, parts)
        taken.update(id(m) for m in (*parts.upper, parts.down))
        report.mlps += 1
    for parent in model.modules():
        children = dict(parent.named_children())
        for names in ATTENTION_GROUPS:
            members = [children.get(n) for n in names]
            if not all(isinstance(m, LoRALinear) and _plain(m) for m in members):
                continue
            if len({m.in_features for m in members}) != 1:
                continue
            stack_base_weights(members)
            group = FusedProjections(members)
            for m in members:
                m.fused_group = group
                taken.add(id(m))
            parent.register_forward_pre_hook(group.begin)
            parent.register_forward_hook(group.end)
            report.groups += 1
    for attention in model.modules():
        if not type(attention).__name__.endswith("Attention"):
            continue
        switch = rope_switch_for(attention)
        if switch is None:
            report.left["attention modules with another rotary form"] += 1
            continue
        attention.register_forward_pre_hook(switch.enter)
        attention.register_forward_hook(switch.exit)
        report.rope += 1
    for layer in model.modules():
        if not isinstance(layer, LoRALinear) or id(layer) in taken:
            continue
        why = _why_not(layer)
        if why is not None:
            report.left[why] += 1
            continue
        layer.fused_group = FusedProjections([layer])
        report.projections += 1
    return report
