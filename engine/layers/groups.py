"""Grouped LoRA A: sibling linears that read the same input share one A matmul (speed switch grouped_lora).

In a decoder block q_proj, k_proj and v_proj read the same normed hidden state, and so do
gate_proj and up_proj. Each LoRA branch starts with a skinny matmul over that input, x A_i^T
([tokens, in] x [in, r]), and its backward with two more (dA_i = dxa_i^T x, dx += dxa_i A_i): cheap
in FLOPs, but each reads or writes a whole [tokens, in] tensor. Stacking the group's A matrices
makes it one matmul each way for the whole group:

    A = [A_q; A_k; A_v; ...]            [sum r_i, in]
    xa = x A^T                          [..., sum r_i]   member i takes its columns as a view
    backward: dA = dxa^T x  (one GEMM, split back to the A_i),  dx = dxa A  (one GEMM, no adds)

Same math (each member's xa_i = x A_i^T exactly as before; only the GEMM shapes change).

Who shares: the LoRALinear children of one module with the same in_features (plain LoRA, no
dropout, whose masks would differ per member), e.g. {q, k, v, o} of an attention module and
{gate, up} of an MLP. The first tensor a member reads during the parent module's forward is the
shared input: the group projects it for every member at once and each member that reads that
same tensor (identity, not shape) takes its columns; a member reading another tensor (o_proj
reads the attention output) projects it alone, and its columns of the shared projection go
unused (a few columns more in one skinny matmul). The grouping is fixed by the module tree and
the model's code, so a checkpointed block recomputes exactly the graph of its forward. The
parent's forward pre- and post-hooks drop the cached projection: nothing outlives the call.
Not under FSDP (its parameters are DTensor shards outside the block's forward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.lora import LoRALinear


class SharedInputGroup:
    """The members' stacked A projection of the first tensor a member reads in the current
    forward of the parent module; a member reading any other tensor projects it alone."""

    def __init__(self, members: list[nn.Module]):
        self.members = list(members)
        self.offsets, offset = {}, 0
        for m in self.members:
            self.offsets[m] = offset
            offset += m.r
        self._active = False  # inside the parent's forward (between its pre- and post-hook)
        self._x = None        # the shared input of the current parent forward, once a member has read it
        self._xa = None       # [..., sum r]

    def project(self, member: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """member's x A^T ([..., r]): a view of the group's projection when x is the shared input
        of the parent's current forward; else (another tensor, or a call from outside the
        parent's forward) the member's own projection."""
        if not self._active:
            return member.lora_A(x)
        if self._x is None:
            weight = torch.cat([m.lora_A.weight for m in self.members])   # [sum r, in]
            self._x, self._xa = x, F.linear(x, weight)
        if x is not self._x:
            return member.lora_A(x)
        start = self.offsets[member]
        return self._xa[..., start:start + member.r]

    def begin(self, *args) -> None:  # forward pre-hook of the parent module
        self._active, self._x, self._xa = True, None, None

    def end(self, *args) -> None:  # forward hook of the parent module: nothing outlives the call
        self._active, self._x, self._xa = False, None, None


def groupable(module: nn.Module) -> bool:
    return type(module) is LoRALinear and isinstance(module.lora_dropout, nn.Identity)


def _remove_group_hooks(parent: nn.Module) -> bool:
    """Drop the groups' hooks from `parent` (found by owner, so a deep-copied model's own); True if any."""
    found = False
    for hooks in (parent._forward_pre_hooks, parent._forward_hooks):
        for key in [k for k, fn in hooks.items() if isinstance(getattr(fn, "__self__", None), SharedInputGroup)]:
            del hooks[key]
            found = True
    return found


def set_grouped_lora(model: nn.Module, enabled: bool) -> int:
    """Group (or ungroup) the LoRA A matmuls of siblings reading the same input; returns how
    many groups there are now. Idempotent and reversible."""
    groups = 0
    for parent in model.modules():
        if _remove_group_hooks(parent):
            for child in parent.children():
                if getattr(child, "shared_input", None) is not None:
                    child.shared_input = None
        if not enabled:
            continue
        by_width: dict[int, list[nn.Module]] = {}
        for child in parent.children():
            if groupable(child):
                by_width.setdefault(child.in_features, []).append(child)
        for members in by_width.values():
            if len(members) < 2:
                continue
            group = SharedInputGroup(members)
            for m in members:
                m.shared_input = group
            parent.register_forward_pre_hook(group.begin)
            parent.register_forward_hook(group.end)
            groups += 1
    return groups
