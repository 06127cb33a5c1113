"""GRPO's training objective: what the step calls per micro-batch of a rollout (engine/grpo/batches.py).

    count(batch)            -> the micro-batch's share of the loss type's denominator (host int)
    loss_sum(model, batch)  -> (sum_t w_t loss_t  over its completion tokens, metric sums)

with loss_t and w_t from engine/grpo/loss.py. The log-probs go through the chunked lm_head of
`token_logps` (only completion tokens reach it, no [T, V] logits). Metrics, each a per-token mean
of the step once the loop divides by the count: kl (beta > 0), clip_ratio/low_mean,
clip_ratio/high_mean, clip_ratio/region_mean. Nothing here reads a value back to the host.
"""

from __future__ import annotations

from torch import Tensor

from engine.grpo.loss import token_losses
from engine.preference.logprobs import token_logps


class GRPOLoss:
    def __init__(self, *, beta: float, epsilon: float, epsilon_high: float | None, temperature: float,
                 chunk_size: int | None = 1024):
        self.beta, self.temperature, self.chunk_size = beta, temperature, chunk_size
        self.epsilon_low, self.epsilon_high = epsilon, epsilon if epsilon_high is None else epsilon_high

    def count(self, batch: dict) -> int:
        return int(batch["grpo_count"])

    def loss_sum(self, model, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        logps = token_logps(model, batch, chunk_size=self.chunk_size, temperature=self.temperature)   # [n]
        device = logps.device
        old, ref = batch.get("old_logps"), batch.get("ref_logps")
        losses, stats = token_losses(logps, None if old is None else old.to(device),
                                     None if ref is None else ref.to(device), batch["advantages"].to(device),
                                     beta=self.beta, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high)
        weights = batch["token_weights"].to(device)
        scale = batch["metric_scale"] * (weights != 0)  # per-token means over the tokens that carry loss
        metrics = {"clip_ratio/low_mean": (stats["clip_low"] * scale).sum(),
                   "clip_ratio/high_mean": (stats["clip_high"] * scale).sum(),
                   "clip_ratio/region_mean": ((stats["clip_low"] + stats["clip_high"]) * scale).sum()}
        if "kl" in stats:
            metrics["kl"] = (stats["kl"] * scale).sum()
        return (losses * weights).sum(), metrics
