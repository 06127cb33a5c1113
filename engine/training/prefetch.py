"""The next step's micro-batches, fetched while the device runs the current step.

The training step queues its work and returns without waiting (engine/training/step.py), so the
host is free while the GPU computes. `prepare` uses that time: it draws the next step's
micro-batches from the loader (tokenized rows to tensors, packing context, pinned memory) and
queues their copies to the device, non_blocking. `take` hands them to the step. On a CPU the
copies are no-ops and the order of work is simply the loop's.
"""

from __future__ import annotations

from typing import Iterable

import torch

from engine.training.step import to_device


class Prefetcher:
    """Micro-batches of `grad_accum` from `loader`'s endless iterator, one step ahead on request."""

    def __init__(self, loader: Iterable[dict], grad_accum: int, device: torch.device):
        self._batches = iter(loader)
        self.grad_accum, self.device = grad_accum, device
        self._next: list[dict] | None = None

    def prepare(self) -> None:
        """Fetch the next step's micro-batches now and start their copies to the device. The loader's
        position then is one step ahead of the steps taken: take its state for a checkpoint first."""
        if self._next is None:
            self._next = [to_device(next(self._batches), self.device) for _ in range(self.grad_accum)]

    def peek(self) -> list[dict]:
        """The next step's micro-batches, fetched now if need be, left for `take` (the fp16 guard's probe)."""
        self.prepare()
        return self._next

    def take(self) -> list[dict]:
        """The micro-batches of the next step (fetched now unless `prepare` already did)."""
        self.prepare()
        micro, self._next = self._next, None
        return micro
