"""Pair documents -> micro-batches with chosen and rejected in one forward, padding-free.

Packed (the default): pairs are packed best-fit-decreasing into rows of 2 x max_seq_len tokens
(a pair's two sides each fit max_seq_len), and each side is its own document: position_ids
restart at both sides' starts, so attention is block-diagonal exactly as for SFT packing
(engine/data/loader.py) and no pad token is computed except the tail of the shortest rows.
Padded (a model that leaks across packed documents, engine/model/isolation.py): one side per
row, right-padded, with an attention_mask.

Besides input_ids / labels / position_ids (/ attention_mask) and the packing context
(engine/model/packing.py: every side a document, `label_index` [N] / `label_targets` [N] the
labelled tokens in row-major order), the host builds what the device needs to sum each side's
reply log-probs without a sync (no boolean indexing):

    label_seq    [N] long   which sequence each labelled token belongs to: pair p's chosen side is
                            p, its rejected side P + p (same order as packing.label_index)
    seq_tokens   [2P] fp32  labelled tokens per sequence (ORPO's per-token average)
    num_pairs    P (int), num_tokens, num_loss_tokens (ints), pair_index [P] (dataset indices)

so logp[s] = index_add over label_seq of log softmax(z)[label_targets] gives the [2P] sums.
"""

from __future__ import annotations

import torch

from engine.data.loader import Loader
from engine.data.render import IGNORE_INDEX
from engine.model.packing import packing_context


class PairLoader(Loader):
    """The engine's Loader (order, epochs, ranks, resume state) with pairs as the unit; rows of
    2 x max_seq_len tokens when packed (module docstring)."""

    def __init__(self, dataset, *, max_seq_len: int, **kwargs):
        self.side_len = max_seq_len
        super().__init__(dataset, max_seq_len=2 * max_seq_len, **kwargs)

    def _sides(self, i: int) -> list[tuple[list[int], list[int]]]:
        d, s = self.docs[i], self.docs[i]["split"]
        return [(d["input_ids"][:s], d["labels"][:s]), (d["input_ids"][s:], d["labels"][s:])]

    def collate(self, rows: list[list[int]]) -> dict:
        pairs = [i for row in rows for i in row]
        P = len(pairs)
        slot = {i: k for k, i in enumerate(pairs)}
        # each output row: a list of (sequence id, ids, labels)
        if self.packing:
            out_rows = [[(slot[i] + side * P, *self._sides(i)[side]) for i in row for side in (0, 1)] for row in rows]
        else:
            out_rows = [[(slot[i] + side * P, *self._sides(i)[side])] for side in (0, 1) for i in pairs]
        T = max(sum(len(ids) for _, ids, _ in row) for row in out_rows)
        B = len(out_rows)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((B, T), dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        seq: list[int] = []
        seq_tokens = [0] * (2 * P)
        num_tokens = 0
        doc_lengths = []  # per row; the padding at a row's end counts as one more document
        for b, row in enumerate(out_rows):
            t = 0
            for s, ids, lab in row:
                n = len(ids)
                input_ids[b, t:t + n] = torch.tensor(ids)
                labels[b, t:t + n] = torch.tensor(lab)
                position_ids[b, t:t + n] = torch.arange(n)
                k = sum(1 for y in lab if y != IGNORE_INDEX)
                seq += [s] * k  # row-major, like the packing context's label_index
                seq_tokens[s] += k
                t += n
            attention_mask[b, :t] = 1
            num_tokens += t
            position_ids[b, t:] = torch.arange(T - t) if self.packing else torch.arange(t, T)
            doc_lengths.append([len(ids) for _, ids, _ in row] + ([T - t] if t < T else []))
        packing = packing_context(labels, doc_lengths, num_tokens=num_tokens, packed=self.packing)
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "packing": packing,
                 "label_seq": torch.tensor(seq, dtype=torch.long),
                 "seq_tokens": torch.tensor(seq_tokens, dtype=torch.float32),
                 "pair_index": torch.tensor(pairs, dtype=torch.long),
                 "num_pairs": P, "num_tokens": num_tokens, "num_loss_tokens": packing.num_loss_tokens}
        if not self.packing:
            batch["attention_mask"] = attention_mask
        if self.pin_memory:  # a GPU run: the step's non_blocking copy then overlaps queued work
            batch = {k: v.pin_memory() if hasattr(v, "pin_memory") else v for k, v in batch.items()}
        return batch


def make_pair_loader(dataset, *, max_seq_len: int, micro_batch_size: int, packing: bool, seed: int,
                     pad_token_id: int, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                     pin_memory: bool = False) -> PairLoader:
    """A PairLoader over a PairDataset; micro_batch_size counts rows (packed) or pairs (padded)."""
    return PairLoader(dataset, max_seq_len=max_seq_len, micro_batch_size=micro_batch_size, packing=packing,
                      seed=seed, pad_token_id=pad_token_id, shuffle=shuffle, rank=rank, world_size=world_size,
                      pin_memory=pin_memory)
