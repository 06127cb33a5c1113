"""What the training loop needs for a preference objective: pair data, loader, held-out evaluation.

Held-out evaluation (every rank evaluates the whole eval file, in order) reports per pair:

    eval_loss                 the objective's loss (DPO: at step 0 the policy is the reference, log 2)
    eval_reward_accuracy      share of pairs whose chosen reward beats the rejected one
    eval_reward_margin        mean reward margin
    eval_preference_accuracy  share of pairs whose chosen reply is more likely than the rejected
                              one, log pi(y_c|x) > log pi(y_r|x) (summed reply log-probs)

and `preference_accuracy(..., base=True)` measures the last one for the base model (adapters off),
the "before" column of the summary. DPO evaluations compute the held-out reference log-probs once
(the base does not change) and keep them on the eval dataset (`ref_table`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from contextlib import nullcontext

import torch
from safetensors.torch import load_file, save_file

from engine.data.render import resolve_template
from engine.data.tokenized import default_cache_dir
from engine.layers.lora import adapters_disabled
from engine.model.build import default_model_path
from engine.preference.batches import make_pair_loader
from engine.preference.data import load_pair_dataset, pair_cache_key
from engine.preference.logprobs import sequence_logps
from engine.training import amp
from engine.training.step import to_device


def load_pair_data(cfg, tokenizer, *, packing: bool, micro_batch_size: int, rank: int, world_size: int,
                   pin_memory: bool = False):
    """(train PairDataset, eval PairDataset or None, PairLoader) for cfg.data's files."""
    train_set = load_pair_dataset(cfg.data.train_path, tokenizer, cfg.data)
    eval_set = load_pair_dataset(cfg.data.eval_path, tokenizer, cfg.data) if cfg.data.eval_path else None
    if rank == 0:
        s = train_set.stats
        print(f"{cfg.objective.name}: {s.kept} training pairs ({s.format}; {len(s.dropped_lines)} dropped, "
              f"{len(s.truncated_lines)} truncated)", file=sys.stderr)
    loader = make_pair_loader(train_set, max_seq_len=cfg.data.max_seq_len, micro_batch_size=micro_batch_size,
                              packing=packing, seed=cfg.train.seed, pad_token_id=tokenizer.pad_token_id,
                              rank=rank, world_size=world_size, pin_memory=pin_memory)
    return train_set, eval_set, loader


def _eval_batches(dataset, *, max_seq_len: int, batch_size: int, packing: bool, pad_token_id: int, device):
    loader = make_pair_loader(dataset, max_seq_len=max_seq_len, micro_batch_size=batch_size, packing=packing,
                              seed=0, pad_token_id=pad_token_id, shuffle=False)
    for batch in loader.one_pass():
        yield to_device(batch, device)


@torch.no_grad()
def preference_eval(model, objective, dataset, *, max_seq_len: int, batch_size: int, packing: bool, precision: str,
                    device: torch.device, pad_token_id: int) -> dict:
    """{"loss", "reward_accuracy", "reward_margin", "rewards_chosen", "rewards_rejected",
    "preference_accuracy", "pairs"} over all of `dataset` (module docstring); one host sync."""
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    total = torch.zeros((), dtype=torch.float64, device=device)
    pairs = 0
    train_table = getattr(objective, "ref_table", None)
    if hasattr(objective, "ref_table"):  # DPO: the eval set's reference, computed at the first evaluation only
        if getattr(dataset, "ref_table", None) is None:
            eval_ref = type(objective)(chunk_size=objective.chunk_size)
            eval_ref.precompute_reference(model, dataset, max_seq_len=max_seq_len, micro_batch_size=batch_size,
                                          packing=packing, pad_token_id=pad_token_id, device=device,
                                          autocast=lambda: amp.autocast(precision, device), announce=False)
            dataset.ref_table = eval_ref.ref_table
        objective.ref_table = dataset.ref_table
    try:
        for batch in _eval_batches(dataset, max_seq_len=max_seq_len, batch_size=batch_size, packing=packing,
                                   pad_token_id=pad_token_id, device=device):
            with amp.autocast(precision, device):
                loss_sum, metrics = objective.loss_sum(model, batch)
            total += loss_sum.double()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v.double()
            pairs += objective.count(batch)
    finally:
        model.train(was_training)
        if hasattr(objective, "ref_table"):
            objective.ref_table = train_table
    keys = ("reward_accuracy", "reward_margin", "rewards_chosen", "rewards_rejected", "preference_accuracy")
    values = torch.stack([total] + [sums[k] for k in keys]).tolist()  # sync: the result
    return {"loss": values[0] / pairs, **{k: v / pairs for k, v in zip(keys, values[1:])}, "pairs": pairs}


