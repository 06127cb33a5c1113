"""What a speed kernel does, measured from the ops it runs: attention kernel calls and allocated bytes.

Both are `TorchDispatchMode`s: every aten (or custom) op of the region, forward and backward,
passes through them once, as the outermost call (ops a kernel calls inside itself do not), so an
op is counted where PyTorch dispatches it, whatever Python code issued it:

    with AttentionCalls() as calls:          # tests/speed, benchmarks/throughput.py, gpu_attention.py
        train_step(...)
    calls.forward, calls.backward            # attention kernels launched per step

    with AllocatedBytes() as mem:            # benchmarks/attention_memory.py (CPU; a GPU has
        out = attention(q, k, v); out.backward(g)    #  torch.cuda.max_memory_allocated)
    mem.peak                                 # most bytes allocated inside and alive at once

    with AtenOps() as ops:                   # benchmarks/host_cost.py: the host's work per step
        train_step(...)
    ops.total, ops.by_name                   # every op dispatched, forward and backward

    with KernelTime() as kt:                 # benchmarks/host_cost.py: how much of a CPU step is
        train_step(...)                      #  arithmetic a GPU would run, not host work
    kt.seconds["gemm"], kt.seconds["attention"], kt.calls

An attention kernel is an op whose name says so: SDPA's fused kernels (`_scaled_dot_product_*`),
flash / memory-efficient / cuDNN attention called directly (`_flash_attention_forward`, ... as
nested-tensor SDPA calls them) and `torch_attn::_varlen_attn`. SDPA's math fallback is decomposed
into matmuls before a dispatch mode sees it and is not counted; neither are kernels written as
explicit matmuls (`engine/speed/cpu_attention.py`): they launch no attention kernel.
"""

from __future__ import annotations

import time
import weakref
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ATTENTION_OP_NAMES = ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention",
                      "varlen_attn")


def is_attention_op(name: str) -> bool:
    return any(part in name for part in ATTENTION_OP_NAMES)


class AttentionCalls(TorchDispatchMode):
    """Counts attention kernel launches in the region: `forward`, `backward`, and `ops` by name."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if is_attention_op(name):
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def backward(self) -> int:
        return sum(n for name, n in self.ops.items() if "backward" in name)

    @property
    def forward(self) -> int:
        return sum(self.ops.values()) - self.backward


class AtenOps(TorchDispatchMode):
    """Counts every op dispatched in the region (`total`, and `by_name`: Counter of op names such
    as "mm.default"). What the host issues: on a GPU each is at least one dispatcher trip and
    usually one kernel launch, so this is the work CUDA graphs or fused blocks take off the host."""

    def __init__(self):
        super().__init__()
        self.by_name: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.by_name[func.name().split("::", 1)[-1]] += 1  # "mm", "mul.Tensor" (overload kept where named)
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.by_name.values())


GEMM_OP_NAMES = ("mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_", "addbmm", "_addmm_activation")


class KernelTime(TorchDispatchMode):
    """CPU seconds spent inside the region's matrix multiplies (`seconds["gemm"]`: mm, addmm,
    bmm, ...) and attention kernels (`seconds["attention"]`, `is_attention_op`), and their `calls`.
    On a CPU these are arithmetic, not the host's issuing work a GPU step would wait on: a step's
    CPU time minus them is the host's share (Python, the dispatcher, autograd, elementwise ops).
    The mode's own bookkeeping is outside the timed calls; it adds to the step, not to them."""

    def __init__(self):
        super().__init__()
        self.seconds: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name().split("::", 1)[-1]
        kind = "gemm" if name.split(".")[0] in GEMM_OP_NAMES else "attention" if is_attention_op(name) else None
        if kind is None:
            return func(*args, **(kwargs or {}))
        start = time.process_time()
        out = func(*args, **(kwargs or {}))
        self.seconds[kind] += time.process_time() - start
        self.calls[kind] += 1
        return out


class AllocatedBytes(TorchDispatchMode):
    """Peak bytes of tensor storage allocated inside the region and alive at the same time (an
    allocator's view without its rounding or caching). A storage counts from the op that makes
    it (an output sharing no storage with the op's inputs: views and in-place ops allocate
    nothing) until it is freed (a weakref finalizer on the storage; autograd's saved tensors keep
    theirs alive until backward releases them)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._alive: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_address(t) for t in tree_leaves((args, kwargs)) if _plain(t)}
        for t in tree_leaves(out):
            if not _plain(t):
                continue
            storage = t.untyped_storage()
            address, size = storage.data_ptr(), storage.nbytes()
            if address == 0 or address in inputs or address in self._alive:
                continue
            self._alive.add(address)
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, address, size)
        return out

    def _freed(self, address: int, size: int) -> None:
        self._alive.discard(address)
        self.live -= size


def _plain(t) -> bool:
    return type(t) is torch.Tensor and t.layout == torch.strided


def _address(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()
