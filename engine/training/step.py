"""One training step: the only place the engine (and every benchmark) runs forward, backward and
the optimizer. Reads top to bottom:

    1. count    the step's loss units over all micro-batches and ranks (host numbers from the loader)
    2. forward / backward each micro-batch under autocast: grad += scale * loss_sum / count
    3. all-reduce the LoRA gradients (data parallel without FSDP)
    4. unscale (fp16); a step with inf/NaN gradients is skipped, the optimizer never sees it
    5. clip, optimizer step, zero the gradients, schedule

What leaves the device here: nothing in bf16 / fp32 but the clip's norm (a device tensor, read by the
loop only on log steps); fp16 reads one finiteness flag per step to decide whether to step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.model.packing import PackingContext
from engine.parallel.distributed import DistContext, all_reduce_grads_, all_reduce_sum_int
from engine.training import amp
from engine.training.objective import Objective


@dataclass
class StepResult:
    loss_sum: torch.Tensor          # fp32 0-dim, on the device: this rank's summed unit losses
    count: int                      # the global number of loss units the gradient was divided by
    grad_norm: torch.Tensor | float  # before clipping (nan for a skipped step)
    overflowed: list[str]           # parameters with inf/NaN gradients (fp16 skip), else []
    metrics: dict[str, torch.Tensor]  # this rank's metric sums, on the device


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors (and the packing context) of a host batch onto `device`, non_blocking: from pinned
    memory the copy overlaps the work already queued."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, (torch.Tensor, PackingContext)) else v
            for k, v in batch.items()}


def forward_backward(model: nn.Module, micro: list[dict], *, objective: Objective, count: int, scale: float,
                     precision: str, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Accumulate into .grad the gradient of  scale * sum(unit losses) / count  over `micro`.

    `count` is the step's global number of loss units, so micro-batch 8 x accumulation 1 and
    micro-batch 1 x accumulation 8 give the same gradient. Returns the summed unit loss and the
    metric sums (detached, on the device: no sync)."""
    step_loss = torch.zeros((), device=device)
    metrics: dict[str, torch.Tensor] = {}
    for batch in micro:
        batch = to_device(batch, device)
        with amp.autocast(precision, device):
            loss_sum, batch_metrics = objective.loss_sum(model, batch)
        (loss_sum * (scale / count)).backward()
        step_loss += loss_sum.detach()
        for key, value in batch_metrics.items():
            metrics[key] = metrics[key] + value if key in metrics else value
    return step_loss, metrics


def train_step(model: nn.Module, micro: list[dict], *, objective: Objective, params: list[tuple[str, nn.Parameter]],
               optimizer, scheduler, scaler: amp.DynamicLossScaler, precision: str, device: torch.device,
               max_grad_norm: float, ctx: DistContext | None = None) -> StepResult:
    """One optimizer step over the micro-batches `micro` (see the module docstring)."""
    # 1. every unit loss is divided by the global count: accumulation and ranks never weight a
    #    short sequence more than a long one (FIELD.md bug 1)
    count = sum(objective.count(b) for b in micro)
    count = all_reduce_sum_int(count, ctx) if ctx is not None else count
    if count == 0:
        raise RuntimeError("no micro-batch on any rank has a loss-carrying token")
    # 2. loss_sum is an fp32 sum times the fp16 loss scale (1 otherwise); a micro-batch without
    #    targets adds zero gradients, not NaN
    loss_sum, metrics = forward_backward(model, micro, objective=objective, count=count, scale=scaler.scale,
                                         precision=precision, device=device)
    # 3. data parallel: the ranks' gradients summed (each already divided by the global count)
    if ctx is not None:
        all_reduce_grads_([p for _, p in params], ctx)
    # 4. unscale; skip a step whose gradients overflowed
    overflowed = scaler.unscale_(params)
    scaler.update(found_inf=bool(overflowed))
    if overflowed:
        grad_norm = float("nan")
    else:
        # 5. clip the unscaled gradients, step
        grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in params],
                                                   max_grad_norm if max_grad_norm > 0 else float("inf"))
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return StepResult(loss_sum, count, grad_norm, overflowed, metrics)
