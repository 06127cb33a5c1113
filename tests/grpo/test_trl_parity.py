"""TRL as the oracle (imported in tests only): for the same tiny model, LoRA weights, completions,
rewards and old / reference log-probs, the engine's GRPO loss and LoRA gradients equal what TRL's
`GRPOTrainer._compute_loss` gives, for each loss_type; the advantages equal TRL's own code for
each scale_rewards.

The engine packs prompt + completion documents into rows (batches.py) and takes log-probs of the
labelled tokens through its chunked lm_head; TRL gets the same ids as padded [B, P + C] rows with a
completion mask, and its log-probs from a plain forward of the PEFT model (logits / temperature,
log-softmax at the completion tokens, what its fused head computes). `_compute_loss` runs on a
stand-in trainer object holding only the attributes it reads."""

import inspect
import textwrap
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import lora_and_peft_twins, make_tiny_model
from engine.grpo.batches import Rollout, rollout_batches
from engine.grpo.loss import advantages as engine_advantages
from engine.grpo.objective import GRPOLoss
from engine.layers.lora import lora_state_dict

peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402
from trl.trainer.utils import nanstd as trl_nanstd  # noqa: E402

G, L, TEMPERATURE = 3, 6, 0.7
PROMPTS = [[5, 9, 12, 3], [7, 2, 30, 31, 8, 4]]
COMPLETIONS = [[11, 14, 2], [15, 16, 17, 18, 19, 20], [21, 2], [40, 41, 2], [42, 43, 44, 45, 2], [46, 47, 48, 49, 50, 51]]
TRUNCATED = [False, True, False, False, False, True]
ADVANTAGES = [0.9, -0.4, -0.5, 1.2, 0.3, -1.5]


@pytest.fixture(scope="module")
def models():
    base, _ = make_tiny_model("llama", seed=3)
    ours, theirs = lora_and_peft_twins(base, seed=11)
    return ours.train(), theirs.train()


def _padded(prompt_of, completions):
    """TRL's inputs: left-padded prompts, right-padded completions, their masks."""
    P = max(len(PROMPTS[p]) for p in prompt_of)
    C = max(len(c) for c in completions)
    B = len(completions)
    prompt_ids = torch.zeros(B, P, dtype=torch.long)
    prompt_mask = torch.zeros(B, P, dtype=torch.long)
    completion_ids = torch.zeros(B, C, dtype=torch.long)
    completion_mask = torch.zeros(B, C, dtype=torch.long)
    for b, (p, c) in enumerate(zip(prompt_of, completions)):
        prompt_ids[b, P - len(PROMPTS[p]):] = torch.tensor(PROMPTS[p])
        prompt_mask[b, P - len(PROMPTS[p]):] = 1
        completion_ids[b, :len(c)] = torch.tensor(c)
        completion_mask[b, :len(c)] = 1
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def _trl_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    ids = torch.cat([prompt_ids, completion_ids], 1)
    mask = torch.cat([prompt_mask, completion_mask], 1)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    C = completion_ids.shape[1]
    logits = logits[:, -C - 1:-1].float() / TEMPERATURE
    return torch.log_softmax(logits, -1).gather(-1, completion_ids[..., None]).squeeze(-1)


def _trainer(loss_type, beta, max_completion_length):
    """A stand-in GRPOTrainer with what `_compute_loss` reads (one process, no accumulation)."""
    t = GRPOTrainer.__new__(GRPOTrainer)
    acc = SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction="sum": x,
                          gather_for_metrics=lambda x: x, sync_gradients=True)
    fields = dict(loss_type=loss_type, beta=beta, epsilon_low=0.2, epsilon_high=0.28, top_entropy_quantile=1.0,
                  off_policy_mask_threshold=None, importance_sampling_level="token", use_vllm=False,
                  vllm_importance_sampling_correction=False, _entropy_bonus_enabled=False, aux_loss_enabled=False,
                  current_gradient_accumulation_steps=1, max_completion_length=max_completion_length,
                  args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
                  _metrics={"train": __import__("collections").defaultdict(list)}, temperature=TEMPERATURE)
    t.__dict__.update(fields)
    object.__setattr__(t, "accelerator", acc)
    return t


