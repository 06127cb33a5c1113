"""A rollout as the training step's micro-batches: prompts and completions as documents, packed
into rows without padding between documents, every per-token number beside it.

    share_prompt (objective.share_prompt, packed rows): one *tree document* per group, the prompt once

        document g   = prompt_g + completion_g1 + ... + completion_gG     (engine/model/prefix_tree.py)
        positions    = prompt 0 .. p-1, each completion p .. p+L_i-1 (what the unshared document has)
        attention    = the prompt causal; completion i: the whole prompt + its own earlier tokens
        labels       = completion i's first token predicted at the prompt's last position (the same
                       hidden state for all G: label_index holds that position G times), its token
                       t > 0 at its token t - 1; the stop token is the last label

      The loss and the LoRA gradients are those of the unshared documents (the prompt's hidden
      states do not depend on the completions; its gradients sum over the G branches), for
      P x p x (G - 1) fewer tokens forward and backward. A group too long for one row is split into
      several tree documents, each with the prompt (its completions in order, as many per document
      as fit); a group with one trained completion is a plain document.

    otherwise: one document per completion

        document i   = prompt_ids(p_i) + completion_ids_i          (p_i = i // G)
        labels       = completion tokens only (shifted: the position before each predicts it); the
                       stop token is the last label, nothing after it exists (the rollout cut there)

    row          = documents packed best-fit (engine/data/loader.py::pack_documents), positions
                   restarting per document: each completion sees only its own prompt
    per token    = advantages [n], token_weights [n] (loss_type's 1/|o_i| or 1), old_logps [n]
                   (num_iterations > 1), ref_logps [n] (beta > 0), in label_index order (completion
                   by completion, in row order); token_completion: the completion of each token (a host list)

`grpo_count` is the micro-batch's share of the step's count (engine/grpo/loss.py): completions
(grpo), completion tokens (bnpo, dapo) or completions x max_completion_length (dr_grpo).
Completions masked by mask_truncated_completions carry no tokens but still count where TRL's
denominator counts them (grpo, dr_grpo). Everything here is host work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.data.loader import pack_documents
from engine.model.packing import PackingContext
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
                    pad_token_id: int, packed: bool = True, share_prompt: bool = False) -> list[dict]:
    """The step's micro-batches (module docstring), the same every time for the same rollout.
    `share_prompt` (packed rows only): each group as tree documents, the prompt once."""
    keep = trained(rollout, mask_truncated)
    G = num_generations
    groups_of = [[i for i in keep if i // G == g] for g in range(len(rollout.prompt_index))]
    docs = []
    for g, members in enumerate(groups_of):
        prompt = prompt_ids[rollout.prompt_index[g]]
        if share_prompt and packed:
            for part in _tree_parts(len(prompt), [len(rollout.completion_ids[i]) for i in members], max_seq_len):
                docs.append(_document(prompt, [(members[k], rollout.completion_ids[members[k]]) for k in part]))
        else:
            docs += [_document(prompt, [(i, rollout.completion_ids[i])]) for i in members]
    lengths = [len(d.ids) for d in docs]
    rows = pack_documents(lengths, max_seq_len) if packed else [[d] for d in range(len(docs))]
    micro = [rows[k:k + micro_batch_size] for k in range(0, len(rows), micro_batch_size)]
    N, L = len(rollout.completion_ids), max_completion_length

    def unit(i: int) -> int:  # completion i's part of the step's count
        masked = mask_truncated and rollout.truncated[i]
        return {"grpo": 1, "dr_grpo": L}.get(loss_type, 0 if masked else len(rollout.completion_ids[i]))

    in_rows = {i for d in docs for i in d.completions}
    tokens = sum(len(rollout.completion_ids[i]) for i in in_rows if not (mask_truncated and rollout.truncated[i]))
    counts = [sum(unit(i) for row in group for d in row for i in docs[d].completions) for group in micro]
    counts[0] += sum(unit(i) for i in range(N) if i not in in_rows)  # masked, left out of the rows
    if sum(counts) == 0:  # nothing to normalise by (every completion masked): a zero loss over 1
        counts[0] = 1
    metric_scale = sum(counts) / max(tokens, 1)  # metric sums / the step's count = per-token means
    batches = []
    for g, group in enumerate(micro):
        batch = _collate(group, docs, lengths, pad_token_id, packed)
        order = [i for row in group for d in row for i in docs[d].completions]
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


@dataclass
class _Document:
    """One document of the rows: its tokens, its tree shape (None: plain) and, completion by
    completion, the positions that predict that completion's tokens (in the document)."""

    ids: list[int]
    tree: tuple[int, tuple[int, ...]] | None
    completions: list[int]
    label_positions: list[int]   # per completion in order, one per token: the position predicting it
    label_targets: list[int]


