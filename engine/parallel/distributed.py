"""Data parallelism on PyTorch's own runtime: torchrun starts the processes, we read its env.

`torchrun --nproc_per_node=N -m engine.train ...` sets RANK / WORLD_SIZE / LOCAL_RANK (and the
rendezvous for several nodes); a plain `python -m engine.train` is world size 1 and never touches
torch.distributed. NCCL on GPUs (with gloo for host numbers), gloo on CPU.

Why no DDP wrapper: only the LoRA weights train, a few MB of gradients. After the whole step's
micro-batches are done we all-reduce (sum) the flattened LoRA gradients once. The loss of every
micro-batch is divided by the *global* count of loss-carrying tokens (itself all-reduced first), so
the summed gradient is exactly the gradient of the mean token loss over the global batch: N ranks
at micro-batch b equal one rank at micro-batch N*b (FIELD.md bug 1, across ranks). It also
sidesteps DDP + reentrant checkpointing failing on QLoRA (trl #921): nothing hooks backward.
With `train.fsdp=true` (engine/parallel/fsdp.py) FSDP2 reduce-scatters the gradients itself, with SUM, and
`all_reduce_grads_` leaves them alone.

What each rank owns: rank 0 writes logs, checkpoints and the adapter; every rank reads the
checkpoint on resume. The loader state is rank-independent (epoch, index into this rank's share,
the same on every rank), so rank 0's copy restores every rank; the RNG states are per rank
(dropout draws different masks for different shapes) and are gathered to rank 0 for the checkpoint.
See docs/DISTRIBUTED.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    fsdp: bool = False
    """Parameters are FSDP2-sharded DTensors (engine/parallel/fsdp.py): FSDP reduces the gradients."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    if device == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(device)


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group torchrun describes in the environment (no-op for one process)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        # on GPUs: NCCL for device tensors, gloo for the host's numbers (all_reduce_sum_ints)
        dist.init_process_group(backend="cuda:nccl,cpu:gloo" if dev.type == "cuda" else "gloo")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def all_reduce_sum_ints(values: list[int], ctx: DistContext) -> list[int]:
    """Sum several python ints over ranks in one collective (e.g. a token count and a stop flag).

    Host numbers travel as a CPU tensor: over gloo (the CPU half of the process group on GPUs,
    `init_distributed`), so the GPU's stream is never waited on for them."""
    if not ctx.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t)
    return [int(v) for v in t.tolist()]


def all_reduce_grads_(params: list[torch.nn.Parameter], ctx: DistContext) -> None:
    """Sum the gradients of `params` over ranks, in one flattened collective.

    Under FSDP (ctx.fsdp) the gradients are already summed shards (reduce-scatter in backward)."""
    if not ctx.enabled or ctx.fsdp:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n


def all_reduce_sum_tensor(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The sum over ranks of a device tensor, as a new tensor (no host read: the collective is
    queued on the device like any kernel)."""
    if ctx.enabled:
        t = t.clone()
        dist.all_reduce(t)
    return t


def all_reduce_max_(t: torch.Tensor, ctx: DistContext) -> None:
    """In place, the maximum over ranks of a device tensor (no host read)."""
    if ctx.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)


def full_tensor(x: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (under FSDP clip_grad_norm_ returns the total norm as a DTensor),
    else the tensor itself."""
    from torch.distributed.tensor import DTensor

    return x.full_tensor() if isinstance(x, DTensor) else x


def gather_to_main(obj, ctx: DistContext) -> list | None:
    """Every rank's `obj` (picklable, e.g. its RNG states), as a list indexed by rank on rank 0;
    None on the other ranks. A plain [obj] without a process group."""
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size if ctx.is_main else None
    # tensors travel as numpy arrays: torch 2.13's gather_object fails to unpickle CPU tensors
    # ("UntypedStorage has no attribute dtype")
    dist.gather_object(_map_tensors(obj, lambda t: _AsNumpy(t.cpu().numpy())), out, dst=0)
    if out is None:
        return None
    return [_map_tensors(o, lambda a: torch.from_numpy(a.array), leaf=_AsNumpy) for o in out]


class _AsNumpy:
    def __init__(self, array):
        self.array = array


def _map_tensors(obj, fn, leaf=torch.Tensor):
    if isinstance(obj, leaf):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn, leaf) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn, leaf) for v in obj)
    return obj


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (also the one FSDP creates at world size 1)."""
    if dist.is_initialized():
        dist.destroy_process_group()