@torch.no_grad()
def preference_accuracy(model, dataset, *, max_seq_len: int, batch_size: int, packing: bool, precision: str,
                        device: torch.device, pad_token_id: int, chunk_size: int | None, base: bool = False) -> float:
    """Share of held-out pairs with log pi(chosen) > log pi(rejected); base=True: adapters off
    (the reference table of a DPO evaluation, when there is one: the same numbers)."""
    table = getattr(dataset, "ref_table", None)
    if base and table is not None:
        return float((table[:, 0] > table[:, 1]).sum().item()) / max(len(table), 1)
    was_training = model.training
    model.eval()
    correct, pairs = torch.zeros((), device=device), 0
    try:
        with adapters_disabled(model) if base else nullcontext():
            for batch in _eval_batches(dataset, max_seq_len=max_seq_len, batch_size=batch_size, packing=packing,
                                       pad_token_id=pad_token_id, device=device):
                with amp.autocast(precision, device):
                    logps = sequence_logps(model, batch, chunk_size=chunk_size)
                P = batch["num_pairs"]
                correct += (logps[:P] > logps[P:]).sum()
                pairs += P
    finally:
        model.train(was_training)
    return float(correct.item()) / max(pairs, 1)


REFERENCE_CACHE_VERSION = "engine-reference-v1"


def _model_fingerprint(path: str) -> list:
    """(name, size, mtime) of the model's files: a changed checkpoint misses the reference cache."""
    if path == "default":
        path = default_model_path()
    files = [path] if os.path.isfile(path) else sorted(os.path.join(path, f) for f in os.listdir(path))
    return [(os.path.basename(f), os.path.getsize(f), int(os.path.getmtime(f))) for f in files if os.path.isfile(f)]


def reference_cache_file(cfg, tokenizer, *, precision: str, packing: bool, micro_batch_size: int) -> str:
    """Where the precomputed reference log-probs of cfg.data.train_path are cached: beside the
    tokenized pairs (data.cache_dir), keyed by the pair cache key and everything that changes the
    base model's numbers (model files, dtype, 4-bit quantization, PiSSA's residual, precision, batching)."""
    template, _ = resolve_template(tokenizer)
    p = cfg.peft
    parts = [REFERENCE_CACHE_VERSION, pair_cache_key(cfg.data.train_path, tokenizer, template, cfg.data),
             _model_fingerprint(cfg.model.path), cfg.model.dtype, cfg.model.attn_implementation, p.method,
             p.quant_type, p.double_quant, p.compute_dtype, p.init, p.r if p.init == "pissa" else 0,
             precision, packing, micro_batch_size]
    key = hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]
    return os.path.join(cfg.data.cache_dir or default_cache_dir(), key + ".reference.safetensors")


def prepare_reference(objective, model, train_set, *, cache_file: str | None, **kwargs) -> None:
    """objective.precompute_ref: load the reference table from `cache_file`, or compute it once
    over the whole training set (`DPOObjective.precompute_reference`) and save it there."""
    device = kwargs["device"]
    if cache_file and os.path.isfile(cache_file):
        table = load_file(cache_file).get("reference")
        if table is not None and table.shape == (len(train_set), 2):
            objective.ref_table = table.to(device)
            print(f"reference log-probs of {len(train_set)} pairs loaded from {cache_file}", file=sys.stderr)
            return
    objective.precompute_reference(model, train_set, **kwargs)
    if cache_file:
        os.makedirs(os.path.dirname(cache_file), exist_ok=True)
        tmp = f"{cache_file}.tmp{os.getpid()}"
        save_file({"reference": objective.ref_table.cpu().contiguous()}, tmp)
        os.replace(tmp, cache_file)  # atomic: a crash never leaves half a table
