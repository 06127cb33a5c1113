"""GRPO as the loop's objective plugin (engine/training/objective.py).

One optimizer step trains on one rollout (TRL's default: steps_per_generation = gradient
accumulation), re-used for num_iterations steps:

    prompts   objective.prompts_per_step per rank, drawn without replacement, epoch by epoch
    rollout   G = num_generations completions each (engine/grpo/rollout.py: LoRA on, sampled at
              temperature / top_p / top_k from this run's own generator)
    rewards   every function of objective.rewards over the decoded completions (rewards.py)
    advantages per group (loss.py); old log-probs (num_iterations > 1) and the reference's
              (beta > 0, adapters off) computed once, no grad, eval mode
    step      the rollout packed into micro-batches (batches.py), GRPOLoss (objective.py), the
              engine's train_step

Resume is exact: the checkpoint holds the prompt order's position, the sampling generator's state
and the rollout in use (with its old / reference log-probs) when it is being re-used. Evaluation
generates greedily for the first eval.max_examples prompts of data.eval_path and reports their
mean reward per function; it writes those completions, and a few sampled ones of the latest
rollout, to completions.jsonl in the run directory.
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from engine.config import ConfigError
from engine.generate import stop_token_ids
from engine.grpo.batches import Rollout, rollout_batches
from engine.grpo.data import load_prompts
from engine.grpo.loss import advantages, nanstd
from engine.grpo.objective import GRPOLoss
from engine.grpo.rewards import load_reward_function, score, unique_names
from engine.grpo.rollout import generate_rollouts
from engine.layers.lora import adapters_disabled
from engine.model.attention import uses_packed_attention
from engine.model.isolation import LEAK_TOLERANCE, tree_leak
from engine.preference.logprobs import token_logps
from engine.training import amp
from engine.training.objective import RunSetup
from engine.training.step import to_device

SAMPLED_GROUPS_SHOWN = 2
"""Groups of the latest rollout written to completions.jsonl at each evaluation."""


class PromptOrder:
    """Prompt indices, `per_step` at a time, each epoch a fresh permutation (seeded); rank r takes
    its own slice of each global draw. Resumable: state_dict / load_state_dict."""

    def __init__(self, n: int, per_step: int, *, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.per_step, self.seed, self.rank, self.world_size = n, per_step, seed, rank, world_size
        self.epoch, self.index = 0, 0

    def _perm(self) -> list[int]:
        return np.random.Generator(np.random.PCG64([self.seed, self.epoch])).permutation(self.n).tolist()

    def next(self) -> list[int]:
        want, out = self.per_step * self.world_size, []
        while len(out) < want:
            perm = self._perm()
            take = perm[self.index:self.index + want - len(out)]
            out += take
            self.index += len(take)
            if self.index >= self.n:
                self.epoch, self.index = self.epoch + 1, 0
        return out[self.rank * self.per_step:(self.rank + 1) * self.per_step]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "num_prompts": self.n,
                "per_step": self.per_step, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_prompts", "per_step", "world_size"):
            if state.get(key) != self.state_dict()[key]:
                raise ValueError(f"prompt order state key '{key}': checkpoint has {state.get(key)!r}, this run has "
                                 f"{self.state_dict()[key]!r} (different prompts or settings; cannot resume the order)")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


class GRPO:
    name = "grpo"

    def __init__(self, setup: RunSetup):
        cfg, ctx, o = setup.cfg, setup.ctx, setup.cfg.objective
        self.setup, self.o = setup, o
        max_prompt = cfg.data.max_seq_len - o.max_completion_length
        if max_prompt < 1:
            raise ConfigError(f"config key 'data.max_seq_len': {cfg.data.max_seq_len} leaves no room for a prompt "
                              f"beside objective.max_completion_length={o.max_completion_length}")
        load = dict(max_prompt_tokens=max_prompt, on_bad_line=cfg.data.on_bad_line, announce=ctx.is_main,
                    columns=cfg.data.columns)
        self.train_set = load_prompts(cfg.data.train_path, setup.tokenizer, **load)
        self.eval_set = load_prompts(cfg.data.eval_path, setup.tokenizer, **load) if cfg.data.eval_path else None
        self.functions = [load_reward_function(spec) for spec in o.rewards]
        self.reward_names = unique_names(self.functions)
        self.weights = torch.tensor([float(w) for w in (o.reward_weights or [1.0] * len(self.functions))])
        self.order = PromptOrder(len(self.train_set), o.prompts_per_step, seed=cfg.train.seed, rank=ctx.rank,
                                 world_size=ctx.world_size)
        self.generator = torch.Generator().manual_seed(cfg.train.seed + 7919 * ctx.rank)
        self.stops = stop_token_ids(setup.tokenizer)
        rows = 1 if cfg.train.micro_batch_size == "auto" else cfg.train.micro_batch_size
        self.loader = _LoaderView(packing=setup.packing, micro_batch_size=rows)
        self.share_prompt = o.share_prompt and _trees_honoured(setup, announce=ctx.is_main)
        self.loss = GRPOLoss(beta=o.beta, epsilon=o.epsilon, epsilon_high=o.epsilon_high, temperature=o.temperature,
                             chunk_size=setup.chunk_size)
        self.rollout: Rollout | None = None
        self.used = 0                    # optimizer steps taken on self.rollout
        self._next: list[dict] | None = None
        self._window: dict[str, list[float]] = defaultdict(list)
        self._latest_samples: list[dict] = []
        self._decode_said = False
        if ctx.is_main:
            print(f"grpo: {o.prompts_per_step} prompts x {o.num_generations} generations = "
                  f"{o.prompts_per_step * o.num_generations} completions per rollout (per rank), "
                  f"{o.num_iterations} optimizer step(s) per rollout; completions of <= {o.max_completion_length} "
                  f"tokens trained in packed rows of {cfg.data.max_seq_len} tokens, {rows} row(s) per forward"
                  f"{', each prompt once per group (share_prompt)' if self.share_prompt else ''}; "
                  f"{len(self.train_set)} training prompts, rewards: {', '.join(self.reward_names)}", file=sys.stderr)

    # ---- batches ----------------------------------------------------------------------------
    def batches(self, grad_accum: int):
        return self

    def prepare(self) -> None:
        if self._next is None:
            self._next = self._fetch()

    def peek(self) -> list[dict]:
        """The next step's micro-batches without taking them (the fp16 guard probes the first)."""
        self.prepare()
        return self._next[0]

    def take(self) -> list[dict]:
        self.prepare()
        (micro, stats), self._next = self._next, None
        for key, value in stats.items():  # the rollout's numbers belong to the step that trains on it
            self._window[key].append(value)
        return micro

    def _fetch(self) -> tuple[list[dict], dict]:
        """The next step's micro-batches (a new rollout every num_iterations steps) and the new rollout's stats."""
        stats = {}
        if self.rollout is None or self.used >= self.o.num_iterations:
            (self.rollout, stats), self.used = self._roll_out(), 0
        self.used += 1
        return [to_device(b, self.setup.device) for b in self._batches(self.rollout)], stats

    def _batches(self, rollout: Rollout) -> list[dict]:
        s, o = self.setup, self.o
        return rollout_batches(rollout, [p.prompt_ids for p in self.train_set], num_generations=o.num_generations,
                               loss_type=o.loss_type, max_completion_length=o.max_completion_length,
                               mask_truncated=o.mask_truncated_completions, max_seq_len=s.cfg.data.max_seq_len,
                               micro_batch_size=self.loader.micro_batch_size, pad_token_id=s.tokenizer.pad_token_id,
                               packed=self.loader.packing, share_prompt=self.share_prompt)

    def _generate(self, prompts, *, num_generations: int, greedy: bool):
        s, o = self.setup, self.o
        return generate_rollouts(s.model, [p.prompt_ids for p in prompts], num_generations=num_generations,
                                 max_new_tokens=o.max_completion_length, temperature=0.0 if greedy else o.temperature,
                                 top_p=o.top_p, top_k=o.top_k, stop_token_ids=self.stops,
                                 pad_token_id=s.tokenizer.pad_token_id, generator=None if greedy else self.generator,
                                 autocast_dtype=amp.DTYPES[s.precision] if s.precision in ("bf16", "fp16") else None,
                                 merge_lora=bool(s.kernels.rollout_merge), merged_layout=s.kernels.rollout_merge or None,
                                 dequantize_4bit=s.kernels.rollout_dequantize, lean_decode=s.kernels.rollout_lean_decode)

    def _roll_out(self) -> tuple[Rollout, dict]:
        s, o, G = self.setup, self.o, self.o.num_generations
        index = self.order.next()
        prompts = [self.train_set[i] for i in index]
        out = self._generate(prompts, num_generations=G, greedy=False)
        if not self._decode_said and self.setup.ctx.is_main:  # which decode step rolls out, said once
            print(f"grpo: rollouts decode with {out.decode}", file=sys.stderr)
        self._decode_said = True
        texts = s.tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
        table = torch.tensor(score(self.functions, prompts, texts, out.completion_ids, G), dtype=torch.float32)
        adv, rewards, std_zero = advantages(table, self.weights, G, o.scale_rewards)
        rollout = Rollout(index, out.completion_ids, out.truncated, adv.tolist())
        if o.num_iterations > 1 or o.beta != 0.0:
            self._rollout_logps(rollout)
        stats = self._stats(table, rewards, std_zero, out)
        self._latest_samples = [{"source": prompts[i // G].source, "completion": texts[i],
                                 "rewards": dict(zip(self.reward_names, _floats(table[i]))),
                                 "reward": _float(rewards[i]), "advantage": rollout.advantages[i]}
                                for i in range(min(len(texts), SAMPLED_GROUPS_SHOWN * G))]
        return rollout, stats

    @torch.no_grad()
    def _rollout_logps(self, rollout: Rollout) -> None:
        """Old (num_iterations > 1) and reference (beta > 0) log-probs per completion token, once
        per rollout: no grad, eval mode (no dropout), the training precision's autocast."""
        s, o, model = self.setup, self.o, self.setup.model
        old, ref, owner = [], [], []
        was_training = model.training
        model.eval()
        try:
            for batch in self._batches(rollout):
                owner += batch["token_completion"]
                batch = to_device(batch, s.device)
                with amp.autocast(s.precision, s.device):
                    if o.num_iterations > 1:
                        old.append(token_logps(model, batch, chunk_size=s.chunk_size, temperature=o.temperature))
                    if o.beta != 0.0:
                        with adapters_disabled(model):
                            ref.append(token_logps(model, batch, chunk_size=s.chunk_size, temperature=o.temperature))
        finally:
            model.train(was_training)
        if old:
            rollout.old_logps = _per_completion(torch.cat(old).cpu(), owner, len(rollout.completion_ids))
        if ref:
            rollout.ref_logps = _per_completion(torch.cat(ref).cpu(), owner, len(rollout.completion_ids))

    # ---- what the loop logs -----------------------------------------------------------------
    def _stats(self, table: torch.Tensor, rewards: torch.Tensor, std_zero: torch.Tensor, out) -> dict:
        """One rollout's numbers (TRL's metric names): rewards per function, lengths, zero-std groups."""
        w = {}
        for j, name in enumerate(self.reward_names):
            w[f"rewards/{name}/mean"] = _float(torch.nanmean(table[:, j]))
            w[f"rewards/{name}/std"] = _float(nanstd(table[:, j]))
        w["reward"], w["reward_std"] = _float(torch.nanmean(rewards)), _float(nanstd(rewards))
        # groups whose rewards are all equal: advantage 0, no policy gradient ("loss is 0" with beta = 0)
        w["frac_reward_zero_std"] = float(std_zero.view(-1, self.o.num_generations)[:, 0].float().mean())
        lengths = [len(c) for c in out.completion_ids]
        w["completions/mean_length"] = sum(lengths) / len(lengths)
        w["completions/max_length"] = max(lengths)
        w["completions/clipped_ratio"] = sum(out.truncated) / len(out.truncated)
        return w

    def log_metrics(self) -> dict:
        """Means over the rollouts since the last log step (max_length: the max)."""
        record = {k: (max(v) if k.endswith("max_length") else _nanmean(v)) for k, v in self._window.items() if v}
        self._window = defaultdict(list)
        return record

    def step_counts(self, micro: list[dict], count: int) -> dict[str, int]:
        return {"tokens": sum(b["num_tokens"] for b in micro), "loss_tokens": sum(b["num_loss_tokens"] for b in micro),
                "completions": sum(b["num_completions"] for b in micro)}

    # ---- evaluation -------------------------------------------------------------------------
    def evaluate(self, step: int) -> dict | None:
        if self.eval_set is None:
            return None
        s, cfg = self.setup, self.setup.cfg
        prompts = self.eval_set[:cfg.eval.max_examples]
        texts, ids = [], []
        for k in range(0, len(prompts), cfg.eval.batch_size):
            out = self._generate(prompts[k:k + cfg.eval.batch_size], num_generations=1, greedy=True)
            ids += out.completion_ids
            texts += s.tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
        table = torch.tensor(score(self.functions, prompts, texts, ids, 1), dtype=torch.float32)
        rewards = (table * self.weights[None, :]).nansum(dim=1)
        rewards[torch.isnan(table).all(dim=1)] = torch.nan
        result = {"reward": _float(torch.nanmean(rewards))}
        for j, name in enumerate(self.reward_names):
            result[f"rewards/{name}"] = _float(torch.nanmean(table[:, j]))
        if s.ctx.is_main:
            with open(Path(cfg.output_dir) / "completions.jsonl", "a", encoding="utf-8") as f:
                for p, text, row, r in zip(prompts, texts, table, rewards):
                    f.write(json.dumps({"step": step, "kind": "eval (greedy)", "source": p.source, "prompt": p.prompt,
                                        "completion": text, "rewards": dict(zip(self.reward_names, _floats(row))),
                                        "reward": _float(r)}, ensure_ascii=False) + "\n")
                for sample in self._latest_samples:
                    f.write(json.dumps({"step": step, "kind": "train (sampled)", **sample}, ensure_ascii=False) + "\n")
        return result

    def before_training(self) -> None:
        pass

    def summary(self, before: dict | None, after: dict | None, counters: dict) -> dict:
        out = {"objective": "grpo", "completions": counters.get("completions", 0)}
        if before is not None and after is not None:
            out["heldout_reward"] = {k: {"before": before.get(k), "after": after.get(k)} for k in after}
        return out

    def summary_rows(self, summary: dict) -> list[tuple]:
        table = summary.get("heldout_reward", {})
        rows = [("held-out mean reward (greedy)", table["reward"]["before"], table["reward"]["after"])] if table else []
        rows += [(f"held-out {k.split('/', 1)[1]}", v["before"], v["after"]) for k, v in table.items() if k != "reward"]
        return rows

    # ---- resume ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        reuse = self.rollout is not None and self.used < self.o.num_iterations
        return {"prompts": self.order.state_dict(), "generator": self.generator.get_state(),
                "rollout": self.rollout.state() if reuse else None, "used": self.used if reuse else 0}

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state["prompts"])
        self.generator.set_state(state["generator"])
        self.rollout = Rollout(**state["rollout"]) if state.get("rollout") else None
        self.used, self._next = int(state.get("used", 0)), None


