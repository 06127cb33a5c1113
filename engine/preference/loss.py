"""Preference losses on per-sequence log-probs: DPO (sigmoid, robust, hinge) and ORPO. Pure math.

DPO (Rafailov et al. 2023, arXiv:2305.18290), for a pair with summed reply log-probs
pi_c, pi_r (policy) and ref_c, ref_r (reference):

    d = (pi_c - ref_c) - (pi_r - ref_r)
    sigmoid: -(1 - eps) log sigma(beta d) - eps log sigma(-beta d)     (eps = label_smoothing:
             conservative DPO, Mitchell 2023; eps = 0 is the paper's loss and TRL's "sigmoid")
    robust:  (-(1 - eps) log sigma(beta d) + eps log sigma(-beta d)) / (1 - 2 eps)   (Chowdhury et al. 2024; TRL "robust")
    hinge:   relu(1 - beta d)                                             (SLiC, Zhao et al. 2023)
    rewards: beta (pi_c - ref_c), beta (pi_r - ref_r)

ORPO (Hong et al. 2024, arXiv:2403.07691), with per-token *average* reply log-probs a_c, a_r:

    log odds(y) = a - log(1 - exp(a))
    L_OR = -log sigma(log odds(y_c) - log odds(y_r));   loss = NLL(y_c) + beta L_OR
    with NLL(y_c) = -a_c (the chosen reply's mean token NLL); rewards beta a_c, beta a_r (TRL's).

Shapes: every input [P] (one entry per pair), every output [P]; callers sum over pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge")


def dpo_losses(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *,
               beta: float, label_smoothing: float = 0.0, loss_type: str = "sigmoid") -> tuple[Tensor, Tensor, Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards), all [P] fp32 (module docstring)."""
    chosen_ratio = policy_chosen.float() - ref_chosen.float()
    rejected_ratio = policy_rejected.float() - ref_rejected.float()
    z = beta * (chosen_ratio - rejected_ratio)
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - z)
    else:
        raise ValueError(f"dpo_losses: loss_type {loss_type!r} is not one of {', '.join(DPO_LOSS_TYPES)}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2 (Maechler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_losses(avg_chosen: Tensor, avg_rejected: Tensor, *, beta: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(per-pair losses NLL + beta L_OR, log odds ratio, chosen rewards, rejected rewards), all [P] fp32."""
    a_c, a_r = avg_chosen.float(), avg_rejected.float()
    log_odds = (a_c - a_r) - (log1mexp(a_c) - log1mexp(a_r))
    losses = -a_c - beta * F.logsigmoid(log_odds)
    return losses, log_odds.detach(), beta * a_c.detach(), beta * a_r.detach()
