"""A rollout as the training step's micro-batches: prompt + completion as one document each,
packed into rows without padding between documents, every per-token number beside it.

    document i   = prompt_ids(p_i) + completion_ids_i          (p_i = i // G)
    labels       = completion tokens only (shifted: the position before each predicts it); the
                   stop token is the last label, nothing after it exists (the rollout cut there)
    row          = documents packed best-fit (engine/data/loader.py::pack_documents), positions
                   restarting per document: each completion sees only its own prompt
    per token    = advantages [n], token_weights [n] (loss_type's 1/|o_i| or 1), old_logps [n]
                   (num_iterations > 1), ref_logps [n] (beta > 0), in label_index order (row-major);
                   token_completion: the completion of each token (a host list)

`grpo_count` is the micro-batch's share of the step's count (engine/grpo/loss.py): completions
(grpo), completion tokens (bnpo, dapo) or completions x max_completion_length (dr_grpo).
Completions masked by mask_truncated_completions carry no tokens but still count where TRL's
denominator counts them (grpo, dr_grpo). Everything here is host work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.data.loader import pack_documents
from engine.model.packing import packing_context
from engine.training.loss import IGNORE_INDEX


@dataclass
class Rollout:
    """One rollout's host record: what its micro-batches are built from (and what a checkpoint keeps)."""

    prompt_index: list[int]              # P indices into the prompt set
    completion_ids: list[list[int]]      # N = P x G, prompt-major
    truncated: list[bool]                # N
    advantages: list[float]              # N
    old_logps: list[torch.Tensor] | None = None   # N tensors [|o_i|] (num_iterations > 1)
    ref_logps: list[torch.Tensor] | None = None   # N tensors [|o_i|] (beta > 0)

    def state(self) -> dict:
        return {"prompt_index": self.prompt_index, "completion_ids": self.completion_ids, "truncated": self.truncated,
                "advantages": self.advantages, "old_logps": self.old_logps, "ref_logps": self.ref_logps}


def trained(rollout: Rollout, mask_truncated: bool) -> list[int]:
    """Indices of the completions whose tokens carry loss."""
    keep = [i for i, t in enumerate(rollout.truncated) if not (mask_truncated and t)]
    return keep or [0]  # all masked: one document with weight 0 keeps the step's shape (a zero gradient)


def rollout_batches(rollout: Rollout, prompt_ids: list[list[int]], *, num_generations: int, loss_type: str,
                    max_completion_length: int, mask_truncated: bool, max_seq_len: int, micro_batch_size: int,
                    pad_token_id: int, packed: bool = True) -> list[dict]:
    """The step's micro-batches (module docstring), the same every time for the same rollout."""
    keep = trained(rollout, mask_truncated)
    docs = []
    for i in keep:
        prompt, completion = prompt_ids[rollout.prompt_index[i // num_generations]], rollout.completion_ids[i]
        ids = prompt + completion
        labels = [IGNORE_INDEX] * (len(prompt) - 1) + completion + [IGNORE_INDEX]
        docs.append((i, ids, labels))
    lengths = [len(ids) for _, ids, _ in docs]
    rows = pack_documents(lengths, max_seq_len) if packed else [[d] for d in range(len(docs))]
    groups = [rows[k:k + micro_batch_size] for k in range(0, len(rows), micro_batch_size)]
    N, L = len(rollout.completion_ids), max_completion_length

    def unit(i: int) -> int:  # completion i's part of the step's count
        masked = mask_truncated and rollout.truncated[i]
        return {"grpo": 1, "dr_grpo": L}.get(loss_type, 0 if masked else len(rollout.completion_ids[i]))

    in_rows = {docs[d][0] for group in groups for row in group for d in row}
    tokens = sum(len(rollout.completion_ids[i]) for i in in_rows if not (mask_truncated and rollout.truncated[i]))
    counts = [sum(unit(docs[d][0]) for row in group for d in row) for group in groups]
    counts[0] += sum(unit(i) for i in range(N) if i not in in_rows)  # masked, left out of the rows
    if sum(counts) == 0:  # nothing to normalise by (every completion masked): a zero loss over 1
        counts[0] = 1
    metric_scale = sum(counts) / max(tokens, 1)  # metric sums / the step's count = per-token means
    batches = []
    for g, group in enumerate(groups):
        batch = _collate(group, docs, lengths, pad_token_id, packed)
        order = [docs[d][0] for row in group for d in row]
        adv, weights, owner, old, ref = [], [], [], [], []
        for i in order:
            n = len(rollout.completion_ids[i])
            adv += [rollout.advantages[i]] * n
            owner += [i] * n
            masked = mask_truncated and rollout.truncated[i]
            weights += [0.0 if masked else (1.0 / n if loss_type == "grpo" else 1.0)] * n
            if rollout.old_logps is not None:
                old.append(rollout.old_logps[i])
            if rollout.ref_logps is not None:
                ref.append(rollout.ref_logps[i])
        batch.update(advantages=torch.tensor(adv, dtype=torch.float32),
                     token_weights=torch.tensor(weights, dtype=torch.float32),
                     token_completion=owner, grpo_count=counts[g], metric_scale=metric_scale,
                     num_completions=len(order) + (N - len(in_rows) if g == 0 else 0))
        if old:
            batch["old_logps"] = torch.cat(old).float()
        if ref:
            batch["ref_logps"] = torch.cat(ref).float()
        batches.append(batch)
    return batches


def _collate(group: list[list[int]], docs, lengths: list[int], pad_token_id: int, packed: bool) -> dict:
    """Rows of document indices -> input_ids, labels, position_ids [B, T] and the packing context."""
    T = max(sum(lengths[d] for d in row) for row in group)
    B = len(group)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    doc_lengths, num_tokens = [], 0
    for b, row in enumerate(group):
        t = 0
        for d in row:
            _, ids, lab = docs[d]
            n = len(ids)
            input_ids[b, t:t + n] = torch.tensor(ids)
            labels[b, t:t + n] = torch.tensor(lab)
            position_ids[b, t:t + n] = torch.arange(n)
            t += n
        position_ids[b, t:] = torch.arange(T - t) if packed else torch.arange(t, T)
        doc_lengths.append([lengths[d] for d in row] + ([T - t] if t < T else []))
        num_tokens += t
    packing = packing_context(labels, doc_lengths, num_tokens=num_tokens, packed=packed)
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "packing": packing,
             "num_tokens": num_tokens, "num_loss_tokens": packing.num_loss_tokens}
    if not packed:
        mask = torch.zeros((B, T), dtype=torch.long)
        for b, row in enumerate(group):
            mask[b, :sum(lengths[d] for d in row)] = 1
        batch["attention_mask"] = mask
    return batch