@pytest.mark.parametrize("mask_truncated", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.05])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_loss_and_lora_gradients_equal_trl(models, loss_type, beta, mask_truncated):
    ours, theirs = models
    prompt_of = [i // G for i in range(len(COMPLETIONS))]
    gen = torch.Generator().manual_seed(5)
    old = [torch.randn(len(c), generator=gen) * 0.3 - 2.0 for c in COMPLETIONS]  # an older policy's log-probs
    ref = [torch.randn(len(c), generator=gen) * 0.3 - 2.0 for c in COMPLETIONS]
    # rows of 12 tokens: the 6 documents (6..12 tokens) fill 5 rows, 2 per micro-batch: several micro-batches
    rollout = Rollout([0, 1], COMPLETIONS, TRUNCATED, ADVANTAGES, old_logps=old, ref_logps=ref if beta else None)
    micro = rollout_batches(rollout, PROMPTS, num_generations=G, loss_type=loss_type, max_completion_length=L,
                            mask_truncated=mask_truncated, max_seq_len=12, micro_batch_size=2, pad_token_id=0)
    assert len(micro) > 1
    objective = GRPOLoss(beta=beta, epsilon=0.2, epsilon_high=0.28, temperature=TEMPERATURE, chunk_size=4)
    count = sum(objective.count(b) for b in micro)
    ours.zero_grad()
    total = 0.0
    for b in micro:
        loss_sum, _ = objective.loss_sum(ours, b)
        (loss_sum / count).backward()
        total += float(loss_sum.detach()) / count

    prompt_ids, prompt_mask, completion_ids, completion_mask = _padded(prompt_of, COMPLETIONS)
    pad = lambda xs: torch.nn.utils.rnn.pad_sequence(xs, batch_first=True)  # noqa: E731
    if mask_truncated:  # TRL zeroes the truncated rows' completion mask
        completion_mask = completion_mask * (~torch.tensor(TRUNCATED)).unsqueeze(1).long()
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": torch.tensor(ADVANTAGES),
              "old_per_token_logps": pad(old), "num_items_in_batch": completion_mask.sum()}
    if beta:
        inputs["ref_per_token_logps"] = pad(ref)
    trainer = _trainer(loss_type, beta, L)
    object.__setattr__(trainer, "model", theirs)
    trainer._get_per_token_logps_and_entropies = lambda model, ids, mask, keep, **kw: (
        _trl_logps(model, inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"], mask[:, -keep:]),
        torch.zeros(ids.shape[0], keep), None)
    theirs.zero_grad()
    expected = trainer._compute_loss(theirs, inputs)
    expected.backward()

    assert total == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
    grads = {n: p.grad for n, p in lora_state_dict(ours).items()}
    theirs_grads = {n.replace("base_model.model.", "").replace(".default", ""): p.grad
                    for n, p in theirs.named_parameters() if p.requires_grad}
    assert grads.keys() == theirs_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], theirs_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def _trl_advantages(rewards_per_func, weights, num_generations, scale_rewards):
    """TRL's own advantage code, cut from GRPOTrainer._generate_and_score_completions and run as is."""
    lines = inspect.getsource(GRPOTrainer._generate_and_score_completions).splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if "unscorable_mask = torch.isnan(rewards_per_func)" in line)
    end = next(i for i, line in enumerate(lines) if "advantages = torch.nan_to_num(advantages, nan=0.0)" in line)
    block = textwrap.dedent("".join(lines[start:end + 1]))
    trainer = SimpleNamespace(multi_objective_aggregation="sum_then_normalize", reward_weights=weights,
                              scale_rewards=scale_rewards, reward_funcs=[None] * weights.numel())
    scope = {"self": trainer, "rewards_per_func": rewards_per_func, "num_generations": num_generations,
             "device": "cpu", "torch": torch, "nanstd": trl_nanstd}
    exec(block, scope)  # noqa: S102 - TRL's source, the oracle
    return scope["advantages"], scope["is_std_zero"]


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_advantages_equal_trl(scale_rewards):
    nan = float("nan")
    rewards = torch.tensor([[1.0, 0.5], [0.0, nan], [1.0, 0.5], [nan, nan],        # group 0: one unscored
                            [0.2, 0.2], [0.2, 0.2], [0.2, 0.2], [0.2, 0.2],        # group 1: all equal
                            [3.0, nan], [nan, 1.0], [0.5, 0.0], [2.0, 2.0]])       # group 2
    weights = torch.tensor([1.0, 0.5])
    expected, expected_zero = _trl_advantages(rewards.clone(), weights, 4, scale_rewards)
    adv, _, std_zero = engine_advantages(rewards.clone(), weights, 4, scale_rewards)
    torch.testing.assert_close(adv, expected, rtol=0, atol=0)
    assert std_zero.tolist() == expected_zero.tolist()
    if scale_rewards != "batch":  # the all-equal group is the zero-std one (batch: the rollout's std)
        assert std_zero.view(3, 4)[1].all() and not std_zero.view(3, 4)[0].any()
        assert (adv.view(3, 4)[1] == 0).all()
