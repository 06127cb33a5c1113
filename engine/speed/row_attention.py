"""Packed attention for short rows: one SDPA call per layer with the rows' block-diagonal mask (speed switch row_attention).

The reference document kernel (`engine.model.attention.sdpa_per_document`) calls SDPA once per
document, each call wrapped in slices, a K/V head repeat and a copy into the output: at 128-token
rows of ~40-token documents that is ~10 host ops per document per layer, forward and backward, for
almost no arithmetic. For a short row the whole row in one call costs less, even though it computes
every query-key pair of the row (T^2 instead of sum n_i^2): the mask keeps each document to itself,

    mask[b, 0, i, j] = 0     if i, j are in the same document of row b, j <= i (and i - j < window)
                       -inf  otherwise                                             [B, 1, T, T]

built once per micro-batch on the host's document lengths (kept in the packing context's
`kernel_cache`, so every layer, and checkpointing's recompute, reuses it), in the queries' dtype so
SDPA takes it as it is. Grouped K/V heads are read in place (`enable_gqa`). Rows longer than the
limit go to the reference kernel: there the T^2 work would outgrow what the calls cost. This is
also closer to a GPU's step (one varlen kernel call per layer, engine/speed/cuda_attention.py) than
a per-document loop is.

On a CPU a 16-bit row is computed in fp32 (q, k, v and the mask upcast, the output cast back):
PyTorch's CPU flash kernel re-derives the probabilities block by block in backward, which in bf16
costs ~15x its forward there; in fp32 the whole forward + backward takes 0.6 ms against 3.7 ms in bf16
(2 x 128-token rows, 4 heads of 16; 11 against 23 ms at 9 heads of 64 and 256 tokens), and less than
the explicit-matmul kernel of the short-document switch (1.2 ms; 18 ms), whose saved probabilities
(B H T^2) are also larger than the fp32 q, k, v SDPA keeps. The result is at least as close to an
fp32 computation as bf16 SDPA's (one rounding, of the output).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.model.attention import exact_document_attention, sdpa_per_document
from engine.model.packing import PackingContext
from engine.model.prefix_tree import tree_attention


def row_mask(packing: PackingContext, window: int | None, dtype: torch.dtype, device) -> torch.Tensor:
    """The additive block-diagonal causal mask [B, 1, T, T] of the packed rows (see the module
    docstring), made once per (window, dtype) per micro-batch. A tree document (packing.trees) is
    one block in which a branch's queries see the prefix and their own branch only, the window
    measured on positions (a branch starts at the prefix's length)."""
    key = ("row_mask", window, dtype, str(device))
    mask = packing.kernel_cache.get(key)
    if mask is None:
        # per position: document, branch (0: a plain document or a tree's prefix), position id;
        # host ints from the loader, no device read
        doc, branch, pos = [], [], []
        trees = packing.trees or [[None] * len(row) for row in packing.doc_lengths]
        for row, row_trees in zip(packing.doc_lengths, trees):
            d_row, b_row, p_row = [], [], []
            for d, (n, tree) in enumerate(zip(row, row_trees)):
                d_row += [d] * n
                if tree is None:
                    b_row += [0] * n
                    p_row += list(range(n))
                else:
                    prefix, branches = tree
                    b_row += [0] * prefix + [g + 1 for g, m in enumerate(branches) for _ in range(m)]
                    p_row += list(range(prefix)) + [prefix + t for m in branches for t in range(m)]
            doc.append(d_row), branch.append(b_row), pos.append(p_row)
        doc, branch, pos = (torch.tensor(x, device=device) for x in (doc, branch, pos))  # [B, T]
        index = torch.arange(doc.shape[1], device=device)
        allowed = ((doc[:, :, None] == doc[:, None, :]) & (index[None, :] <= index[:, None])
                   & ((branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])))
        if window is not None:
            allowed &= (pos[:, :, None] - pos[:, None, :]) < window
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
        mask = mask[:, None]
        packing.kernel_cache[key] = mask
    return mask


def compute_dtype(query: torch.Tensor) -> torch.dtype:
    """The dtype the row's attention runs in: fp32 for a 16-bit query on a CPU (see the module
    docstring), else the query's."""
    if query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return query.dtype


def row_mask_kernel(max_len: int):
    """A document kernel (engine.model.attention.DocumentKernel) that computes rows of at most
    `max_len` tokens in one masked SDPA call, and longer ones per document (tree documents:
    `tree_attention`)."""

    def kernel(query, key, value, docs, *, scale: float, dropout: float, packing: PackingContext, window=None,
               trees=()):
        B, H, T, D = query.shape
        if T > max_len:  # per document; a document the window bites: the exact path (as packed_attention's)
            out = sdpa_per_document(query, key, value, docs, scale=scale, dropout=dropout, packing=packing)
            for b, start, n in docs:
                if window is not None and n > window:
                    q, k, v = (t[b:b + 1, :, start:start + n] for t in (query, key, value))
                    o = exact_document_attention(q, k, v, scale=scale, window=window, softcap=None,
                                                 dropout=dropout, training=dropout > 0)
                    out[b, start:start + n] = o[0].transpose(0, 1)
            for b, start, n, prefix, branches in trees:
                tree_attention(query, key, value, out, b, start, prefix, branches, scale=scale, window=window,
                               softcap=None, dropout=dropout, training=dropout > 0, cache=packing.kernel_cache)
            return out
        dtype = compute_dtype(query)
        mask = row_mask(packing, window, dtype, query.device)
        q, k, v = (t.to(dtype) for t in (query, key, value))
        with torch.autocast(query.device.type, enabled=False):  # CPU autocast would take SDPA back to bf16
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale,
                                                 enable_gqa=key.shape[1] != H).to(query.dtype)
        return out.transpose(1, 2)                                                   # [B, T, H, D]

    kernel.takes_window = True
    kernel.takes_trees = True
    kernel.max_len = max_len
    return kernel
