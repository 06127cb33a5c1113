"""The packing context: what the host knows about one micro-batch, handed to the model's forward once.

A packed row holds several documents back to back; positions restart at each one:

    row b:         [ doc 0 (n0) | doc 1 (n1) | ... | padding ]
    position_ids:  [ 0 .. n0-1  | 0 .. n1-1  | ... | 0 ..    ]
    attention:     block-diagonal causal -- a token sees the earlier tokens of its own document

    doc_lengths    [[n0, n1, ...], ...]   per row, summing to the row's length T (padding counts
                                          as one more document of its own: it attends to nothing real)
    cu_seqlens     [0, n0, n0+n1, ...]    int32, over the flattened [B*T] tokens (every row's documents,
                                          its padding included, one after another): what varlen kernels take;
                                          a CUDA graph's bucket ends it with repeated offsets (zero-length
                                          documents: its size is then fixed per bucket)
    max_doc_length / min_doc_length       host ints: the longest / shortest of them (varlen kernels'
                                          max_seqlen; a nested tensor's bounds); a graph's bucket raises
                                          max_doc_length to its row length (an upper bound, the same
                                          at every replay)
    label_index    [N]                    int64 flat indices (b*T + t) of the tokens that carry a label
    label_targets  [N]                    their labels (the next token)
    label_mask     None, or [N] fp32: 1 for a real label, 0 for a padding entry (a captured CUDA
                   graph's bucket pads label_index to a fixed N with entries the loss must ignore:
                   engine/speed/cuda_graphs.py); None: every entry is real
    trees          None, or per row, per document: None (a plain document) or (prefix, branches),
                   a *tree document* (engine/model/prefix_tree.py): a shared prefix of `prefix`
                   tokens, then branches of the given lengths, each seeing the prefix and itself:

        row b:     [ prompt (p) | completion 1 (L1) | ... | completion G (LG) ]   doc_lengths: p + sum L_i
        positions: [ 0 .. p-1   | p .. p+L1-1       | ... | p .. p+LG-1       ]
        attention: prompt causal; completion i: the whole prompt + its own earlier tokens

                   label_index may then repeat a position (the prompt's last predicts every
                   completion's first token) and need not be sorted: its order is the caller's

The data loader builds it on the host while it builds the batch (it knows every length already),
so neither attention nor the loss ever asks the device where documents start or which tokens carry
a label: no `nonzero`, no boolean indexing, no device-to-host copy in the step. Its tensors
(label_index, label_targets, cu_seqlens) travel to the device with the batch (`to`); the lengths
stay host lists and ints. It travels as one keyword argument, `packing=`, through the model's
forward (transformers hands extra keyword arguments down to the attention function) and is read by
`engine.model.attention`, its document kernels and `engine.training.loss`. `kernel_cache` is a
per-forward scratch dict for tensors every layer of the forward shares (a causal bias per document
length, say); it lives and dies with the context.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate

import torch


@dataclass(eq=False)
class PackingContext:
    """Host-side facts about one micro-batch (see the module docstring). Tensors live on the host
    until `to(device)` copies them (non_blocking: pinned on a GPU, the copy overlaps the step).
    `cu_seqlens` is made from `doc_lengths` when not given (host work, once per batch)."""

    doc_lengths: list[list[int]]
    label_index: torch.Tensor
    label_targets: torch.Tensor
    num_tokens: int
    num_loss_tokens: int
    packed: bool = True
    cu_seqlens: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None
    trees: list[list[tuple[int, tuple[int, ...]] | None]] | None = None
    kernel_cache: dict = field(default_factory=dict, repr=False, compare=False)
    max_doc_length: int = field(init=False)
    min_doc_length: int = field(init=False)

    def __post_init__(self):
        if self.cu_seqlens is None:
            self.cu_seqlens = torch.tensor([0] + list(accumulate(n for row in self.doc_lengths for n in row)),
                                           dtype=torch.int32)
        lengths = [n for row in self.doc_lengths for n in row]
        if self.trees is not None:
            _check_trees(self.trees, self.doc_lengths)
        self.max_doc_length = max(lengths, default=0)
        self.min_doc_length = min(lengths, default=0)

    def __eq__(self, other) -> bool:
        return (isinstance(other, PackingContext) and self.doc_lengths == other.doc_lengths
                and torch.equal(self.label_index, other.label_index)
                and torch.equal(self.label_targets, other.label_targets)
                and (self.num_tokens, self.num_loss_tokens, self.packed, self.trees)
                == (other.num_tokens, other.num_loss_tokens, other.packed, other.trees))

    @property
    def batch_size(self) -> int:
        return len(self.doc_lengths)

    @property
    def row_length(self) -> int:
        return sum(self.doc_lengths[0]) if self.doc_lengths else 0

    @property
    def has_several_documents(self) -> bool:
        """True when some row holds more than one document: attention must keep them apart."""
        return self.packed and (any(len(row) > 1 for row in self.doc_lengths) or self.has_trees)

    @property
    def has_trees(self) -> bool:
        return self.trees is not None and any(t is not None for row in self.trees for t in row)

    def tree_documents(self) -> list[tuple[int, int, int, int, tuple[int, ...]]]:
        """Every tree document of the batch: (row, start, length, prefix, branch lengths)."""
        if not self.has_trees:
            return []
        out = []
        for b, (row, trees) in enumerate(zip(self.doc_lengths, self.trees)):
            start = 0
            for n, tree in zip(row, trees):
                if tree is not None:
                    out.append((b, start, n, tree[0], tuple(tree[1])))
                start += n
        return out

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "PackingContext":
        device = torch.device(device)
        if (self.label_index.device == device and self.cu_seqlens.device == device
                and (self.label_mask is None or self.label_mask.device == device)):
            return self
        return self._with(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "PackingContext":
        return self._with(lambda t: t.pin_memory())

    def _with(self, move) -> "PackingContext":
        """This context with `move` applied to each tensor (and a fresh kernel cache)."""
        return PackingContext(self.doc_lengths, move(self.label_index), move(self.label_targets), self.num_tokens,
                              self.num_loss_tokens, self.packed, cu_seqlens=move(self.cu_seqlens),
                              label_mask=None if self.label_mask is None else move(self.label_mask), trees=self.trees)


def _check_trees(trees, doc_lengths: list[list[int]]) -> None:
    """Each tree's prefix + branches fill its document exactly (host ints; a caller's slip, said here)."""
    if len(trees) != len(doc_lengths):
        raise ValueError(f"trees: {len(trees)} rows, doc_lengths {len(doc_lengths)}")
    for b, (row, row_trees) in enumerate(zip(doc_lengths, trees)):
        if len(row_trees) != len(row):
            raise ValueError(f"trees row {b}: {len(row_trees)} entries for {len(row)} documents")
        for n, tree in zip(row, row_trees):
            if tree is None:
                continue
            prefix, branches = tree
            if prefix < 1 or not branches or min(branches) < 1 or prefix + sum(branches) != n:
                raise ValueError(f"trees row {b}: prefix {prefix} + branches {list(branches)} do not make a "
                                 f"document of {n} tokens (a prefix and branches of >= 1 token each)")


def packing_context(labels: torch.Tensor, doc_lengths: list[list[int]], *, num_tokens: int,
                    packed: bool = True, ignore_index: int = -100) -> PackingContext:
    """The context of a host-side batch: `labels` [B, T] (already shifted, `ignore_index` = no
    loss) and each row's document lengths (summing to T). Host work only."""
    if labels.device.type != "cpu":
        raise ValueError("packing_context is built on the host, from the loader's CPU labels")
    B, T = labels.shape
    for b, row in enumerate(doc_lengths):
        if sum(row) != T:
            raise ValueError(f"row {b}: document lengths {row} sum to {sum(row)}, the row has {T} tokens")
    flat = labels.reshape(-1)
    index = (flat != ignore_index).nonzero().flatten()   # host tensor: no device involved
    return PackingContext(doc_lengths=[list(row) for row in doc_lengths], label_index=index,
                          label_targets=flat[index], num_tokens=num_tokens, num_loss_tokens=int(index.numel()),
                          packed=packed)


def lengths_from_positions(position_ids: torch.Tensor) -> list[list[int]]:
    """Per row, the lengths of the runs where position_ids increase by one (host [B, T] tensor):
    the document lengths of rows whose positions restart at each document (tests, the probe)."""
    pos = position_ids.detach().cpu()
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    rows = []
    for row in starts:
        idx = row.nonzero().flatten().tolist() + [pos.shape[1]]
        rows.append([b - a for a, b in zip(idx[:-1], idx[1:])])
    return rows
