"""Supervised fine-tuning as the loop's objective plugin (engine/training/objective.py).

Data: any JSONL format engine/data reads, tokenized with loss masks, packed by the Loader.
Loss: `CausalLM` (labelled-token cross-entropy, counted in tokens). Evaluation: the held-out
token-weighted loss and perplexity; with `eval.generate` greedy generation scores before / after.
"""

from __future__ import annotations

import math
from dataclasses import replace

from engine import plan as planner
from engine.data import load_dataset, make_loader
from engine.evaluate import adapter_scores, before_after_scores, heldout_loss
from engine.training.objective import CausalLM, RunSetup
from engine.training.prefetch import Prefetcher


class SFT:
    name = "sft"

    def __init__(self, setup: RunSetup):
        cfg, ctx = setup.cfg, setup.ctx
        self.setup = setup
        self.train_set = load_dataset(cfg.data.train_path, setup.tokenizer, cfg.data)
        self.eval_set = load_dataset(cfg.data.eval_path, setup.tokenizer, cfg.data) if cfg.data.eval_path else None
        micro_batch_size = cfg.train.micro_batch_size
        if micro_batch_size == "auto":  # planned for the rows really used (padded ones carry a mask: a little more memory)
            micro_batch_size = planner.auto_micro_batch_size(
                replace(cfg, data=replace(cfg.data, packing=setup.packing)), setup.model, **setup.planner_terms)
        self.loader = make_loader(self.train_set, max_seq_len=cfg.data.max_seq_len, micro_batch_size=micro_batch_size,
                                  packing=setup.packing, seed=cfg.train.seed, pad_token_id=setup.tokenizer.pad_token_id,
                                  rank=ctx.rank, world_size=ctx.world_size, pin_memory=setup.device.type == "cuda")
        self.loss = CausalLM(setup.chunk_size, setup.kernels)

    def batches(self, grad_accum: int) -> Prefetcher:
        return Prefetcher(self.loader, grad_accum, self.setup.device)

    def before_training(self) -> None:
        pass

    def evaluate(self, step: int) -> dict | None:
        if self.eval_set is None:
            return None
        s, cfg = self.setup, self.setup.cfg
        result = heldout_loss(s.model, self.eval_set, max_seq_len=cfg.data.max_seq_len, batch_size=cfg.eval.batch_size,
                              packing=self.loader.packing, precision=s.precision, device=s.device,
                              pad_token_id=s.tokenizer.pad_token_id, chunk_size=s.chunk_size, ctx=s.ctx)
        return {"loss": result["loss"], "ppl": result["ppl"]}

    def generation_scores(self) -> dict:
        """Base + adapter's generation scores now (exact match, ...): an early-stopping metric that is one."""
        s = self.setup
        return adapter_scores(s.model, s.tokenizer, s.cfg, device=s.device, precision=s.precision)

    def step_counts(self, micro: list[dict], count: int) -> dict[str, int]:
        return {"tokens": sum(b["num_tokens"] for b in micro), "loss_tokens": sum(b["num_loss_tokens"] for b in micro)}

    def log_metrics(self) -> dict:
        return {}

    def summary(self, before: dict | None, after: dict | None, counters: dict) -> dict:
        s, cfg = self.setup, self.setup.cfg
        if cfg.eval.generate and self.eval_set is not None:
            return {"scores": before_after_scores(s.model, s.tokenizer, cfg, device=s.device, precision=s.precision,
                                                  ctx=s.ctx)}
        return {}

    def summary_rows(self, summary: dict) -> list[tuple]:
        before, after = summary["eval_loss_before"], summary["eval_loss_after"]
        rows = []
        if before is not None and after is not None:
            rows.append(("held-out perplexity", f"{math.exp(before):.2f}", f"{math.exp(after):.2f}"))
        for name, pair in (summary.get("scores") or {}).get("table", {}).items():
            rows.append((name, pair["before"], pair["after"]))
        return rows

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
