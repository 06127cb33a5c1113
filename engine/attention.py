"""Packed attention: one causal SDPA call per document of a packed row, no [T, T] mask.

A packed row holds several documents (position_ids restart at each, DESIGN.md). transformers
turns that into a dense block-diagonal [B, 1, T, T] mask and runs SDPA over all T x T query-key
pairs, most of which the mask then throws away: with 7 documents of ~150 tokens in a 1,024-token
row only sum(n_i^2) / T^2 ~ 1/7 of the pairs are needed. `packed_sdpa_attention` splits q, k, v
at the document boundaries and runs `F.scaled_dot_product_attention(is_causal=True)` on each
document, the FlashAttention-2 "varlen" idea in plain PyTorch:

    row:      [ doc A (nA) | doc B (nB) | ... ]            q, k, v  [B, H, T, D]
    per doc:  softmax(q_i k_i^T * scale + causal) v_i       [1, H, n_i, D]   (no mask tensor)
    output:   the documents' outputs concatenated back      [B, T, H, D]     (what transformers expects)

Same math as the masked dense call (a query never attends outside its document); attention
FLOPs and memory fall from O(T^2) to O(sum n_i^2), and causal SDPA without a mask can use the
fast kernels (flash / memory-efficient) on every device. `torch.split` keeps the backward a
single concatenation of the documents' gradients.

Where the row is not packed (one document per row, padded mode, a KV cache during generation),
or the model needs a mask SDPA cannot express per document (sliding window, logit soft-capping),
it defers to transformers' own SDPA path with transformers' mask, unchanged.
Document boundaries are where position_ids do not increase by one (transformers' own rule,
`find_packed_sequence_indices`); they are read once per forward (one host sync on a GPU) and kept
on the position_ids tensor, which every layer (and the checkpoint recompute) shares.
Switch: `train.packed_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "engine_packed_sdpa"


def document_lengths(position_ids: torch.Tensor) -> list[list[int]] | None:
    """Per row, the lengths of its documents ([B, T] position_ids -> B lists summing to T);
    None when no row holds more than one document (nothing to split). Cached on the tensor."""
    cached = getattr(position_ids, "_engine_doc_lengths", "unset")
    if cached != "unset":
        return cached
    pos = position_ids.detach().to("cpu")  # [B, T]; on a GPU: the one sync of this forward
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    rows, packed = [], False
    for row in starts:
        idx = row.nonzero().flatten().tolist() + [pos.shape[1]]
        rows.append([b - a for a, b in zip(idx[:-1], idx[1:])])
        packed |= len(rows[-1]) > 1
    result = rows if packed else None
    try:
        position_ids._engine_doc_lengths = result
    except (AttributeError, RuntimeError):  # e.g. a tensor subclass that refuses attributes
        pass
    return result


def _per_document_backends(query: torch.Tensor):
    """On CUDA, SDPA without cuDNN: cuDNN attention builds an execution plan per new shape, and
    every document length is a new shape (measured on an H200: ~1.6 ms of host time per call,
    the step CPU-bound); flash / memory-efficient kernels take any length at no setup cost."""
    import contextlib

    if not query.is_cuda:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _needs_dense_mask(module) -> bool:
    config = getattr(module, "config", None)
    return bool(getattr(module, "sliding_window", None)
                or getattr(config, "attn_logit_softcapping", None)
                or getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None))


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          is_causal=None, position_ids=None, **kwargs):
    """transformers attention function (AttentionInterface): query [B, H, T, D], key/value
    [B, H_kv, T, D] -> ([B, T, H, D], None). See the module docstring."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    T = query.shape[2]
    lengths = None
    if (position_ids is not None and position_ids.dim() == 2 and key.shape[2] == T
            and position_ids.shape[1] == T and not _needs_dense_mask(module)):
        lengths = document_lengths(position_ids)
    if lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # GQA: as transformers' masked SDPA path does (fast CPU kernels lack GQA)
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    p = dropout if module.training else 0.0
    rows = []
    with _per_document_backends(query):
        for b, row_lengths in enumerate(lengths):
            qs = query[b:b + 1].split(row_lengths, dim=2)   # views [1, H, n_i, D]
            ks = key[b:b + 1].split(row_lengths, dim=2)
            vs = value[b:b + 1].split(row_lengths, dim=2)
            outs = [F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=scaling)
                    for q, k, v in zip(qs, ks, vs)]
            rows.append(torch.cat(outs, dim=2))              # [1, H, T, D]
    out = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None        # [B, T, H, D]


def register() -> str:
    """Register the function (and transformers' SDPA mask builder, used by its fallback) under
    NAME; returns NAME. Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    return NAME


def set_packed_attention(model, enabled: bool) -> None:
    """Switch `model` between packed attention and plain SDPA (train.packed_attention). Models
    loaded with attn_implementation=eager stay eager (they asked for the reference kernel)."""
    current = model.config._attn_implementation
    if enabled and current == "sdpa":
        model.set_attn_implementation(register())
    elif not enabled and current == NAME:
        model.set_attn_implementation("sdpa")