def _document(prompt: list[int], members: list[tuple[int, list[int]]]) -> _Document:
    """prompt + completions as one document: plain for one completion, a tree for several.

        plain   [prompt | c]               c_t predicted at p - 1 + t
        tree    [prompt | c_1 | ... | c_k] c_g's first token at p - 1 (the prompt's last, shared),
                                           c_g's token t > 0 at p + offset_g + t - 1"""
    p = len(prompt)
    ids, positions, targets, offset = list(prompt), [], [], p
    for _, completion in members:
        ids += completion
        positions += [p - 1] + [offset + t for t in range(len(completion) - 1)]
        targets += completion
        offset += len(completion)
    tree = (p, tuple(len(c) for _, c in members)) if len(members) > 1 else None
    return _Document(ids, tree, [i for i, _ in members], positions, targets)


def _tree_parts(prompt_len: int, branch_lengths: list[int], max_seq_len: int) -> list[list[int]]:
    """A group's completions split into tree documents that fit a row: in order, as many per
    document as fit beside the prompt (each one fits alone: prompt + completion <= max_seq_len)."""
    parts, room = [], 0
    for k, n in enumerate(branch_lengths):
        if not parts or n > room:
            parts.append([])
            room = max_seq_len - prompt_len
        parts[-1].append(k)
        room -= n
    return parts


def _collate(group: list[list[int]], docs: list[_Document], lengths: list[int], pad_token_id: int,
             packed: bool) -> dict:
    """Rows of document indices -> input_ids, labels, position_ids [B, T] and the packing context.
    labels marks the positions that predict a token (a tree's prompt end predicts several: the
    context's label_index / label_targets hold each of them, in completion order)."""
    T = max(sum(lengths[d] for d in row) for row in group)
    B = len(group)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    doc_lengths, trees, index, targets, num_tokens = [], [], [], [], 0
    for b, row in enumerate(group):
        t = 0
        for d in row:
            doc = docs[d]
            n = len(doc.ids)
            input_ids[b, t:t + n] = torch.tensor(doc.ids)
            position_ids[b, t:t + n] = _positions(doc, n)
            where = [b * T + t + pos for pos in doc.label_positions]
            labels.view(-1)[torch.tensor(where, dtype=torch.long)] = torch.tensor(doc.label_targets)
            index += where
            targets += doc.label_targets
            t += n
        position_ids[b, t:] = torch.arange(T - t) if packed else torch.arange(t, T)
        doc_lengths.append([lengths[d] for d in row] + ([T - t] if t < T else []))
        trees.append([docs[d].tree for d in row] + ([None] if t < T else []))
        num_tokens += t
    packing = PackingContext(doc_lengths=doc_lengths, label_index=torch.tensor(index, dtype=torch.long),
                             label_targets=torch.tensor(targets, dtype=torch.long), num_tokens=num_tokens,
                             num_loss_tokens=len(index), packed=packed,
                             trees=trees if any(t is not None for row in trees for t in row) else None)
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "packing": packing,
             "num_tokens": num_tokens, "num_loss_tokens": packing.num_loss_tokens}
    if not packed:
        mask = torch.zeros((B, T), dtype=torch.long)
        for b, row in enumerate(group):
            mask[b, :sum(lengths[d] for d in row)] = 1
        batch["attention_mask"] = mask
    return batch


def _positions(doc: _Document, n: int) -> torch.Tensor:
    """A document's position ids: 0 .. n-1, or for a tree the prefix's 0 .. p-1 and each branch's p .. p+L-1."""
    if doc.tree is None:
        return torch.arange(n)
    p, branches = doc.tree
    return torch.cat([torch.arange(p)] + [torch.arange(p, p + m) for m in branches])
