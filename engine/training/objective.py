"""What a training step minimises, and what the loop asks of an objective.

An objective turns a micro-batch into a loss *sum* and a count:

    step loss = sum over micro-batches (and ranks) of loss_sum  /  sum of count

The count comes from the host-side batch (the loader knows it), so gradient accumulation and data
parallelism divide once by the true total, never a mean of means (transformers #34191), and the
step never asks the device for it.

    CausalLM    supervised fine-tuning: token cross-entropy summed over the labelled tokens,
                counted in labelled tokens (engine.training.loss)
Preference objectives (DPO, ORPO) sum per pair and count pairs; GRPO sums per completion token
with its loss type's weights (engine/grpo/).

The loop (engine/train.py) names no objective: `build_objective` picks the `ObjectivePlugin` the
config names (SFT: engine/training/sft.py, DPO / ORPO: engine/preference/plugin.py, GRPO:
engine/grpo/plugin.py), and the loop calls only the methods of that protocol: its data and
batches, its loss (`plugin.loss`, handed to `train_step`), its evaluation, its log metrics, its
summary rows and its resumable state.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from engine.training.loss import EAGER, StepKernels, causal_lm_loss


class Objective(Protocol):
    """Optionally `bucketed = True`: its loss reads only the batch's input_ids, position_ids, labels
    and packing context (label_mask honoured), so speed.cuda_graphs may pad its micro-batches into
    shape buckets; without it they run eagerly."""

    def count(self, batch: dict) -> int:
        """The host-side number of units `loss_sum` sums over (tokens, pairs)."""

    def loss_sum(self, model: nn.Module, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        """(fp32 0-dim sum of per-unit losses, {metric: detached device sum}) for one micro-batch
        already on the model's device."""


class CausalLM:
    """Next-token cross-entropy on the labelled tokens (chunked per `chunk_size`, None: full logits)."""

    bucketed = True
    """Its loss reads only input_ids, position_ids, labels and the packing context (label_mask
    honoured), so a CUDA graph's bucket may pad its batches (engine/speed/cuda_graphs.py)."""

    def __init__(self, chunk_size: int | None = 1024, kernels: StepKernels = EAGER):
        self.chunk_size, self.kernels = chunk_size, kernels

    def count(self, batch: dict) -> int:
        return int(batch["num_loss_tokens"])

    def loss_sum(self, model: nn.Module, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        loss, _ = causal_lm_loss(model, batch, chunk_size=self.chunk_size, kernels=self.kernels)
        return loss, {}


@dataclass
class RunSetup:
    """What an objective's data, batches and evaluation need from the run (resolved before it is built)."""

    cfg: Any                    # engine.config.RunConfig
    model: nn.Module
    tokenizer: Any
    packing: bool               # packed rows (the isolation probe's answer)
    ctx: Any                    # engine.parallel.distributed.DistContext
    precision: str
    kernels: StepKernels
    planner_terms: dict = field(default_factory=dict)  # the fp16 guard's fp32 weights / residual (plan.predict)

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def chunk_size(self) -> int | None:
        tc = self.cfg.train
        return tc.loss_chunk_size if tc.chunked_loss else None


class ObjectivePlugin(Protocol):
    """One objective family as the loop sees it. Attributes: `name`, `loss` (an `Objective`),
    `loader` (its `packing` and `micro_batch_size`), `train_set`, `eval_set` (None: no evaluation)."""

    def batches(self, grad_accum: int):
        """A Prefetcher-like source: `take()` the step's micro-batches, `prepare()` the next ones."""

    def before_training(self) -> None:
        """One-off work after resume, before the first evaluation (DPO: the reference table)."""

    def evaluate(self, step: int) -> dict | None:
        """Held-out numbers ({"loss": ..., ...}; the loop writes them as eval_<key>), None without eval data."""

    def step_counts(self, micro: list[dict], count: int) -> dict[str, int]:
        """Host ints the run adds up per step (tokens, loss_tokens, and e.g. pairs), from the batches."""

    def log_metrics(self) -> dict:
        """Host-side numbers for this log step's record (GRPO: rewards, lengths), reset after reading."""

    def summary(self, before: dict | None, after: dict | None, counters: dict) -> dict:
        """Entries this objective adds to summary.json (before / after: the first and last evaluation,
        counters: the run's sums of `step_counts`)."""

    def summary_rows(self, summary: dict) -> list[tuple[str, Any, Any]]:
        """(metric, before, after) rows of the printed table, after the held-out loss."""

    def state_dict(self) -> dict:
        """What resumes its batches bit for bit (the loader's position; GRPO: its sampling RNG too)."""

    def load_state_dict(self, state: dict) -> None: ...


PLUGINS = {"sft": "engine.training.sft:SFT", "dpo": "engine.preference.plugin:Preference",
           "orpo": "engine.preference.plugin:Preference", "grpo": "engine.grpo.plugin:GRPO"}
"""objective.name -> its plugin class (imported when chosen: a package per family)."""


def build_objective(setup: RunSetup) -> ObjectivePlugin:
    """The plugin `setup.cfg.objective.name` names, built (data loaded, loader made)."""
    module, cls = PLUGINS[setup.cfg.objective.name].split(":")
    return getattr(importlib.import_module(module), cls)(setup)