def _trees_honoured(setup: RunSetup, *, announce: bool) -> bool:
    """Can this run train tree documents (objective.share_prompt)? Packed rows, the engine's packed
    attention, and the tree probe (engine/model/isolation.py::tree_leak) finding the tree's branches
    equal to the unshared documents; otherwise False, said once."""
    if not setup.packing:
        why = "rows are padded (data.packing=false or a model whose packed rows leak)"
    elif not uses_packed_attention(setup.model):
        why = "the model does not run the engine's packed attention (speed.disable=[packed_attention], eager)"
    else:
        ratio = tree_leak(setup.model, precision=setup.precision)
        if ratio <= LEAK_TOLERANCE:
            return True
        why = f"the tree probe finds this model's branches see each other (ratio {ratio:.2f})"
    if announce:
        print(f"note: objective.share_prompt: each completion trained with its own copy of the prompt: {why}",
              file=sys.stderr)
    return False


class _LoaderView:
    """What the loop reads of an objective's loader: packing and rows per forward."""

    def __init__(self, *, packing: bool, micro_batch_size: int):
        self.packing, self.micro_batch_size = packing, micro_batch_size


def _per_completion(flat: torch.Tensor, owner: list[int], n: int) -> list[torch.Tensor]:
    """Per-token values [n_tokens] in micro-batch order -> one tensor per completion (empty: not trained)."""
    index = torch.tensor(owner, dtype=torch.long)
    return [flat[index == i].clone() for i in range(n)]


def _float(x) -> float | None:
    v = float(x)
    return None if math.isnan(v) else v


def _floats(row) -> list[float | None]:
    return [_float(v) for v in row]


def _nanmean(values: list) -> float | None:
    kept = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(kept) / len(kept) if kept else None
