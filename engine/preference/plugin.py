"""DPO and ORPO as the loop's objective plugin (engine/training/objective.py).

Data: {prompt, chosen, rejected} pairs (engine/preference/data.py), both sides packed
(batches.py). Loss: `DPOObjective` / `ORPOObjective` (objective.py), counted in pairs.
Evaluation: the held-out loss, reward accuracy and margin, preference accuracy (run.py); the
summary adds the base model's preference accuracy as "before".
"""

from __future__ import annotations

from engine.preference.objective import build_objective
from engine.preference.run import (load_pair_data, preference_accuracy, preference_eval, prepare_reference,
                                   reference_cache_file)
from engine.training import amp
from engine.training.objective import RunSetup
from engine.training.prefetch import Prefetcher


class Preference:
    def __init__(self, setup: RunSetup):
        cfg, ctx = setup.cfg, setup.ctx
        self.setup, self.name = setup, cfg.objective.name
        # auto: 1 row of 2 x max_seq_len
        self.train_set, self.eval_set, self.loader = load_pair_data(
            cfg, setup.tokenizer, packing=setup.packing, rank=ctx.rank, world_size=ctx.world_size,
            micro_batch_size=1 if cfg.train.micro_batch_size == "auto" else cfg.train.micro_batch_size,
            pin_memory=setup.device.type == "cuda")
        self.loss = build_objective(cfg.objective, chunk_size=setup.chunk_size)

    def batches(self, grad_accum: int) -> Prefetcher:
        return Prefetcher(self.loader, grad_accum, self.setup.device)

    def _batching(self) -> dict:
        s = self.setup
        return dict(max_seq_len=s.cfg.data.max_seq_len, packing=self.loader.packing, precision=s.precision,
                    device=s.device, pad_token_id=s.tokenizer.pad_token_id)

    def before_training(self) -> None:
        s, cfg = self.setup, self.setup.cfg
        if not cfg.objective.precompute_ref:  # once per dataset, cached beside the tokenized pairs
            return
        prepare_reference(self.loss, s.model, self.train_set, max_seq_len=cfg.data.max_seq_len,
                          micro_batch_size=self.loader.micro_batch_size, packing=self.loader.packing,
                          pad_token_id=s.tokenizer.pad_token_id, device=s.device,
                          autocast=lambda: amp.autocast(s.precision, s.device),
                          cache_file=reference_cache_file(cfg, s.tokenizer, precision=s.precision,
                                                          packing=self.loader.packing,
                                                          micro_batch_size=self.loader.micro_batch_size))

    def evaluate(self, step: int) -> dict | None:
        if self.eval_set is None:
            return None
        result = preference_eval(self.setup.model, self.loss, self.eval_set, batch_size=self.setup.cfg.eval.batch_size,
                                 **self._batching())
        return {k: v for k, v in result.items() if k != "pairs"}

    def step_counts(self, micro: list[dict], count: int) -> dict[str, int]:
        return {"tokens": sum(b["num_tokens"] for b in micro), "loss_tokens": sum(b["num_loss_tokens"] for b in micro),
                "pairs": count}  # the objective counts pairs

    def log_metrics(self) -> dict:
        return {}

    def summary(self, before: dict | None, after: dict | None, counters: dict) -> dict:
        if self.eval_set is None:
            return {}
        before_accuracy = preference_accuracy(self.setup.model, self.eval_set, base=True,
                                              batch_size=self.setup.cfg.eval.batch_size,
                                              chunk_size=self.loss.chunk_size, **self._batching())
        return {"objective": self.name, "pairs": counters.get("pairs", 0), "preference_accuracy_before": before_accuracy,
                "preference_accuracy_after": after["preference_accuracy"]}

    def summary_rows(self, summary: dict) -> list[tuple]:
        if "preference_accuracy_before" not in summary:
            return []
        return [("held-out preference accuracy", summary["preference_accuracy_before"],
                 summary["preference_accuracy_after"])]

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
