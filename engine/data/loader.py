"""Tokenized documents -> micro-batches: packed (several documents per row) or padded.

Packed row of max_seq_len = 10 holding documents A (4 tokens) and B (3), then 3 pad tokens:

    input_ids     a0 a1 a2 a3 b0 b1 b2 P  P  P
    position_ids   0  1  2  3  0  1  2 0  1  2      restart per document (padding = one more "document")
    labels        a1 a2 a3 -  b1 b2 -  -  -  -      shifted; "-" = -100; a document's last token
                                                     never predicts the next document's first
    attention (built by transformers from position_ids, no attention_mask passed):

         a0 a1 a2 a3 b0 b1 b2
    a0   1
    a1   1  1
    a2   1  1  1
    a3   1  1  1  1
    b0               1
    b1               1  1
    b2               1  1  1

The model forward must get `use_cache=False` and no attention_mask (FIELD.md bug 2): transformers 5
only derives this block-diagonal mask from position_ids when there is no KV cache and no mask.

Padded mode: one document per row, right-padded to the longest in the micro-batch, with an
attention_mask [B, T] (1 = real token). In both modes rows are only as long as the longest row of
their micro-batch (never longer than max_seq_len): no compute is spent on padding to max_seq_len.

Order: each epoch e is planned from numpy's PCG64 seeded with (seed, e): documents are shuffled,
packed best-fit-decreasing (ties broken by the shuffled order), and the rows shuffled again.
`iter(loader)` goes on forever, epoch after epoch; `loader.epoch_batches(epoch)` (or
`loader.one_pass()`) is one pass over one epoch that leaves the loader's position alone (use it
for evaluation, with shuffle=False).
With world_size W each epoch's global batch list is truncated to a multiple of W and rank r
takes batches r, r + W, r + 2W, ... (disjoint shares, same number of steps on every rank).
"""

from __future__ import annotations

import bisect
from typing import Iterator

import numpy as np
import torch

from engine.data.render import IGNORE_INDEX
from engine.model.packing import packing_context


def pack_documents(lengths: list[int], max_len: int, order: list[int] | np.ndarray | None = None) -> list[list[int]]:
    """Best-fit decreasing bin packing of documents into rows of max_len tokens.

    Documents are taken longest first (stable with respect to `order`, default 0..n-1); each goes
    into the open row with the least room that still fits it, or opens a new row. BFD uses at
    most 11/9 OPT + 6/9 rows (Dosa 2007). Returns rows as lists of document indices.
    """
    order = list(range(len(lengths))) if order is None else [int(i) for i in order]
    order.sort(key=lambda i: -lengths[i])  # stable: equal lengths keep the shuffled order
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, row index)
    for i in order:
        n = lengths[i]
        if n > max_len:
            raise ValueError(f"document {i} has {n} tokens > max_seq_len {max_len}")
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            room, r = free.pop(j)
        else:
            room, r = max_len, len(rows)
            rows.append([])
        rows[r].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, r))
    return rows


def packing_efficiency(lengths: list[int], max_len: int) -> float:
    """Share of non-pad tokens when the documents are packed into rows of exactly max_len tokens."""
    rows = pack_documents(lengths, max_len)
    return sum(lengths) / (len(rows) * max_len) if rows else 0.0


