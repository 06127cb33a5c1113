"""Compiled kernels for the step's elementwise hot spots: RMSNorm and the cross-entropy (speed.compile).

Each is the same math as the eager code it replaces, built by `torch.compile` (inductor) into fused
kernels:

compile_norms -- every RMSNorm's forward and backward as one kernel each way. transformers' RMSNorm
    is a handful of eager ops, each a pass over [tokens, d] that autograd records and replays:
        h = x.float();  v = mean(h^2, -1);  y = h * rsqrt(v + eps);  out = w * y.to(x.dtype)
        (Gemma: (1 + w) * y in fp32, then cast; Qwen3 / OLMo: the same per head over head_dim)
    What is compiled is the module's own forward, so the math is the family's, whatever it is.
    Scope: modules whose class name ends in "RMSNorm" (LayerNorm already is one fused kernel), except
    those tiled by train.norm_tile_tokens (their memory trick wins).
    The swap is the module's `forward` attribute only: parameters, state-dict keys and
    checkpoints are untouched; switching off deletes the attribute again.

compile_loss -- the chunked loss's cross-entropy and its gradient (engine/training/loss.py) in two
    fused passes over the chunk's logits in their own dtype (a max / sum-exp reduction, then
    `softmax - onehot` written once, cast to the logits' dtype), instead of an fp32 copy and five
    eager passes over it and a cast back. Its peak is lower too (no fp32 [C, V] tensor; the
    planner still predicts the eager path's, an over-estimate).

Only training compiles: the compiled norm runs while autograd records (`torch.is_grad_enabled()`)
and the compiled loss where a gradient is needed; evaluation and generation stay eager, so their
ever-changing shapes (a KV cache grows by one token per step) never trigger a compilation. Graphs
have dynamic shapes: packed rows differ in length from step to step and one graph serves them
all. The first training step pays the compilation (seconds; less from inductor's on-disk cache).
Where auto turns them on: engine/speed/plan.py. What they buy: benchmarks/results/ (the
engine_eager_norms and engine_eager_loss rows).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.model.tiling import is_tiled
from engine.training.loss import cross_entropy_and_grad_fused

_EAGER = "_engine_eager_forward"      # where a norm's own forward waits while it is compiled


class CompileError(RuntimeError):
    """A compile switch set to true where inductor cannot compile (no C++ compiler / triton, FSDP)."""


def unavailable_reason(device: torch.device, fsdp: bool) -> str | None:
    """Why inductor cannot compile the switches' kernels here (None: it can)."""
    if fsdp:
        return "FSDP shards the weights as DTensors (not supported by the compiled kernels)"
    if device.type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler
            get_cpp_compiler()
        except Exception as e:  # InvalidCxxCompiler, or a torch without inductor's CPU backend
            return f"inductor finds no C++ compiler ({type(e).__name__}: {e})"
        return None
    if device.type == "cuda":
        from torch.utils._triton import has_triton
        return None if has_triton() else "triton is not installed"
    return f"no inductor backend for device type {device.type!r}"


def is_rms_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm")


def set_compiled_norms(model: nn.Module, enabled: bool) -> int:
    """Compile (or restore) the forward of every RMSNorm module of `model`; returns how many.
    A norm tiled by train.norm_tile_tokens (engine/model/tiling.py) stays as it is."""
    count = 0
    for module in model.modules():
        if not is_rms_norm(module) or is_tiled(module):
            continue
        count += 1
        compiled_now = _EAGER in module.__dict__
        if enabled and not compiled_now:
            eager = module.forward  # the class's forward, bound to this module
            compiled = torch.compile(eager, dynamic=True)

            def forward(*args, _eager=eager, _compiled=compiled, **kwargs):
                # training forward: fused kernels; no_grad (evaluation, generation): eager
                return (_compiled if torch.is_grad_enabled() else _eager)(*args, **kwargs)

            module.__dict__[_EAGER] = eager
            module.forward = forward
        elif not enabled and compiled_now:
            del module.__dict__[_EAGER]
            del module.forward  # the class's forward again
    return count


_CROSS_ENTROPY = None


def compiled_cross_entropy():
    """engine.training.loss.cross_entropy_and_grad_fused, compiled once per process (dynamic shapes)."""
    global _CROSS_ENTROPY
    if _CROSS_ENTROPY is None:
        _CROSS_ENTROPY = torch.compile(cross_entropy_and_grad_fused, dynamic=True)
    return _CROSS_ENTROPY
