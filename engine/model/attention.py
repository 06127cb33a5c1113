"""Packed attention: each document of a packed row attends only to itself, with no [T, T] mask.

A packed row holds several documents (`engine.model.packing`). transformers turns that into a
dense block-diagonal [B, 1, T, T] mask and runs SDPA over all T x T query-key pairs, most of which
the mask throws away: with 7 documents of ~150 tokens in a 1,024-token row only
sum(n_i^2) / T^2 ~ 1/7 of the pairs are needed. `packed_attention` takes the document lengths
from the packing context the loader made and hands each document to a *document kernel*:

    row:      [ doc A (nA) | doc B (nB) | ... ]            q, k, v  [B, H, T, D]
    per doc:  softmax(q_i k_i^T * scale + causal) v_i       [1, H, n_i, D]   (no mask tensor)
    output:   the documents' outputs side by side           [B, T, H, D]     (what transformers expects)

The default kernel, `sdpa_per_document`, is one causal `F.scaled_dot_product_attention` per
document (the FlashAttention-2 "varlen" idea in plain PyTorch). Device-specific kernels live in
`engine.speed` and are registered with `register_packed_attention(name, kernel)`: the CPU's
short-document kernels (`speed/cpu_attention.py`) and, on CUDA, one varlen call per layer for the
whole batch (`speed/cuda_attention.py`: flash varlen with `cu_seqlens`, or SDPA on a nested jagged
tensor). This module decides *when* the packed path applies and what the math is; a kernel only
decides how to compute plain causal attention per document (and, if it says it can, a window).

What a kernel never sees, because the math is not plain causal attention per document:
  * a sliding window (Mistral, Phi-3, Qwen2 with use_sliding_window, Gemma 2/3 per layer) that is
    shorter than some document of the row, unless the kernel takes one (`takes_window = True`: it
    gets `window=` and honours it for every document in the same call). Otherwise such a document
    is recomputed by `exact_document_attention` with its window as an [n, n] mask (a document no
    longer than the window is plain causal: the window changes nothing there);
  * logit soft-capping (`softcap`, Gemma 2): every document runs `exact_document_attention` (no
    kernel call);
  * rows that are not packed (one document per row): one causal SDPA call over the batch, as
    transformers' own SDPA path makes it;
  * tree documents (a shared prefix and branches: GRPO's prompt once with its G completions,
    `packing.trees`, engine/model/prefix_tree.py): computed by `tree_attention`, two SDPA calls per
    tree, unless the kernel takes them (`takes_trees = True`: it gets `trees=` and computes them in
    the same call, the CPU's row mask). The other documents of such a batch go to the kernel when it
    computes only the documents it is handed (`per_document = True`); a kernel that reads the whole
    batch's layout (varlen offsets) would attend across the branches, so there the reference kernel
    takes them. A batch with trees anywhere but packed rows (a padding mask, a KV cache) is refused;
  * a keyword this module does not know (an attention sink, say): refused with an error that names
    it, never ignored.

No [T, T] mask is built for packed rows: the name is registered with a mask builder that hands the
2-D padding mask through as it got it (`padding_mask_only`), so transformers never materialises a
block-diagonal [B, 1, T, T] mask; the training forward hands packed rows an all-ones 2-D mask
(`forward_mask`) so transformers does not probe position_ids for packing either (a device sync). Padded rows (data.packing=false) and
generation with a KV cache build their dense causal + padding mask here (`dense_mask`), as
transformers' SDPA path would.
A caller without a packing context (a test, a family that does not hand keyword arguments down)
gets the document lengths read from position_ids: one host read per attention call.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
import torch.nn.functional as F

from engine.model.packing import PackingContext, lengths_from_positions
from engine.model.prefix_tree import causal_window_mask, masked_attention, tree_attention

NAME = "engine_packed_sdpa"
_REGISTERED: set[str] = set()  # every name register_packed_attention has registered
_FORWARD_MASKS: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()
"""forward_mask's all-ones stand-ins that are alive, by id (tensors compare by value, not identity)"""

