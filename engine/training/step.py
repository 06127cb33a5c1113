"""One training step: the only place the engine (and every benchmark) runs forward, backward and
the optimizer. Reads top to bottom:

    1. count    the step's loss units over all micro-batches (host numbers from the loader; summed
                over ranks on the device)
    2. forward / backward each micro-batch under autocast: grad += scale * loss_sum / count
    3. all-reduce the LoRA gradients (data parallel without FSDP)
    4. fp16: unscale and flag inf/NaN gradients (on the device)
    5. clip, optimizer step (skipped on the device where flagged), zero the gradients, schedule

Nothing here waits on the device: no `.item()`, no `nonzero`, no boolean indexing, no copy to the
host (tests/training/test_sync_free.py runs whole training runs under a dispatch mode that fails on
each of them). The loss, the gradient norm and the scaler's counters stay on the device until the
loop reads them on a log step. The one exception is documented where it lives: fp16 with an
optimizer that cannot skip a step on the device (`DynamicLossScaler.step`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from engine.model.packing import PackingContext
from engine.parallel.distributed import DistContext, all_reduce_grads_, all_reduce_max_, all_reduce_sum_tensor
from engine.training import amp
from engine.training.objective import Objective


@dataclass
class StepResult:
    loss_sum: torch.Tensor                # fp32 0-dim, on the device: this rank's summed unit losses
    count: int                            # this rank's loss units (the host's number)
    grad_norm: torch.Tensor               # before clipping, on the device (inf/NaN on a skipped fp16 step)
    found_inf: torch.Tensor | None        # fp16: 0-dim device flag, 1.0 = the step was skipped; else None
    metrics: dict[str, torch.Tensor]      # this rank's metric sums, on the device


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors (and the packing context) of a host batch onto `device`, non_blocking: from pinned
    memory the copy overlaps the work already queued."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, (torch.Tensor, PackingContext)) else v
            for k, v in batch.items()}


def forward_backward(model: nn.Module, micro: list[dict], *, objective: Objective, count: int | torch.Tensor,
                     scale: float | torch.Tensor, precision: str,
                     device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Accumulate into .grad the gradient of  scale * sum(unit losses) / count  over `micro`.

    `count` is the step's global number of loss units (a host int, or a device tensor summed over
    ranks), so micro-batch 8 x accumulation 1 and micro-batch 1 x accumulation 8 give the same
    gradient. Returns the summed unit loss and the metric sums (detached, on the device: no sync)."""
    step_loss = torch.zeros((), device=device)
    metrics: dict[str, torch.Tensor] = {}
    weight = scale / count
    for batch in micro:
        batch = to_device(batch, device)
        with amp.autocast(precision, device):
            loss_sum, batch_metrics = objective.loss_sum(model, batch)
        (loss_sum * weight).backward()
        step_loss += loss_sum.detach()
        for key, value in batch_metrics.items():
            metrics[key] = metrics[key] + value if key in metrics else value
    return step_loss, metrics


def train_step(model: nn.Module, micro: list[dict], *, objective: Objective, params: list[tuple[str, nn.Parameter]],
               optimizer, scheduler, scaler: amp.DynamicLossScaler, precision: str, device: torch.device,
               max_grad_norm: float, ctx: DistContext | None = None,
               forward_backward_fn: Callable | None = None) -> StepResult:
    """One optimizer step over the micro-batches `micro` (see the module docstring).
    `forward_backward_fn`: the speed plan's implementation of step 2 (StepKernels.forward_backward:
    the same contract as `forward_backward`, e.g. replayed CUDA graphs); None: `forward_backward`."""
    # 1. every unit loss is divided by the global count: accumulation and ranks never weight a
    #    short sequence more than a long one (FIELD.md bug 1). Over ranks the sum stays on the
    #    device (clamped to 1: a global batch without targets then adds zero gradients)
    count = sum(objective.count(b) for b in micro)
    if ctx is not None and ctx.enabled:
        divisor = all_reduce_sum_tensor(torch.full((), float(count), device=device), ctx).clamp_min(1.0)
    elif count == 0:
        raise RuntimeError("no micro-batch of this step has a loss-carrying token")
    else:
        divisor = count
    # 2. loss_sum is an fp32 sum times the fp16 loss scale (1 otherwise)
    loss_sum, metrics = (forward_backward_fn or forward_backward)(model, micro, objective=objective, count=divisor,
                                                                  scale=scaler.loss_scale, precision=precision,
                                                                  device=device)
    # 3. data parallel: the ranks' gradients summed (each already divided by the global count)
    if ctx is not None:
        all_reduce_grads_([p for _, p in params], ctx)
    # 4. fp16: unscale; found_inf flags a step whose gradients overflowed (every rank agrees: FSDP
    #    ranks each see their shards, so the flags are combined)
    found_inf = scaler.unscale_(params)
    if found_inf is not None and ctx is not None and ctx.fsdp:
        all_reduce_max_(found_inf, ctx)
    # 5. clip the unscaled gradients (the norm stays on the device), step unless flagged
    grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in params],
                                               max_grad_norm if max_grad_norm > 0 else float("inf"))
    scaler.step(optimizer, found_inf)
    scaler.update(found_inf)
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return StepResult(loss_sum, count, grad_norm, found_inf, metrics)
