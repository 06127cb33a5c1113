"""Mixed precision: resolving the precision, autocast, and dynamic loss scaling for fp16.

fp16 has 5 exponent bits: gradients of small losses underflow to 0 and large activations
overflow to inf. Dynamic loss scaling (Micikevicius et al. 2018, "Mixed Precision Training")
multiplies the loss by `scale` before backward so small gradients stay representable, divides
the gradients by `scale` before the optimizer sees them, and when a step's gradients hold
inf/NaN it skips the step and halves `scale`. After `growth_interval` clean steps it doubles.

Ours rather than torch.amp.GradScaler because we want what it does not give: the names of the
parameters that overflowed (for the diagnosis when the run has to stop), no host read per step
(GradScaler reads found_inf for optimizers without a fused skip, and its `update` reads the flags
of every device), and a state that is plain numbers, so checkpoints need no pickles.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Fp16Overflow(RuntimeError):
    """fp16 training overflowed too many steps in a row; the message says where."""


class TrainingFailed(RuntimeError):
    """The run ended without training anything usable: every step skipped, or a non-finite held-out loss."""


def refuse_untrained(steps: int, skipped: int, eval_loss: float | None, *, precision: str) -> None:
    """A run that trained nothing (every one of its `steps` skipped) or whose held-out loss after
    training is inf/NaN must not end as if it had trained: raise (exit code 1) before the final
    checkpoint and adapter are written, so the last good checkpoint is the newest."""
    if steps > 0 and skipped >= steps:
        raise TrainingFailed(
            f"every one of this run's {steps} steps was skipped ({precision}: inf/NaN gradients or loss): nothing "
            "was trained, no adapter written. fp16: keep train.fp16_guard=auto (it runs what overflows in fp32), "
            "or train with train.precision=bf16 / fp32; else a lower optim.lr.")
    if eval_loss is not None and not math.isfinite(eval_loss):
        raise TrainingFailed(
            f"the held-out loss after training is {eval_loss} ({precision}): the adapter is not written and the "
            "newest checkpoint is the last good one. fp16: keep train.fp16_guard=auto, or train in bf16 / fp32.")


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


def autocast(precision: str, device: torch.device, cache_enabled: bool = True):
    """The autocast context for a resolved precision (a no-op for fp32). cache_enabled=False: no
    cast cache (what CUDA graph capture needs: a cache made during capture would hold the graph's
    pool tensors past the autocast exit)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision], cache_enabled=cache_enabled)


