"""Host memory: keep the memory a CPU training step frees inside the process, for the next step.

PyTorch's CPU tensors come from the C library's malloc. glibc serves a request above its mmap
threshold with a fresh mmap and unmaps it on free; the threshold starts at 128 KiB and rises
(to at most 32 MiB) to the size of the largest mmapped block freed so far, and below it the heap's
top is given back to the kernel (trimmed) once twice the threshold lies free there. A training
step frees and remakes the same activations every step, 1-40 MB each, whose sizes change with
every packed row length; whichever of them the moving thresholds send back to the kernel returns
page by page, one minor page fault per 4 KiB page as it is first written: tens of thousands of
faults per step (benchmarks/results/ counts them per row).

`retain()` fixes the thresholds instead (mallopt): every block up to `HEAP_BLOCK_LIMIT` (32 MiB,
the largest glibc accepts) comes from the heap, and the heap is not trimmed below 2 GiB free, so
after the first steps a step mostly reuses memory the process already has (the benchmark's
engine vs engine_malloc_default rows). The cost: resident memory does not shrink after a peak (a training process's peak is what
it needs anyway). Blocks above the limit are still mmapped per call: the chunked loss
(engine/training/loss.py) keeps each chunk's [C, V] logits under it while this is on.

Switch: `speed.retain_host_memory` (auto | true | false); auto = training on a CPU with glibc.
It is a process setting (there is no undo: mallopt disables glibc's dynamic thresholds), taken
once when training starts; `false` leaves the C library as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource

HEAP_BLOCK_LIMIT = 32 * 2**20   # glibc's largest M_MMAP_THRESHOLD (HEAP_MAX_SIZE / 2 on 64-bit)
_TRIM_THRESHOLD = 2**31 - 1     # mallopt takes an int: give the heap's top back only past 2 GiB free
_TOP_PAD = 64 * 2**20           # grow the heap 64 MiB at a time (fewer brk calls while it grows)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # <malloc.h>

_retained = False


class HostMemoryError(RuntimeError):
    """speed.retain_host_memory=true where the C library has no mallopt (not glibc)."""


def _glibc():
    """The process's C library if it is glibc (it has gnu_get_libc_version), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 -- AttributeError if this is not glibc (musl, macOS)
        return libc
    except (OSError, AttributeError):
        return None


def unavailable_reason() -> str | None:
    return None if _glibc() is not None else "the C library is not glibc (no mallopt)"


def retain() -> None:
    """Fix glibc's malloc thresholds for this process (see the module docstring). Idempotent."""
    global _retained
    libc = _glibc()
    if libc is None:
        raise HostMemoryError(f"speed.retain_host_memory=true: {unavailable_reason()}; set it to auto or false")
    for option, value in ((_M_MMAP_THRESHOLD, HEAP_BLOCK_LIMIT), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD),
                          (_M_TOP_PAD, _TOP_PAD)):
        if libc.mallopt(ctypes.c_int(option), ctypes.c_int(value)) != 1:
            raise HostMemoryError(f"mallopt({option}, {value}) was refused by glibc")
    _retained = True


def is_retained() -> bool:
    return _retained


def choose(mode, device_type: str, notes: list[str] | None = None) -> bool:
    """speed.retain_host_memory (auto | true | false) -> whether to retain. auto: when training on a
    CPU with glibc (on a GPU the activations live in CUDA's caching allocator already; why auto
    says no goes to `notes`); true: yes (`retain` raises HostMemoryError where it cannot)."""
    if mode is True:
        return True
    if mode is False or device_type != "cpu":
        return False
    reason = unavailable_reason()
    if reason and notes is not None:
        notes.append(f"retain_host_memory off: {reason}")
    return reason is None


def minor_faults() -> int:
    """Minor page faults of this process so far (all threads): what `retain` removes per step."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