# Keywords transformers passes that do not change the attention math (or that this module reads).
_NEUTRAL = {"position_ids", "cache_position", "use_cache", "output_attentions", "output_hidden_states",
            "output_router_logits", "past_key_values", "past_key_value", "layer_idx", "is_causal",
            "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx", "num_items_in_batch",
            "sliding_window", "softcap", "dropout", "scaling", "return_dict", "token_type_ids"}

DocumentKernel = Callable[..., torch.Tensor]
"""kernel(query, key, value, docs, *, scale, dropout, packing) -> out [B, T, H, D].
query [B, H, T, D], key / value [B, H_kv, T, D]; docs: every (row, start, length) of the batch,
in the order of `packing.cu_seqlens`; plain causal attention inside each document, nothing across
them; dropout on the probabilities. A kernel whose attribute `takes_window` is True is also called
with `window=` (the layer's sliding window, None for full attention) and applies it itself; one whose
`takes_trees` is True also gets `trees=` (packing.tree_documents(): row, start, length, prefix,
branch lengths) and computes those documents too (module docstring); `per_document` True: it reads
only `docs`, never the batch's whole layout."""


class PackedAttentionError(ValueError):
    """The packed path met an attention variant it cannot honour; the message names it."""


TREES_SEEN = "tree documents attended"
"""kernel_cache key packed_attention sets once it has computed a batch's tree documents: the
training forward checks it (engine/training/loss.py::decoder_hidden), so a family that does not
hand the packing context down cannot silently attend across a tree's branches."""


def sdpa_per_document(query, key, value, docs, *, scale: float, dropout: float, packing: PackingContext):
    """The reference kernel: one causal SDPA call per document (GQA: K/V heads repeated per document,
    as transformers' masked SDPA path does; several fast kernels lack grouped heads)."""
    from transformers.integrations.sdpa_attention import repeat_kv

    B, H, T, D = query.shape
    groups = H // key.shape[1]
    out = query.new_empty(B, T, H, D)
    with _per_document_backends(query):
        for b, start, n in docs:
            q, k, v = (t[b:b + 1, :, start:start + n] for t in (query, key, value))
            if groups > 1:
                k, v = repeat_kv(k, groups), repeat_kv(v, groups)
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scale)
            out[b, start:start + n] = o[0].transpose(0, 1)
    return out


sdpa_per_document.per_document = True  # computes only the documents it is handed


def exact_document_attention(q, k, v, *, scale: float, window: int | None, softcap: float | None,
                             dropout: float, training: bool) -> torch.Tensor:
    """Eager attention of one document with every variant honoured, as transformers' eager path:
        S = scale q k^T  (-> softcap tanh(S / softcap) when soft-capped),  masked where
        key > query or query - key >= window,  P = softmax(S) in (at least) fp32,  out = dropout(P) v
    q [1, H, n, D], k / v [1, H_kv, n, D] -> [1, H, n, D]. Memory O(H n^2): per document, never per row."""
    n = q.shape[2]
    return masked_attention(q, k, v, causal_window_mask(n, n, window, q.device), scale=scale, softcap=softcap,
                            dropout=dropout, training=training)


def _per_document_backends(query: torch.Tensor):
    """On CUDA, SDPA without cuDNN: cuDNN attention builds an execution plan per new shape, and
    every document length is a new shape; flash / memory-efficient kernels take any length at no
    setup cost."""
    import contextlib

    if not query.is_cuda:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def sliding_window_of(module, kwargs: dict) -> int | None:
    """The layer's attention window: the `sliding_window` keyword transformers passes (per layer),
    else the module's attribute; None for full attention."""
    window = kwargs.get("sliding_window")
    if window is None:
        window = getattr(module, "sliding_window", None)
    return int(window) if window else None


