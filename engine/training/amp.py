"""Mixed precision: resolving the precision, autocast, and dynamic loss scaling for fp16.

fp16 has 5 exponent bits: gradients of small losses underflow to 0 and large activations
overflow to inf. Dynamic loss scaling (Micikevicius et al. 2018, "Mixed Precision Training")
multiplies the loss by `scale` before backward so small gradients stay representable, divides
the gradients by `scale` before the optimizer sees them, and when a step's gradients hold
inf/NaN it skips the step and halves `scale`. After `growth_interval` clean steps it doubles.

Ours rather than torch.amp.GradScaler because we want two things it does not give: the names of
the parameters that overflowed (for the diagnosis when the run has to stop), and a state that is
plain numbers, so checkpoints need no pickles.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Fp16Overflow(RuntimeError):
    """fp16 training overflowed too many steps in a row; the message says where."""


def resolve_precision(precision: str, device: torch.device) -> str:
    """train.precision -> the precision used on `device` (see `choose_precision`)."""
    return choose_precision(precision, device)[0]


def choose_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """(precision, why): auto -> bf16 on a GPU that has it, fp16 on older GPUs (a T4), bf16 on a CPU
    with native bf16 matmuls, fp32 on other CPUs: the fastest that trains safely there.

    bf16 asked of a GPU without it falls back to fp16, with a warning that says so; bf16 asked of
    a CPU without native bf16 runs, with a warning that it will be slow."""
    if device.type != "cuda":
        native = device.type == "cpu" and cpu_has_native_bf16()
        if precision == "bf16" and device.type == "cpu" and not native:
            warnings.warn("train.precision=bf16 on a CPU without native bf16 matmuls (AVX512-BF16 or AMX): "
                          "they are emulated there and slower than fp32")
        if precision != "auto":
            return precision, "asked for"
        if native:
            return "bf16", "auto: this CPU has native bf16 matmuls (AVX512-BF16 or AMX), several times fp32's speed"
        return "fp32", "auto: this CPU has no native bf16 matmuls, where bf16 would be emulated and slower"
    has_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    if precision == "auto":
        return (("bf16", "auto: the GPU has bf16") if has_bf16 else
                ("fp16", "auto: the GPU has no bf16; fp16 with dynamic loss scaling"))
    if precision == "bf16" and not has_bf16:
        warnings.warn(f"train.precision=bf16 but {torch.cuda.get_device_name(device)} has no bf16: "
                      "falling back to fp16 with dynamic loss scaling")
        return "fp16", "bf16 asked for, but the GPU has none: fp16 with dynamic loss scaling"
    return precision, "asked for"


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls several times faster than fp32 (the throughput benchmark
    measures both peaks, benchmarks/results/). Other CPUs emulate bf16, slower than fp32."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # private helpers; a torch without them: assume not
        return False


def autocast(precision: str, device: torch.device):
    """The autocast context for a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


class DynamicLossScaler:
    """Loss scaling for fp16; with enabled=False every method is the identity (scale 1, no skips)."""

    def __init__(self, enabled: bool, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000, min_scale: float = 1.0):
        self.enabled = enabled
        self.scale = init_scale if enabled else 1.0
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval, self.min_scale = growth_interval, min_scale
        self.good_steps = 0  # clean steps since the last change of scale
        self.consecutive_skips = 0

    def unscale_(self, named_params: list[tuple[str, torch.nn.Parameter]]) -> list[str]:
        """Divide grads by the scale in place; return the names of params with inf/NaN grads.

        One host sync for the whole model (the stacked finiteness flags), not one per tensor."""
        grads = [(n, p.grad) for n, p in named_params if p.grad is not None]
        if not grads:
            return []
        if self.enabled:
            inv = 1.0 / self.scale
            for _, g in grads:
                g.mul_(inv)
        finite = torch.stack([torch.isfinite(g).all() for _, g in grads])
        if bool(finite.all()):  # sync: needed to decide whether to step
            return []
        return [n for (n, _), ok in zip(grads, finite.tolist()) if not ok]

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.consecutive_skips += 1
            self.good_steps = 0
            if self.enabled:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            return
        self.consecutive_skips = 0
        self.good_steps += 1
        if self.enabled and self.good_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps,
                "consecutive_skips": self.consecutive_skips, "enabled": self.enabled}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
        self.consecutive_skips = int(state["consecutive_skips"])
