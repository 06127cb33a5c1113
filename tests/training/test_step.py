"""train_step's own refusals (its math is covered end to end in tests/e2e/test_train.py)."""

import pytest
import torch

from engine.training.amp import DynamicLossScaler
from engine.training.objective import CausalLM
from engine.training.step import train_step


def test_a_step_without_any_loss_carrying_token_is_refused_before_the_forward():
    """One process: the count is the host's own number, so the step stops before dividing by 0."""
    model = torch.nn.Linear(2, 2)  # never called: the refusal comes first
    with pytest.raises(RuntimeError, match="no micro-batch of this step has a loss-carrying token"):
        train_step(model, [{"num_loss_tokens": 0}, {"num_loss_tokens": 0}], objective=CausalLM(), params=[],
                   optimizer=None, scheduler=None, scaler=DynamicLossScaler(enabled=False),
                   precision="fp32", device=torch.device("cpu"), max_grad_norm=1.0)
