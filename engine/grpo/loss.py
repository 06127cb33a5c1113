"""GRPO's advantages and per-token loss (Shao et al. 2024, "DeepSeekMath"; DAPO: Yu et al. 2025;
Dr. GRPO: Liu et al. 2025), with TRL GRPOTrainer's conventions (trl/trainer/grpo_trainer.py, 1.16).

Advantages, per completion i of a group of G (rewards r_i = sum_f w_f r_if, NaN terms skipped;
a completion no function scored is NaN, left out of the mean and std and given advantage 0):

    A_i = (r_i - mean_group(r)) / (std + 1e-4)      std: the group's (scale_rewards=group), the
                                                   whole rollout's (batch), or none (not divided)

Per completion token t (pi = the policy, logits / temperature; old = the rollout's policy, the
same as pi at the first of num_iterations steps; ref = the base, adapters off):

    ratio_t = exp(log pi_t - log old_t)
    loss_t  = -min(ratio_t A_i, clip(ratio_t, 1 - epsilon, 1 + epsilon_high) A_i)
              + beta (exp(log ref_t - log pi_t) - (log ref_t - log pi_t) - 1)        k3 KL estimate

Normalisation, as a loss sum and a host count (engine/training/objective.py):

    grpo     sum_i (1/|o_i|) sum_t loss_t   /  number of completions
    bnpo     sum_t loss_t                   /  completion tokens of the step (this rank's)
    dapo     sum_t loss_t                   /  completion tokens of the step (all ranks': the step's count)
    dr_grpo  sum_t loss_t                   /  (number of completions x max_completion_length)

On one rank bnpo and dapo are the same number. When every completion of a group gets the same
reward its advantages are 0: with beta = 0 and num_iterations = 1 such a group contributes a loss
of exactly 0 (and no gradient) - the "loss is 0" of TRL #2703: the share of such groups is logged
as frac_reward_zero_std.
"""

from __future__ import annotations

import torch
from torch import Tensor


def nanstd(x: Tensor, dim: int | None = None) -> Tensor:
    """Sample standard deviation (Bessel's correction) ignoring NaNs, as TRL's `nanstd`."""
    mean = torch.nanmean(x, dim=dim, keepdim=dim is not None)
    var = torch.nanmean((x - mean) ** 2, dim=dim)
    count = (~torch.isnan(x)).sum(dim=dim) if dim is not None else (~torch.isnan(x)).sum()
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(var, float("nan")))
    return torch.sqrt(var * correction)


def advantages(rewards_per_func: Tensor, weights: Tensor, num_generations: int, scale_rewards: str) -> tuple[Tensor, Tensor, Tensor]:
    """(advantages [N], rewards [N] (NaN: unscored), std_is_zero [N]) from rewards [N, F] (NaN = None)."""
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * weights[None, :]).nansum(dim=1)
    rewards[unscorable] = torch.nan
    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    if scale_rewards in ("group", "none"):
        std = nanstd(grouped, dim=1).repeat_interleave(num_generations)
    elif scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        raise ValueError(f"scale_rewards={scale_rewards!r}: group, batch or none")
    adv = rewards - mean
    if scale_rewards != "none":
        adv = adv / (std + 1e-4)
    std_is_zero = torch.isclose(std, torch.zeros_like(std))
    return torch.nan_to_num(adv, nan=0.0), rewards, std_is_zero


def token_losses(logps: Tensor, old_logps: Tensor | None, ref_logps: Tensor | None, advantages: Tensor, *,
                 beta: float, epsilon_low: float, epsilon_high: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token loss [n] (module docstring) and per-token diagnostics {kl, clip_low, clip_high}
    (detached) for n completion tokens: logps [n] (with grad), old / ref [n] or None, advantages [n]."""
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped * advantages)
    stats = {"clip_low": ((ratio < 1 - epsilon_low) & (advantages < 0)).float(),
             "clip_high": ((ratio > 1 + epsilon_high) & (advantages > 0)).float()}
    if beta != 0.0:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        loss = loss + beta * kl
        stats["kl"] = kl.detach()
    return loss, stats
