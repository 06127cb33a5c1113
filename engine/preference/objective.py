"""The DPO and ORPO training objectives: what the step calls per micro-batch.

Both follow the step's Objective protocol (engine/training/objective.py):

    count(batch)            -> int: the pairs of the micro-batch (host side; the step sums it
                               over micro-batches and ranks into n and divides once by n)
    loss_sum(model, batch)  -> (fp32 0-dim SUM over pairs of the per-pair loss,
                               {metric: detached 0-dim SUM over pairs})

so gradient accumulation and DDP weight every pair equally. Metrics (sums; the loop divides by
the pair count on log steps only): rewards_chosen, rewards_rejected, reward_margin,
reward_accuracy (chosen reward > rejected reward), logps_chosen, logps_rejected,
preference_accuracy (log pi(y_c|x) > log pi(y_r|x)); ORPO adds nll and log_odds_ratio.
Nothing here reads a value back to the host.

DPO's reference log-probs come from the same model with adapters off (engine/preference/logprobs.py),
once per micro-batch, or from a table computed once over the whole dataset before training
(`objective.precompute_ref`; the same numbers, one reference forward per pair per run instead of
one per pair per epoch).
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from engine.preference.batches import make_pair_loader
from engine.preference.logprobs import reference_logps, sequence_logps
from engine.preference.loss import dpo_losses, orpo_losses
from engine.training.step import to_device


def _pair_metrics(logps: Tensor, rewards_c: Tensor, rewards_r: Tensor, P: int) -> dict[str, Tensor]:
    return {"rewards_chosen": rewards_c.sum(), "rewards_rejected": rewards_r.sum(),
            "reward_margin": (rewards_c - rewards_r).sum(), "reward_accuracy": (rewards_c > rewards_r).float().sum(),
            "logps_chosen": logps[:P].detach().sum(), "logps_rejected": logps[P:].detach().sum(),
            "preference_accuracy": (logps[:P] > logps[P:]).float().sum()}


class DPOObjective:
    """Direct Preference Optimization (engine/preference/loss.py has the formulas)."""

    name = "dpo"

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, loss_type: str = "sigmoid",
                 chunk_size: int | None = 1024):
        self.beta, self.label_smoothing, self.loss_type, self.chunk_size = beta, label_smoothing, loss_type, chunk_size
        self.ref_table: Tensor | None = None
        """[n_pairs, 2] reference log-probs (chosen, rejected) by dataset index, when precomputed."""

    def count(self, batch: dict) -> int:
        return int(batch["num_pairs"])

    def reference(self, model, batch: dict) -> Tensor:
        """[2P] reference log-probs of the batch's sequences (chosen sides first)."""
        if self.ref_table is not None:
            rows = self.ref_table.index_select(0, batch["pair_index"].to(self.ref_table.device))  # [P, 2]
            return rows.t().reshape(-1)
        return reference_logps(model, batch, chunk_size=self.chunk_size)

    def loss_sum(self, model, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        P = int(batch["num_pairs"])
        ref = self.reference(model, batch)
        logps = sequence_logps(model, batch, chunk_size=self.chunk_size)
        losses, rc, rr = dpo_losses(logps[:P], logps[P:], ref[:P], ref[P:].to(logps.device), beta=self.beta,
                                    label_smoothing=self.label_smoothing, loss_type=self.loss_type)
        return losses.sum(), _pair_metrics(logps, rc, rr, P)

    @torch.no_grad()
    def precompute_reference(self, model, dataset, *, max_seq_len: int, micro_batch_size: int, packing: bool,
                             pad_token_id: int, device: torch.device, autocast, announce: bool = True) -> None:
        """Fill `ref_table` with one in-order pass over all of `dataset` (every rank the same)."""
        loader = make_pair_loader(dataset, max_seq_len=max_seq_len, micro_batch_size=micro_batch_size,
                                  packing=packing, seed=0, pad_token_id=pad_token_id, shuffle=False)
        table = torch.zeros(len(dataset), 2, dtype=torch.float32, device=device)
        for batch in loader.one_pass():
            batch = to_device(batch, device)
            with autocast():
                ref = reference_logps(model, batch, chunk_size=self.chunk_size)
            P = int(batch["num_pairs"])
            table[batch["pair_index"]] = torch.stack([ref[:P], ref[P:]], dim=1)
        self.ref_table = table
        if announce:
            print(f"reference log-probs precomputed for {len(dataset)} pairs", file=sys.stderr)


class ORPOObjective:
    """Odds Ratio Preference Optimization: no reference model (engine/preference/loss.py)."""

    name = "orpo"

    def __init__(self, beta: float = 0.1, chunk_size: int | None = 1024):
        self.beta, self.chunk_size = beta, chunk_size

    def count(self, batch: dict) -> int:
        return int(batch["num_pairs"])

    def loss_sum(self, model, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        P = int(batch["num_pairs"])
        logps = sequence_logps(model, batch, chunk_size=self.chunk_size)
        avg = logps / batch["seq_tokens"].to(logps.device)  # every side has >= 1 labelled token (data.py)
        losses, log_odds, rc, rr = orpo_losses(avg[:P], avg[P:], beta=self.beta)
        metrics = _pair_metrics(logps, rc, rr, P)
        metrics.update(nll=-avg[:P].detach().sum(), log_odds_ratio=log_odds.sum())
        return losses.sum(), metrics


def build_objective(cfg, *, chunk_size: int | None = 1024):
    """The objective an ObjectiveConfig names: DPOObjective, ORPOObjective, or None for sft."""
    if cfg.name == "dpo":
        return DPOObjective(cfg.beta, cfg.label_smoothing, cfg.loss_type, chunk_size=chunk_size)
    if cfg.name == "orpo":
        return ORPOObjective(cfg.beta, chunk_size=chunk_size)
    return None
