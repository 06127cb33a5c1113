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

On a CPU under bf16, documents of up to `train.cpu_short_attention` tokens take
`ShortCausalAttention` instead of SDPA: PyTorch's CPU flash kernel re-derives the probabilities
in small blocks in backward, which at ~130-token documents costs 4-5x its forward; explicit
matmuls that keep the [H, n, n] probabilities, with the mask and scale inside the QK^T GEMM,
cost ~3.4x less per layer (fwd + bwd, bf16, SmolLM2 shapes, 7 documents of ~150 tokens:
benchmarks/attention_cpu.py). They also read grouped K/V heads in place, without repeat_kv's copy.
With `train.batch_short_documents` (default) all documents of a micro-batch go through one
autograd node per layer, `PackedShortAttention`: the same kernels document by document, without
the per-document views, nodes, concatenations and output transposes (7-document SmolLM2 row,
forward + backward: 5.4 -> 4.4-4.9 ms per layer).
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


class ShortCausalAttention(torch.autograd.Function):
    """Causal softmax attention of one document as explicit matmuls, probabilities saved.

        q [H, n, D], k, v [H_kv, n, D] (query head h reads K/V head h // g, g = H / H_kv),
        bias [g n, n]: 0 on and below the diagonal, -inf above (`causal_bias`)
        S = bias + scale * q k^T,  P = softmax(S)                          [H_kv, g n, n]
        out = P v                                                          [H, n, D]
    backward (Dao et al. 2022, "FlashAttention", appendix B.2, without the tiling):
        dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dP * P)),  dQ = scale dS K,
        dK = scale dS^T Q
    The g query heads sharing a K/V head are stacked as rows, q -> [H_kv, g n, D], so one batched
    matmul serves the group and dK, dV sum over it in the matmul itself.
    Each [g n, n] step is one fused op: the mask and the scale ride in the QK^T GEMM (baddbmm,
    beta = 1 on the bias), softmax is one pass, and dS is PyTorch's softmax-backward kernel. At
    ~130-token documents these n^2 passes, not the GEMMs, were the cost: upcasting S and dP to
    fp32 and masking, scaling and subtracting in separate passes took ~1.7x as long per layer.
    Precision: S and dP are the GEMMs' outputs in the inputs' dtype (accumulated in fp32 inside
    the GEMM, rounded once, as transformers' eager attention has them), where a flash kernel keeps
    them in fp32. In bf16 the output and gradients stay within 2x of the error PyTorch's own bf16
    SDPA kernel makes against fp64 (tests/test_speed_equivalence.py; measured on par with it,
    benchmarks/results/attention_cpu.md), and a packed training step as close to fp32 as SDPA's.
    Memory: P is H n^2 elements per document, kept until backward -- the reason this is for
    short documents only (at n <= 4 D it is no larger than q, k, v and out together).
    """

    @staticmethod
    def forward(ctx, q, k, v, scale: float, bias):
        H, n, D = q.shape
        H_kv = k.shape[0]
        with torch.autocast(q.device.type, enabled=False):
            qg = q.reshape(H_kv, H // H_kv * n, D)                         # rows: (group member, position)
            s = torch.baddbmm(bias, qg, k.transpose(1, 2), alpha=scale)    # [H_kv, g n, n]
            p = torch.softmax(s, dim=-1)
            del s
            out = torch.bmm(p, v)                                           # [H_kv, g n, D]
        ctx.save_for_backward(qg, k, v, p)
        ctx.scale = scale
        return out.view(H, n, D)

    @staticmethod
    def backward(ctx, grad_out):
        qg, k, v, p = ctx.saved_tensors
        H_kv, gn, D = qg.shape
        do = grad_out.reshape(H_kv, gn, D).to(qg.dtype)
        dv = torch.bmm(p.transpose(1, 2), do)                              # [H_kv, n, D]
        dp = torch.bmm(do, v.transpose(1, 2))                              # [H_kv, g n, n]
        ds = torch._softmax_backward_data(dp, p, -1, p.dtype)              # P * (dP - rowsum(dP * P))
        del dp
        dq = torch.bmm(ds, k).mul_(ctx.scale)                              # [H_kv, g n, D]
        dk = torch.bmm(ds.transpose(1, 2), qg).mul_(ctx.scale)             # [H_kv, n, D]
        return dq.view(grad_out.shape), dk, dv, None, None


def causal_bias(n: int, groups: int, dtype: torch.dtype, device, cache: dict | None = None) -> torch.Tensor:
    """[groups n, n]: 0 where query i may see key j (j <= i), -inf above the diagonal, the [n, n]
    block repeated for each query head of a K/V group (ShortCausalAttention's row layout).
    `cache` (a dict) keeps one per (n, groups, dtype, device): the documents of a step have the
    same lengths in every layer."""
    key = (n, groups, dtype, str(device))
    if cache is not None and key in cache:
        return cache[key]
    future = torch.ones(n, n, dtype=torch.bool, device=device).triu_(1)
    bias = torch.zeros(n, n, dtype=dtype, device=device).masked_fill_(future, float("-inf")).repeat(groups, 1)
    if cache is not None:
        cache[key] = bias
    return bias


def _bias_cache(position_ids: torch.Tensor) -> dict | None:
    """The causal-bias cache of one forward, kept on its position_ids (shared by every layer and by
    a checkpoint's recompute, freed with the batch); None if the tensor refuses attributes."""
    cache = getattr(position_ids, "_engine_causal_bias", None)
    if cache is None:
        cache = {}
        try:
            position_ids._engine_causal_bias = cache
        except (AttributeError, RuntimeError):
            return None
    return cache


class PackedShortAttention(torch.autograd.Function):
    """Every document of a packed batch in one autograd node (train.batch_short_documents).

    The math per short document is `ShortCausalAttention`'s, run document by document so each
    one's [H_kv, g n, n] scores stay in the core's cache between the matmuls and the softmax;
    what this node removes is the per-document framework work around them: splitting q, k, v
    into views, one autograd node per document, concatenating the outputs and transposing them
    to [B, T, H, D] (and the same again in backward). Outputs are written straight into one
    [B, T, H, D] tensor, gradients straight into [B, T, H, D]-ordered buffers whose transposed
    views are returned (transformers' q, k, v are such views already).
        query [B, H, T, D], key / value [B, H_kv, T, D]; docs [(b, start, n)] of up to the limit;
        long_docs [(b, start, n)] with their outputs already computed (SDPA) and passed as extra
        inputs [1, H, n, D], copied into place (their gradients routed back as slices).
    -> [B, T, H, D]
    """

    @staticmethod
    def forward(ctx, query, key, value, scale: float, docs, biases, long_docs, *long_outs):
        B, H, T, D = query.shape
        H_kv = key.shape[1]
        out = query.new_empty(B, T, H, D)
        saved = []
        with torch.autocast(query.device.type, enabled=False):
            for b, start, n in docs:
                qg = query[b, :, start:start + n].reshape(H_kv, H // H_kv * n, D)   # a copy: rows (group member, position)
                k = key[b, :, start:start + n]                                      # [H_kv, n, D] views
                v = value[b, :, start:start + n]
                s = torch.baddbmm(biases[n], qg, k.transpose(1, 2), alpha=scale)     # [H_kv, g n, n]
                p = torch.softmax(s, dim=-1)
                del s
                out[b, start:start + n].copy_(torch.bmm(p, v).view(H, n, D).transpose(0, 1))
                saved += [qg, p]
        for (b, start, n), o in zip(long_docs, long_outs):
            out[b, start:start + n].copy_(o[0].transpose(0, 1))
        ctx.save_for_backward(key, value, *saved)
        ctx.scale, ctx.docs, ctx.long_docs, ctx.heads = scale, docs, long_docs, H
        return out

    @staticmethod
    def backward(ctx, grad_out):
        key, value, *saved = ctx.saved_tensors
        B, H_kv, T, D = key.shape
        H, scale = ctx.heads, ctx.scale
        dq = grad_out.new_empty(B, T, H, D)
        dk, dv = (grad_out.new_empty(B, T, H_kv, D) for _ in range(2))
        for i, (b, start, n) in enumerate(ctx.docs):
            qg, p = saved[2 * i], saved[2 * i + 1]
            k = key[b, :, start:start + n]
            v = value[b, :, start:start + n]
            do = grad_out[b, start:start + n].transpose(0, 1).reshape(H_kv, H // H_kv * n, D).to(qg.dtype)
            dv[b, start:start + n].copy_(torch.bmm(p.transpose(1, 2), do).transpose(0, 1))   # [n, H_kv, D]
            dp = torch.bmm(do, v.transpose(1, 2))                                           # [H_kv, g n, n]
            ds = torch._softmax_backward_data(dp, p, -1, p.dtype)                           # P * (dP - rowsum(dP * P))
            del dp
            torch.mul(torch.bmm(ds, k).view(H, n, D).transpose(0, 1), scale, out=dq[b, start:start + n])
            torch.mul(torch.bmm(ds.transpose(1, 2), qg).transpose(0, 1), scale, out=dk[b, start:start + n])
        long_grads = [grad_out[b:b + 1, start:start + n].transpose(1, 2) for b, start, n in ctx.long_docs]
        for b, start, n in ctx.long_docs:  # no gradient above for these positions: theirs flows through SDPA
            for t in (dq, dk, dv):
                t[b, start:start + n].zero_()
        return (dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None, None, None, None, *long_grads)


def _packed_short_attention(query, key, value, lengths, limit: int, scale: float, dropout: float, scaling,
                            cache):
    """Packed attention through `PackedShortAttention`: documents of up to `limit` tokens inside it,
    longer ones by SDPA (one call each) handed to it. -> [B, T, H, D]."""
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = query.shape[1] // key.shape[1]
    docs, long_docs = [], []
    for b, row in enumerate(lengths):
        start = 0
        for n in row:
            (docs if n <= limit else long_docs).append((b, start, n))
            start += n
    biases = {n: causal_bias(n, groups, query.dtype, query.device, cache) for n in {d[2] for d in docs}}
    long_outs = []
    for b, start, n in long_docs:
        q, k, v = (t[b:b + 1, :, start:start + n] for t in (query, key, value))
        if groups > 1:
            k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        long_outs.append(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling))
    return PackedShortAttention.apply(query, key, value, scale, docs, biases, long_docs, *long_outs)


def _short_attention_limit(module, query: torch.Tensor, dropout: float) -> int:
    """Longest document ShortCausalAttention takes here: train.cpu_short_attention on a CPU
    under bf16 without attention dropout, else 0 (SDPA for every document)."""
    if query.device.type != "cpu" or query.dtype != torch.bfloat16 or dropout:
        return 0
    return getattr(module, "_engine_cpu_short_attention", 0)


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
    p = dropout if module.training else 0.0
    short = _short_attention_limit(module, query, p)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    biases = _bias_cache(position_ids) if short else None
    if short and getattr(module, "_engine_batch_short_documents", False):
        return _packed_short_attention(query, key, value, lengths, short, scale, p, scaling, biases), None
    rows = []
    with _per_document_backends(query):
        for b, row_lengths in enumerate(lengths):
            qs = query[b:b + 1].split(row_lengths, dim=2)   # views [1, H, n_i, D]
            ks = key[b:b + 1].split(row_lengths, dim=2)      # views [1, H_kv, n_i, D]
            vs = value[b:b + 1].split(row_lengths, dim=2)
            outs = []
            for q, k, v in zip(qs, ks, vs):
                if q.shape[2] <= short:
                    bias = causal_bias(q.shape[2], groups, q.dtype, q.device, biases)
                    outs.append(ShortCausalAttention.apply(q[0], k[0], v[0], scale, bias).unsqueeze(0))
                    continue
                if groups > 1:  # GQA: as transformers' masked SDPA path does (fast CPU kernels lack GQA)
                    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
                outs.append(F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, scale=scaling))
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


def set_cpu_short_attention(model, max_len: int) -> None:
    """train.cpu_short_attention: documents of up to `max_len` tokens use ShortCausalAttention
    on a CPU under bf16 (0: never). Set on every attention module (transformers' classes are
    named *Attention): the attention function receives the module, not the training config."""
    for module in model.modules():
        if type(module).__name__.endswith("Attention"):
            module._engine_cpu_short_attention = max_len


def set_batch_short_documents(model, enabled: bool) -> None:
    """train.batch_short_documents: all documents of a micro-batch in one `PackedShortAttention`
    node instead of one ShortCausalAttention node (and its splits and concatenations) each."""
    for module in model.modules():
        if type(module).__name__.endswith("Attention"):
            module._engine_batch_short_documents = enabled


def set_packed_attention(model, enabled: bool) -> None:
    """Switch `model` between packed attention and plain SDPA (train.packed_attention). Models
    loaded with attn_implementation=eager stay eager (they asked for the reference kernel)."""
    current = model.config._attn_implementation
    if enabled and current == "sdpa":
        model.set_attn_implementation(register())
    elif not enabled and current == NAME:
        model.set_attn_implementation("sdpa")
