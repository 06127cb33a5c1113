"""Activation offload: keep the activation checkpoints in CPU memory between forward and backward.

With activation checkpointing on, a step keeps one tensor per decoder block from forward to
backward: the block's input hidden states [B, T, H]. torch's non-reentrant checkpoint saves them
with `ctx.save_for_backward` *outside* its own recompute hooks (`_NoopSaveInputs`), so a
`torch.autograd.graph.saved_tensors_hooks` context placed around each block's checkpoint call
sees exactly those block-boundary tensors and nothing inside the block:

    forward, block l    pack:    x_l [B, T, H] (GPU) -> pinned CPU buffer, copied on a side CUDA
                                 stream (non_blocking: the compute stream goes on with block l+1)
    backward, block l   unpack:  pinned buffer -> GPU (non_blocking, on the compute stream, after
                                 the side stream's copy event), then the block is recomputed

So the device holds O(1) checkpoints instead of L of them (L x B x T x H x 2 bytes: 1 GiB for
Llama-3-8B at 16k tokens) and long context becomes a question of host memory. The side stream
makes the copy overlap compute (torch's `save_on_cpu`, which transformers' `offload=True` uses,
copies on the compute stream); torchtune's OffloadActivations measured -0.1% tokens/s for the
same idea. `record_stream` tells the caching allocator not to reuse the GPU tensor's memory
before the side stream's copy has read it, and the pinned buffer is owned by torch's caching
host allocator, which does not reuse it before the copy back has finished.

On a CPU the activations already live in host memory: pack keeps the tensor as it is (or, with
`copy_on_cpu=True`, stores a copy, so tests exercise the full round trip); `stats` counts what
the hooks saw either way.
Switch: `train.offload_activations` (with `train.activation_checkpointing`).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class OffloadCheckpoints(torch.autograd.graph.saved_tensors_hooks):
    """saved_tensors_hooks that moves saved CUDA tensors of >= `min_bytes` to pinned host memory.

    Use it around a checkpoint call (see `offloaded_checkpoint`), not around a whole forward:
    around a whole forward it would offload every saved activation, one copy per op.
    `stats`: packed (tensors seen), offloaded (tensors moved or copied), offloaded_bytes,
    unpacked (tensors brought back) — cumulative; `reset_stats()` zeroes them.
    """

    def __init__(self, min_bytes: int = 1 << 16, copy_on_cpu: bool = False):
        self.min_bytes = min_bytes
        self.copy_on_cpu = copy_on_cpu
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self.reset_stats()
        super().__init__(self._pack, self._unpack)

    def reset_stats(self) -> None:
        self.stats = {"packed": 0, "offloaded": 0, "offloaded_bytes": 0, "unpacked": 0}

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _pack(self, t: torch.Tensor):
        self.stats["packed"] += 1
        nbytes = t.numel() * t.element_size()
        if isinstance(t, nn.Parameter) or nbytes < self.min_bytes:
            return ("kept", t)
        if t.device.type == "cuda":
            compute = torch.cuda.current_stream(t.device)
            side = self._side_stream(t.device)
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)  # contiguous [*t.shape]
            side.wait_stream(compute)          # the copy reads t only after t is computed
            with torch.cuda.stream(side):
                host.copy_(t, non_blocking=True)
                done = torch.cuda.Event()
                done.record(side)
            t.record_stream(side)              # t's memory is not reused before the copy read it
            self.stats["offloaded"] += 1
            self.stats["offloaded_bytes"] += nbytes
            return ("cuda", host, t.device, done, t.requires_grad)
        if self.copy_on_cpu:
            self.stats["offloaded"] += 1
            self.stats["offloaded_bytes"] += nbytes
            return ("copied", t.detach().clone(), t.requires_grad)
        return ("kept", t)

    def _unpack(self, packed):
        kind = packed[0]
        if kind == "kept":
            return packed[1]
        self.stats["unpacked"] += 1
        if kind == "cuda":
            _, host, device, done, requires_grad = packed
            torch.cuda.current_stream(device).wait_event(done)
            return host.to(device, non_blocking=True).requires_grad_(requires_grad)
        _, copy, requires_grad = packed
        return copy.requires_grad_(requires_grad)


def offloaded_checkpoint(function, *args, offloader: OffloadCheckpoints, **kwargs):
    """`torch.utils.checkpoint.checkpoint(function, *args, **kwargs)` whose saved block inputs go
    through `offloader` (to pinned CPU memory on a GPU). Needs use_reentrant=False: the reentrant
    variant saves its inputs differently and is not DDP-safe (FIELD.md bug 10)."""
    if kwargs.get("use_reentrant", True):
        raise ValueError("offloaded_checkpoint needs use_reentrant=False")
    with offloader:
        return checkpoint(function, *args, **kwargs)


def install_offload(model: nn.Module, offloader: OffloadCheckpoints | None = None,
                    **checkpoint_kwargs) -> OffloadCheckpoints:
    """Make every checkpointed module of `model` (transformers' `_gradient_checkpointing_func`)
    checkpoint through `offloaded_checkpoint`. Call after activation checkpointing is enabled;
    returns the offloader (its `stats` show what was moved)."""
    offloader = offloader or OffloadCheckpoints()
    func = functools.partial(offloaded_checkpoint, offloader=offloader,
                             **{"use_reentrant": False, **checkpoint_kwargs})
    installed = 0
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) and hasattr(module, "_gradient_checkpointing_func"):
            module._gradient_checkpointing_func = func
            installed += 1
    if installed == 0:
        raise ValueError(f"install_offload: no module of {type(model).__name__} has activation checkpointing "
                         "enabled (train.offload_activations needs train.activation_checkpointing=true)")
    model._activation_offloader = offloader
    return offloader