class DynamicLossScaler:
    """Loss scaling for fp16, kept on the device; with enabled=False the scale is 1 and nothing is
    checked (bf16 and fp32 need no finiteness test: clipping's norm is all they pay for).

    Nothing here reads the device. Per step (engine/training/step.py):
        unscale_   grads *= 1/scale and found_inf = any non-finite grad, in one multi-tensor kernel
                   (`_amp_foreach_non_finite_check_and_unscale_`, as torch.amp.GradScaler does);
                   which tensors were non-finite is kept as a flag vector for the diagnosis
        step       the optimizer step, skipped on the device: fused AdamW takes `found_inf` and
                   leaves weights, moments and step count alone where it is set
        update     scale halves on a skip, doubles after `growth_interval` clean steps
                   (`_amp_update_scale_`); the skip counters advance
    The host reads all of it at once on log steps (`read`), where the run warns about skipped steps
    and stops after too many in a row."""

    def __init__(self, enabled: bool, device: torch.device | str = "cpu", init_scale: float = 2.0**16,
                 growth_factor: float = 2.0, backoff_factor: float = 0.5, growth_interval: int = 2000,
                 min_scale: float = 1.0):
        self.enabled, self.init_scale = enabled, init_scale
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval, self.min_scale = growth_interval, min_scale
        zero = dict(device=device, dtype=torch.int32)
        self._scale = torch.full((), init_scale if enabled else 1.0, dtype=torch.float32, device=device)
        self._growth_tracker = torch.zeros((), **zero)   # clean steps since the last change of scale
        self._consecutive = torch.zeros((), **zero)      # skipped steps in a row
        self._skipped = torch.zeros((), **zero)          # skipped steps in all
        self._bad: torch.Tensor | None = None            # [params] flags of the latest skipped step
        self._names: list[str] = []

    @property
    def loss_scale(self) -> torch.Tensor | float:
        """What the loss is multiplied by before backward: the scale (a device tensor) in fp16, else 1."""
        return self._scale if self.enabled else 1.0

    def unscale_(self, named_params: list[tuple[str, torch.nn.Parameter]]) -> torch.Tensor | None:
        """fp16: divide the gradients by the scale in place and return found_inf, a 0-dim float
        device tensor (1.0: some gradient is inf/NaN). None when disabled (nothing is checked)."""
        if not self.enabled:
            return None
        named = [(n, _local(p.grad)) for n, p in named_params if p.grad is not None]
        if not named:
            return torch.zeros((), device=self._scale.device)
        grads = [g for _, g in named]
        found_inf = torch.zeros((), dtype=torch.float32, device=grads[0].device)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, self._scale.reciprocal())
        bad = ~torch.isfinite(torch.stack(torch._foreach_norm(grads)).float())
        if self._bad is None or self._bad.shape != bad.shape:
            self._bad, self._names = torch.zeros_like(bad), [n for n, _ in named]
        torch.where(found_inf.bool(), bad, self._bad, out=self._bad)
        return found_inf

    def step(self, optimizer: torch.optim.Optimizer, found_inf: torch.Tensor | None) -> None:
        """optimizer.step(), skipped where found_inf is set. Optimizers that take found_inf (torch's
        fused AdamW) skip on the device; the others (bitsandbytes' paged AdamW, which synchronises
        per parameter anyway, and foreach AdamW) need the flag on the host: one read per fp16 step."""
        if found_inf is None:
            optimizer.step()
        elif getattr(optimizer, "_step_supports_amp_scaling", False):
            optimizer.grad_scale, optimizer.found_inf = None, found_inf
            try:
                optimizer.step()
            finally:
                del optimizer.grad_scale, optimizer.found_inf
        elif not bool(found_inf):  # sync, for optimizers without a device-side skip
            optimizer.step()

    def update(self, found_inf: torch.Tensor | None) -> None:
        if found_inf is None:
            return
        torch._amp_update_scale_(self._scale, self._growth_tracker, found_inf,
                                 self.growth_factor, self.backoff_factor, self.growth_interval)
        self._scale.clamp_(min=self.min_scale)
        skipped = found_inf.to(torch.int32)
        self._consecutive.mul_(skipped).add_(skipped)  # +1 on a skip, back to 0 on a clean step
        self._skipped.add_(skipped)

    def forgive(self, skips: int) -> None:
        """Undo what `skips` skipped steps did to the scale (halved each) and to the count of skips
        in a row: their overflow was the forward's, which the fp16 guard has healed
        (engine/training/fp16_guard.py), not the gradients'. The steps stay counted as skipped."""
        self._scale.mul_(self.backoff_factor ** -skips).clamp_(max=self.init_scale)
        self._consecutive.zero_()

    def read(self) -> dict:
        """The scaler's state on the host (a sync: call it on log steps): scale, skipped steps in all
        and in a row, and the parameters whose gradients were inf/NaN at the latest skipped step."""
        scale, consecutive, skipped = torch.stack([self._scale.float(), self._consecutive.float(),
                                                   self._skipped.float()]).tolist()
        bad = self._bad.tolist() if self._bad is not None else []
        return {"scale": scale, "consecutive_skips": int(consecutive), "skipped_steps": int(skipped),
                "overflowed": [n for n, b in zip(self._names, bad) if b]}

    def state_dict(self) -> dict:
        state = self.read()
        return {"scale": state["scale"], "good_steps": int(self._growth_tracker), "enabled": self.enabled,
                "consecutive_skips": state["consecutive_skips"], "skipped_steps": state["skipped_steps"]}

    def load_state_dict(self, state: dict) -> None:
        self._scale.fill_(float(state["scale"]))
        self._growth_tracker.fill_(int(state["good_steps"]))
        self._consecutive.fill_(int(state["consecutive_skips"]))
        self._skipped.fill_(int(state.get("skipped_steps", 0)))


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP), else the tensor: the multi-tensor kernels take plain tensors."""
    return t.to_local() if hasattr(t, "to_local") else t
