"""What a training step minimises: an objective turns a micro-batch into a loss *sum* and a count.

    step loss = sum over micro-batches (and ranks) of loss_sum  /  sum of count

The count comes from the host-side batch (the loader knows it), so gradient accumulation and data
parallelism divide once by the true total, never a mean of means (transformers #34191), and the
step never asks the device for it.

    CausalLM    supervised fine-tuning: token cross-entropy summed over the labelled tokens,
                counted in labelled tokens (engine.training.loss)
Preference objectives (DPO, ORPO) sum per pair and count pairs.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor, nn

from engine.training.loss import EAGER, StepKernels, causal_lm_loss


class Objective(Protocol):
    def count(self, batch: dict) -> int:
        """The host-side number of units `loss_sum` sums over (tokens, pairs)."""

    def loss_sum(self, model: nn.Module, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        """(fp32 0-dim sum of per-unit losses, {metric: detached device sum}) for one micro-batch
        already on the model's device."""


class CausalLM:
    """Next-token cross-entropy on the labelled tokens (chunked per `chunk_size`, None: full logits)."""

    def __init__(self, chunk_size: int | None = 1024, kernels: StepKernels = EAGER):
        self.chunk_size, self.kernels = chunk_size, kernels

    def count(self, batch: dict) -> int:
        return int(batch["num_loss_tokens"])

    def loss_sum(self, model: nn.Module, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        loss, _ = causal_lm_loss(model, batch, chunk_size=self.chunk_size, kernels=self.kernels)
        return loss, {}