class Loader:
    """Deterministic, resumable micro-batch iterator over a TokenizedDataset (see module docstring)."""

    def __init__(self, dataset, *, max_seq_len: int, micro_batch_size: int, packing: bool, seed: int,
                 pad_token_id: int, shuffle: bool = True, drop_last: bool = False, rank: int = 0,
                 world_size: int = 1, pin_memory: bool = False):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: set tokenizer.pad_token (e.g. to the EOS token)")
        self.docs = dataset.docs if hasattr(dataset, "docs") else list(dataset)
        self.lengths = [len(d["input_ids"]) for d in self.docs]
        for d, n in zip(self.docs, self.lengths):
            if n > max_seq_len:
                raise ValueError(f"document from source line {d.get('source_line', '?')} has {n} tokens "
                                 f"> max_seq_len {max_seq_len}; load the dataset with the same max_seq_len")
        self.max_seq_len, self.micro_batch_size, self.packing = max_seq_len, micro_batch_size, packing
        self.seed, self.pad_token_id, self.shuffle, self.drop_last = seed, pad_token_id, shuffle, drop_last
        self.rank, self.world_size, self.pin_memory = rank, world_size, pin_memory
        self._epoch, self._index = 0, 0
        self._plan_cache: tuple[int, list[list[list[int]]]] | None = None
        # Batches per epoch do not depend on the epoch: best-fit decreasing sees the lengths in
        # sorted order, and the shuffle only swaps equal-length documents.
        self._len = len(self.plan(0)) if self.docs else 0
        if self._len == 0:
            raise ValueError(f"the dataset ({len(self.docs)} documents) makes fewer batches than "
                             f"world_size={world_size} (micro_batch_size={micro_batch_size}, drop_last={drop_last})")

    # ---- planning -------------------------------------------------------------------------
    def _global_plan(self, epoch: int) -> list[list[list[int]]]:
        """All ranks' batches of one epoch: batch -> rows -> document indices."""
        rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
        n = len(self.docs)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.packing:
            rows = pack_documents(self.lengths, self.max_seq_len, order)
            if self.shuffle:
                rows = [rows[i] for i in rng.permutation(len(rows))]
        else:
            rows = [[int(i)] for i in order]
        B = self.micro_batch_size
        batches = [rows[i:i + B] for i in range(0, len(rows), B)]
        if self.drop_last and batches and len(batches[-1]) < B:
            batches.pop()
        return batches[: len(batches) // self.world_size * self.world_size]

    def plan(self, epoch: int) -> list[list[list[int]]]:
        """This rank's batches of one epoch (rank r takes global batches r, r + W, ...)."""
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            self._plan_cache = (epoch, self._global_plan(epoch)[self.rank::self.world_size])
        return self._plan_cache[1]

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return self._len

    @property
    def epoch(self) -> int:
        return self._epoch

    # ---- batches --------------------------------------------------------------------------
    def collate(self, rows: list[list[int]]) -> dict:
        """Rows of document indices -> the batch dict of DESIGN.md."""
        T = max(sum(self.lengths[i] for i in row) for row in rows)
        B = len(rows)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((B, T), dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        num_tokens = 0
        doc_lengths = []  # per row; the padding at a row's end counts as one more document
        for b, row in enumerate(rows):
            t = 0
            for i in row:
                n = self.lengths[i]
                input_ids[b, t:t + n] = torch.tensor(self.docs[i]["input_ids"])
                labels[b, t:t + n] = torch.tensor(self.docs[i]["labels"])
                position_ids[b, t:t + n] = torch.arange(n)
                t += n
            attention_mask[b, :t] = 1
            num_tokens += t
            # padding: positions restart (packed) or continue (padded, masked out anyway)
            position_ids[b, t:] = torch.arange(T - t) if self.packing else torch.arange(t, T)
            doc_lengths.append([self.lengths[i] for i in row] + ([T - t] if t < T else []))
        packing = packing_context(labels, doc_lengths, num_tokens=num_tokens, packed=self.packing)
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                 "num_tokens": num_tokens, "num_loss_tokens": packing.num_loss_tokens, "packing": packing}
        if not self.packing:
            batch["attention_mask"] = attention_mask
        if self.pin_memory:  # a GPU run: the step's non_blocking copy then overlaps queued work
            batch = {k: v.pin_memory() if hasattr(v, "pin_memory") else v for k, v in batch.items()}
        return batch

    def epoch_batches(self, epoch: int | None = None) -> Iterator[dict]:
        """One pass over this rank's batches of `epoch` (default: the current one); does not move
        the loader's position. For evaluation build the loader with shuffle=False."""
        for rows in self.plan(self._epoch if epoch is None else epoch):
            yield self.collate(rows)

    def one_pass(self) -> Iterator[dict]:
        """Alias of epoch_batches() for the current epoch (what evaluation calls)."""
        return self.epoch_batches()

    def __iter__(self) -> Iterator[dict]:
        """Forever, from the current position; the position advances as batches are handed out,
        so state_dict() taken after k batches resumes at batch k + 1."""
        while True:
            plan = self.plan(self._epoch)
            while self._index < len(plan):
                rows = plan[self._index]
                self._index += 1
                yield self.collate(rows)
            self._epoch, self._index = self._epoch + 1, 0

    # ---- resume ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "index": self._index, "seed": self.seed, "num_docs": len(self.docs),
                "world_size": self.world_size, "micro_batch_size": self.micro_batch_size,
                "packing": self.packing, "batches_per_epoch": len(self)}

    def load_state_dict(self, state: dict) -> None:
        """Restore the position; the loader must have been built the same way (checked)."""
        for key in ("seed", "num_docs", "world_size", "micro_batch_size", "packing", "batches_per_epoch"):
            mine = self.state_dict()[key]
            if state.get(key) != mine:
                raise ValueError(f"loader state key '{key}': checkpoint has {state.get(key)!r}, this loader "
                                 f"has {mine!r} (different data or loader settings; cannot resume the order)")
        self._epoch, self._index = int(state["epoch"]), int(state["index"])


def make_loader(dataset, *, max_seq_len: int, micro_batch_size: int, packing: bool, seed: int,
                pad_token_id: int, shuffle: bool = True, drop_last: bool = False, rank: int = 0,
                world_size: int = 1, pin_memory: bool = False) -> Loader:
    """Build the micro-batch Loader for a TokenizedDataset (see the module docstring).
    pin_memory: batches in page-locked host memory (for a GPU: asynchronous copies)."""
    return Loader(dataset, max_seq_len=max_seq_len, micro_batch_size=micro_batch_size, packing=packing,
                  seed=seed, pad_token_id=pad_token_id, shuffle=shuffle, drop_last=drop_last,
                  rank=rank, world_size=world_size, pin_memory=pin_memory)