def dense_mask(attention_mask: torch.Tensor | None, batch: int, q_len: int, kv_len: int,
               window: int | None, device) -> torch.Tensor | None:
    """[B, 1, q_len, kv_len] bool (True = attend) for queries at the last q_len of kv_len positions:
    causal, within the window, on keys the 2-D padding mask keeps; None where plain causal SDPA
    is exact (no padding mask, no window that bites, no KV cache offset but the trivial ones).
    A query row that would see nothing (left padding) sees everything instead, as transformers
    does, so SDPA returns numbers rather than NaN for positions no loss reads."""
    if attention_mask is None and (window is None or kv_len <= window) and (q_len == kv_len or q_len == 1):
        return None
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    allowed = k_pos <= q_pos                                                   # [q, kv]
    if window is not None:
        allowed = allowed & (q_pos - k_pos < window)
    allowed = allowed[None, None].expand(batch, 1, q_len, kv_len)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, -kv_len:].to(device=device, dtype=torch.bool)
    return allowed | ~allowed.any(dim=-1, keepdim=True)


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     *, kernel: DocumentKernel = sdpa_per_document, packing: PackingContext | None = None,
                     **kwargs):
    """transformers attention function (AttentionInterface): query [B, H, T, D], key/value
    [B, H_kv, T, D] -> ([B, T, H, D], None). See the module docstring."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    B, _, T, _ = query.shape
    window, softcap = sliding_window_of(module, kwargs), kwargs.get("softcap")
    packed_rows = (packing is not None and packing.packed and packing.row_length == T
                   and packing.batch_size == B and key.shape[2] == T)
    if packing is not None and packing.has_trees and not (packed_rows and (attention_mask is None
                                                                           or attention_mask.dim() == 2)):
        raise PackedAttentionError(
            f"{type(module).__name__}: a batch with tree documents (GRPO's shared prompts) reached attention "
            "with a padding mask, a KV cache or rows of another shape, where only packed rows can honour them; "
            "train with objective.share_prompt=false")
    if attention_mask is not None and attention_mask.dim() == 4:  # a caller's own 4-D mask: as given
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if packed_rows or (attention_mask is not None and _FORWARD_MASKS.get(id(attention_mask)) is attention_mask):
        # the all-ones stand-in of `forward_mask`: the context (or, from a family that does not hand
        # it down, position_ids) says where the documents are
        attention_mask = None
    if attention_mask is not None or key.shape[2] != T:
        # padded rows or a KV cache: the dense causal + padding (+ window) mask, as transformers' path
        mask = dense_mask(attention_mask, B, T, key.shape[2], window, query.device)
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    if packing is None or packing.row_length != T or packing.batch_size != B:
        position_ids = kwargs.get("position_ids")
        lengths = (lengths_from_positions(position_ids.expand(B, -1)) if position_ids is not None
                   and position_ids.shape[-1] == T else [[T]] * B)  # no context: a host read, deliberate
        packing = PackingContext(lengths, *(torch.zeros(0, dtype=torch.long),) * 2, B * T, 0)
    if not packing.has_several_documents and softcap is None and (window is None or T <= window):
        # one document per row: causal SDPA over the batch, as transformers' own path
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
    unknown = sorted(k for k, v in kwargs.items() if k not in _NEUTRAL and v is not None)
    if unknown:
        raise PackedAttentionError(
            f"{type(module).__name__} passes {unknown} to its attention function, which packed attention "
            "does not implement; train without it (speed.disable=[packed_attention]) or with data.packing=false")
    p = dropout if module.training else 0.0
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    trees = packing.tree_documents()
    if trees and not getattr(kernel, "takes_trees", False) and not getattr(kernel, "per_document", False):
        # a kernel that reads the whole batch's layout (varlen offsets, a row mask) would attend
        # across a tree's branches: the plain documents go to the reference kernel instead
        kernel = sdpa_per_document
    trees_in_kernel = bool(trees) and getattr(kernel, "takes_trees", False) and softcap is None
    in_tree = {(b, start) for b, start, *_ in trees}
    docs = [(b, start, n) for b, row in enumerate(packing.doc_lengths) for start, n in _starts(row)
            if (b, start) not in in_tree]
    takes_window = getattr(kernel, "takes_window", False)
    exact = [(b, start, n) for b, start, n in docs
             if softcap is not None or (window is not None and n > window and not takes_window)]
    outside = exact + ([] if trees_in_kernel else trees)  # what is written over the kernel's output below
    if len(exact) == len(docs) and not trees_in_kernel:  # no kernel call whose output would all be thrown away
        out = query.new_empty(B, T, query.shape[1], query.shape[3])
    else:
        out = kernel(query, key, value, docs, scale=scale, dropout=p, packing=packing,
                     **({"window": window} if takes_window else {}),
                     **({"trees": trees} if trees_in_kernel else {}))
        if outside:  # a varlen kernel saves its output for backward: overwrite a copy, not the saved one
            out = out.clone()
    for b, start, n in exact:
        # overwritten in place: the kernel's gradient for these positions is then zero
        q, k, v = (t[b:b + 1, :, start:start + n] for t in (query, key, value))
        o = exact_document_attention(q, k, v, scale=scale, window=window, softcap=softcap, dropout=p,
                                     training=module.training)
        out[b, start:start + n] = o[0].transpose(0, 1)
    for b, start, n, prefix, branches in ([] if trees_in_kernel else trees):
        tree_attention(query, key, value, out, b, start, prefix, branches, scale=scale, window=window,
                       softcap=softcap, dropout=p, training=module.training, cache=packing.kernel_cache)
    if trees:
        packing.kernel_cache[TREES_SEEN] = True
    return out, None


def _starts(row: list[int]):
    start = 0
    for n in row:
        yield start, n
        start += n


def forward_mask(model, packing: PackingContext | None, input_ids: torch.Tensor) -> torch.Tensor | None:
    """The 2-D attention mask a training forward hands the model for a packed micro-batch: all ones
    when `model` runs `packed_attention` (which reads the packing context and ignores it), else None.

    Why a mask at all: given none, transformers looks for packed sequences in position_ids before it
    calls any mask builder (`find_packed_sequence_indices`), and that test reads a flag back from
    the device, a sync every forward. With a 2-D mask it never looks. Models on transformers' own
    attention get None: there the block-diagonal mask it derives from position_ids is what keeps
    the documents apart."""
    if packing is None or not packing.packed or not uses_packed_attention(model):
        return None
    mask = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    _FORWARD_MASKS[id(mask)] = mask  # known by identity: transformers hands a bool mask through unchanged
    return mask


def uses_packed_attention(model) -> bool:
    """Does `model` run an attention registered by `register_packed_attention`?"""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) in _REGISTERED


def padding_mask_only(*args, attention_mask=None, **kwargs):
    """transformers' mask-builder interface for the packed attention: the 2-D padding mask (or
    None) handed through; `packed_attention` makes what it needs of it."""
    return attention_mask


def register_packed_attention(name: str = NAME, kernel: DocumentKernel = sdpa_per_document) -> str:
    """Register `packed_attention` with `kernel` under `name`, with `padding_mask_only` as its mask
    builder: transformers then builds no [B, 1, T, T] mask for it; returns `name`. Idempotent."""
    from functools import partial

    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(name, partial(packed_attention, kernel=kernel))
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, padding_mask_only)
    _REGISTERED.add(name)
    return name


def set_attention(model, name: str | None) -> None:
    """Switch `model` to the registered packed attention `name`, or back to plain SDPA (None).
    Models loaded with attn_implementation=eager stay eager (they asked for the reference kernel)."""
    config = getattr(model, "config", None)
    if config is None:
        return  # not a transformers model (a bare layer): nothing to switch
    current = config._attn_implementation
    if current == "eager" or (name is None and current == "sdpa") or current == name:
        return
    if current != "sdpa" and not current.startswith("engine_"):
        return  # flash_attention_2, flex_attention, a remote model's own: left as asked
    model.set_attn_implementation(name or "sdpa")
