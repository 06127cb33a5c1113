"""Compiled kernels for the step's elementwise hot spots: RMSNorm and the cross-entropy.

Two switches, each the same math as the eager code it replaces, built by `torch.compile`
(inductor) into fused kernels:

train.compile_norms -- every RMSNorm's forward and backward as one kernel each way.
    transformers' RMSNorm is a handful of eager ops, each a pass over [tokens, d] that autograd
    records and replays in backward:
        h = x.float();  v = mean(h^2, -1);  y = h * rsqrt(v + eps);  out = w * y.to(x.dtype)
        (Gemma: (1 + w) * y in fp32, then cast; Qwen3 / OLMo: the same per head over head_dim)
    What is compiled is the module's own forward, so the math is the family's, whatever it is.
    One norm over a 1,024-token SmolLM2 row, forward + backward, on this project's CPU (AMD EPYC
    Zen 5, 2 cores): 1.8 ms eager under bf16 autocast (3.4 ms in fp32), 0.22 ms compiled; a step
    runs 61. Scope: modules whose class name ends in "RMSNorm" (LayerNorm already is one fused
    PyTorch kernel). The swap is the module's `forward` attribute only: parameters, state-dict
    keys and checkpoints are untouched; switching off deletes the attribute again.

train.compile_loss -- the chunked loss's cross-entropy and its gradient (engine/training/loss.py) in two
    fused passes over the chunk's logits in their own dtype (a max / sum-exp reduction, then
    `softmax - onehot` written once, cast to the logits' dtype), instead of an fp32 copy and five
    eager passes over it and a cast back: for SmolLM2's 49k vocabulary and ~400 labelled tokens
    per row, lm_head + loss forward and backward took 85 ms instead of 120 in a microbenchmark
    and 81 instead of 97 inside the training step (bf16, this CPU). Its peak is lower too (no
    fp32 [C, V] tensor); engine/plan/ still predicts the eager path's (an over-estimate).

Only training compiles: the compiled norm runs while autograd records (`torch.is_grad_enabled()`)
and the compiled loss where a gradient is needed; evaluation and generation stay eager, so their
ever-changing shapes (a KV cache grows by one token per step) never trigger a compilation. Graphs
are built with dynamic shapes: packed rows differ in length from step to step and one graph serves
them all. The first training step pays the compilation (~10 s on a cold cache on the CPU above,
~1 s once inductor's on-disk cache holds it).

`auto` (the default for both) compiles where it has been measured to pay and inductor has its
compiler: on a CPU training in bf16 with a C++ compiler, outside FSDP (whose DTensor parameters
are not supported here). In fp32 on the same CPU the whole step measured no faster (A/B per step),
so auto leaves fp32 eager and spares it the compilation. On a GPU `true` turns them on (triton);
not measured there yet.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

_EAGER = "_engine_eager_forward"      # where a norm's own forward waits while it is compiled
_LOSS_FLAG = "_engine_compiled_loss"  # on the model: engine.training.loss.causal_lm_loss reads it


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


def resolve(key: str, mode, device: torch.device, fsdp: bool, precision: str, *, announce: bool = True) -> bool:
    """A compile switch (train.<key>: auto | true | false) -> whether to compile here.
    auto: on a CPU training in bf16 where inductor can compile, outside FSDP (else off, said on
    stderr when the reason is a missing compiler); true: on, or CompileError saying why it cannot be."""
    if mode is False:
        return False
    if mode is not True and (device.type != "cpu" or fsdp or precision != "bf16"):  # auto
        # auto: measured to pay on a CPU under bf16 only (in fp32 the step did not change); decided
        # before probing for a compiler, which imports inductor (~1 s of start-up)
        return False
    reason = unavailable_reason(device, fsdp)
    if mode is True:
        if reason:
            raise CompileError(f"train.{key}=true: {reason}; set train.{key}=false")
        return True
    if reason and announce:
        print(f"note: train.{key}=auto: {reason}; running it eagerly (a few % slower)", file=sys.stderr)
    return reason is None


def is_rms_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm")


def set_compiled_norms(model: nn.Module, enabled: bool) -> int:
    """Compile (or restore) the forward of every RMSNorm module of `model`; returns how many."""
    count = 0
    for module in model.modules():
        if not is_rms_norm(module):
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


def set_compiled_loss(model: nn.Module, enabled: bool) -> None:
    """train.compile_loss: the chunked loss of `model` uses `compiled_cross_entropy`."""
    setattr(model, _LOSS_FLAG, enabled)


def compiled_loss_enabled(model: nn.Module) -> bool:
    return bool(getattr(model, _LOSS_FLAG, False))


_CROSS_ENTROPY = None


def compiled_cross_entropy():
    """engine.training.loss.cross_entropy_and_grad_fused, compiled once per process (dynamic shapes)."""
    global _CROSS_ENTROPY
    if _CROSS_ENTROPY is None:
        from engine.training.loss import cross_entropy_and_grad_fused
        _CROSS_ENTROPY = torch.compile(cross_entropy_and_grad_fused, dynamic=True)
    return _CROSS_ENTROPY
