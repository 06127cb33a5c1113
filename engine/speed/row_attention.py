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

On a CPU under bf16 the row goes through the explicit-matmul kernel the short-document switch uses
(`engine.speed.cpu_attention.ShortCausalAttention`, probabilities saved) instead of SDPA: PyTorch's
CPU flash kernel re-derives the probabilities block by block in backward, ~15x its forward there
(4.7 ms against 0.3 ms fwd per 2 x 128-token rows at 4 heads of 16; fp32 SDPA: 0.7 ms fwd + bwd).
Its rows are the (row, K/V head) pairs and its bias the row mask repeated per query head of a K/V
group (`grouped_row_bias`, made once per micro-batch like the mask). Saved probabilities are
B H T^2 elements per layer, at T <= the limit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.model.attention import exact_document_attention, sdpa_per_document
from engine.model.packing import PackingContext
from engine.speed.cpu_attention import ShortCausalAttention


def row_mask(packing: PackingContext, window: int | None, dtype: torch.dtype, device) -> torch.Tensor:
    """The additive block-diagonal causal mask [B, 1, T, T] of the packed rows (see the module
    docstring), made once per (window, dtype) per micro-batch."""
    key = ("row_mask", window, dtype, str(device))
    mask = packing.kernel_cache.get(key)
    if mask is None:
        # document index of every position: host ints from the loader, no device read
        doc = torch.tensor([[d for d, n in enumerate(row) for _ in range(n)] for row in packing.doc_lengths],
                           device=device)                                            # [B, T]
        pos = torch.arange(doc.shape[1], device=device)
        allowed = (doc[:, :, None] == doc[:, None, :]) & (pos[None, :] <= pos[:, None])
        if window is not None:
            allowed &= (pos[:, None] - pos[None, :]) < window
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
        mask = mask[:, None]
        packing.kernel_cache[key] = mask
    return mask


def grouped_row_bias(packing: PackingContext, window: int | None, mask: torch.Tensor, kv_heads: int,
                     groups: int) -> torch.Tensor:
    """The row mask [B, 1, T, T] laid out as ShortCausalAttention's bias [B H_kv, g T, T]: row b's
    mask for each K/V head, repeated for the g query heads reading it. Once per micro-batch."""
    key = ("row_bias", window, kv_heads, groups, mask.dtype, str(mask.device))
    bias = packing.kernel_cache.get(key)
    if bias is None:
        B, _, T, _ = mask.shape
        bias = mask[:, :, None].expand(B, kv_heads, groups, T, T).reshape(B * kv_heads, groups * T, T)
        packing.kernel_cache[key] = bias
    return bias


def explicit_kernel_pays(query: torch.Tensor, dropout: float) -> bool:
    """Whether the row takes ShortCausalAttention rather than SDPA: a CPU under bf16, no dropout."""
    return query.device.type == "cpu" and query.dtype == torch.bfloat16 and not dropout


def row_mask_kernel(max_len: int):
    """A document kernel (engine.model.attention.DocumentKernel) that computes rows of at most
    `max_len` tokens in one masked SDPA call, and longer ones per document."""

    def kernel(query, key, value, docs, *, scale: float, dropout: float, packing: PackingContext, window=None):
        B, H, T, D = query.shape
        if T > max_len:  # per document; a document the window bites: the exact path (as packed_attention's)
            out = sdpa_per_document(query, key, value, docs, scale=scale, dropout=dropout, packing=packing)
            for b, start, n in docs:
                if window is not None and n > window:
                    q, k, v = (t[b:b + 1, :, start:start + n] for t in (query, key, value))
                    o = exact_document_attention(q, k, v, scale=scale, window=window, softcap=None,
                                                 dropout=dropout, training=dropout > 0)
                    out[b, start:start + n] = o[0].transpose(0, 1)
            return out
        mask = row_mask(packing, window, query.dtype, query.device)
        if explicit_kernel_pays(query, dropout):
            H_kv = key.shape[1]
            bias = grouped_row_bias(packing, window, mask, H_kv, H // H_kv)
            out = ShortCausalAttention.apply(query.reshape(B * H, T, D), key.reshape(B * H_kv, T, D),
                                             value.reshape(B * H_kv, T, D), scale, bias)  # rows: (b, head)
            return out.view(B, H, T, D).transpose(1, 2)                               # [B, T, H, D]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scale,
                                             enable_gqa=key.shape[1] != H)
        return out.transpose(1, 2)                                                   # [B, T, H, D]

    kernel.takes_window = True
    kernel.max_len = max_len
    return kernel
