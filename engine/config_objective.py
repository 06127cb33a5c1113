"""The `objective` section of the run config: SFT, DPO / ORPO and GRPO options (TRL's names where
TRL has them), defined and validated here; engine/config.py composes it into RunConfig, and
docs/CONFIG.md is generated from these docstrings as from the other sections'."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from engine.config_errors import _fail, _one_of


@dataclass
class ObjectiveConfig:
    name: str = "sft"
    """sft (next-token loss on the labelled tokens) | dpo | orpo (preference pairs: data.train_path
    holds {prompt, chosen, rejected} lines; engine/preference/) | grpo (reinforcement learning with
    reward functions: data.train_path holds {"prompt": ...} lines; engine/grpo/)."""
    beta: float = 0.1
    """dpo: the KL strength beta of DPO's implicit reward beta * log(pi / pi_ref); orpo: the weight
    lambda of the odds-ratio term; grpo: the weight of the k3 KL estimate to the reference (the
    base, adapters off); 0 (TRL's default, conf/objective/grpo.yaml) skips the reference forward."""
    loss_type: str = "sigmoid"
    """dpo: sigmoid (the DPO paper's loss) | robust | hinge. grpo (TRL's names and normalisations):
    grpo (each completion's token mean, averaged over completions) | bnpo (token mean over the
    step's completions) | dr_grpo (token sum / (completions x max_completion_length)) | dapo (token
    mean over the step's completions on all ranks; TRL's default)."""
    label_smoothing: float = 0.0
    """dpo: the assumed share of flipped labels eps in [0, 0.5) (conservative DPO for sigmoid, robust DPO)."""
    precompute_ref: bool = False
    """dpo: compute the reference log-probs of every training pair once before training (one
    reference forward per pair per run) instead of once per micro-batch."""
    # ---- grpo (TRL GRPOConfig's names and meanings) ----
    prompts_per_step: int = 4
    """grpo: prompts per rollout (per rank); each gets num_generations completions, so one rollout
    holds prompts_per_step x num_generations completions, trained on in packed rows of
    data.max_seq_len tokens, train.micro_batch_size rows per forward."""
    num_generations: int = 8
    """grpo: completions per prompt (G), the group whose rewards are compared."""
    max_completion_length: int = 256
    """grpo: tokens generated per completion at most (a completion without an end-of-turn by then is truncated)."""
    temperature: float = 1.0
    """grpo: sampling temperature of the rollouts (the log-probs are of logits / temperature, as TRL)."""
    top_p: float = 1.0
    """grpo: nucleus sampling: the smallest set of tokens whose probability reaches top_p (1: off)."""
    top_k: int = 0
    """grpo: sample among the k most likely tokens (0: off)."""
    epsilon: float = 0.2
    """grpo: clipping of the probability ratio: [1 - epsilon, 1 + epsilon_high]."""
    epsilon_high: Optional[float] = None
    """grpo: upper clipping bound (null: epsilon; DAPO recommends 0.28)."""
    num_iterations: int = 1
    """grpo: optimizer steps per rollout (mu); the rollout's log-probs before the first of them are
    kept as the old policy's."""
    scale_rewards: str = "group"
    """grpo: advantages = (reward - group mean) / std of: group | batch | none (not divided)."""
    mask_truncated_completions: bool = False
    """grpo: completions without an end-of-turn within max_completion_length carry no loss."""
    share_prompt: bool = True
    """grpo: train each prompt once with its G completions as branches of one tree document
    (engine/model/prefix_tree.py): the same loss and gradients, the prompt no longer computed G
    times forward and backward. Needs packed rows and the engine's packed attention (a model
    without them, or one the tree probe finds wrong, trains the unshared documents, said once)."""
    rewards: Any = field(default_factory=list)
    """grpo: reward functions, each "path/to/file.py:function" or "package.module:function", called
    as TRL's GRPOTrainer calls them: fn(prompts=..., completions=..., completion_ids=..., **columns)
    -> one float (or None: not scored) per completion. Built in for the orders task:
    engine.tasks.orders_rewards:json_valid, :fields, :exact_match."""
    reward_weights: Any = None
    """grpo: one weight per reward function (null: all 1); the reward is the weighted sum."""

    def validate(self) -> None:
        _one_of("objective.name", self.name, ("sft", "dpo", "orpo", "grpo"))
        if self.name == "grpo":
            self._validate_grpo()
            return
        _one_of("objective.loss_type", self.loss_type, ("sigmoid", "robust", "hinge"))
        if not (isinstance(self.beta, (int, float)) and self.beta > 0):
            _fail("objective.beta", f"must be > 0, got {self.beta!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            _fail("objective.label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing!r}")
        if self.name != "dpo" and (self.label_smoothing or self.precompute_ref):
            key = "label_smoothing" if self.label_smoothing else "precompute_ref"
            _fail(f"objective.{key}", f"only applies to objective=dpo, not {self.name}")
        if self.rewards:
            _fail("objective.rewards", f"only applies to objective=grpo, not {self.name}")

    def _validate_grpo(self) -> None:
        _one_of("objective.loss_type", self.loss_type, ("grpo", "bnpo", "dr_grpo", "dapo"))
        _one_of("objective.scale_rewards", self.scale_rewards, ("group", "batch", "none"))
        if not (isinstance(self.beta, (int, float)) and self.beta >= 0):
            _fail("objective.beta", f"must be >= 0, got {self.beta!r}")
        for key, low in (("prompts_per_step", 1), ("num_generations", 2), ("max_completion_length", 1),
                         ("num_iterations", 1), ("top_k", 0)):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                why = " (GRPO compares the completions of one prompt)" if key == "num_generations" else ""
                _fail(f"objective.{key}", f"must be an integer >= {low}, got {value!r}{why}")
        if not self.temperature > 0:
            _fail("objective.temperature", f"must be > 0 for sampled rollouts, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            _fail("objective.top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not self.epsilon >= 0 or (self.epsilon_high is not None and not self.epsilon_high >= 0):
            _fail("objective.epsilon", f"epsilon / epsilon_high must be >= 0, got {self.epsilon!r} / {self.epsilon_high!r}")
        if isinstance(self.rewards, str) or not isinstance(self.rewards, (list, tuple)) or not self.rewards \
                or not all(isinstance(r, str) and ":" in r for r in self.rewards):
            _fail("objective.rewards", "objective=grpo needs a list of reward functions, each "
                  f"\"path/to/file.py:function\" or \"package.module:function\", got {self.rewards!r}")
        if self.reward_weights is not None:
            if not isinstance(self.reward_weights, (list, tuple)) or len(self.reward_weights) != len(self.rewards) \
                    or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in self.reward_weights):
                _fail("objective.reward_weights", f"must be null or {len(self.rewards)} numbers (one per reward "
                      f"function), got {self.reward_weights!r}")
        if self.label_smoothing or self.precompute_ref:
            _fail("objective.label_smoothing" if self.label_smoothing else "objective.precompute_ref",
                  "only applies to objective=dpo, not grpo")
