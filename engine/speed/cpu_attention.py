"""CPU kernels for packed attention under bf16: short documents as explicit matmuls.

PyTorch's CPU flash kernel re-derives the attention probabilities in small blocks in backward,
which at ~130-token documents costs 4-5x its forward. Explicit matmuls that keep the [H, n, n]
probabilities, with the mask and the scale inside the QK^T GEMM, cost several times less per layer
(fwd + bwd, bf16; benchmarks/attention_cpu.py, numbers in benchmarks/results/). They also read
grouped K/V heads in place, without repeat_kv's copy. Memory grows as n^2 per document, hence a
length limit: longer documents take SDPA.

`short_document_kernel(limit, batched)` is a document kernel for `engine.model.attention`
(registered by the speed plan, `engine/speed/plan.py`): documents of up to `limit` tokens take
`ShortCausalAttention` (one autograd node each) or, batched, all of them go through one
`PackedShortAttention` node per layer (the same kernels, without the per-document views, nodes,
concatenations and output transposes: bit-identical results).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.model.attention import sdpa_per_document
from engine.model.packing import PackingContext


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
    SDPA kernel makes against fp64 (tests/speed/test_equivalence.py; measured on par with it,
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


class PackedShortAttention(torch.autograd.Function):
    """Every document of a packed batch in one autograd node (speed switch batch_short_documents).

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
        # positions outside `docs` and `long_docs` (a tree document, computed by the core) get no
        # gradient from here: zeros, not an empty buffer's leftovers
        covered = sum(n for *_, n in ctx.docs) + sum(n for *_, n in ctx.long_docs)
        empty = grad_out.new_empty if covered == B * T else grad_out.new_zeros
        dq = empty(B, T, H, D)
        dk, dv = (empty(B, T, H_kv, D) for _ in range(2))
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


def short_document_kernel(limit: int, batched: bool = True):
    """A document kernel (engine.model.attention.DocumentKernel) running documents of up to `limit`
    tokens through the explicit kernels, longer ones through SDPA; used on a CPU under bf16 without
    attention dropout (otherwise every document goes to SDPA)."""

    def kernel(query, key, value, docs, *, scale: float, dropout: float, packing: PackingContext):
        if query.device.type != "cpu" or query.dtype != torch.bfloat16 or dropout:
            return sdpa_per_document(query, key, value, docs, scale=scale, dropout=dropout, packing=packing)
        groups = query.shape[1] // key.shape[1]
        cache = packing.kernel_cache  # one causal bias per length, shared by every layer of the forward
        short = [d for d in docs if d[2] <= limit]
        long = [d for d in docs if d[2] > limit]
        biases = {n: causal_bias(n, groups, query.dtype, query.device, cache) for n in {d[2] for d in short}}
        long_outs = []
        for b, start, n in long:
            q, k, v = (t[b:b + 1, :, start:start + n] for t in (query, key, value))
            if groups > 1:
                k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
            long_outs.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale))
        if batched:
            return PackedShortAttention.apply(query, key, value, scale, short, biases, long, *long_outs)
        B, H, T, D = query.shape
        out = query.new_empty(B, T, H, D)
        for b, start, n in short:
            o = ShortCausalAttention.apply(query[b, :, start:start + n], key[b, :, start:start + n],
                                           value[b, :, start:start + n], scale, biases[n])
            out[b, start:start + n] = o.transpose(0, 1)
        for (b, start, n), o in zip(long, long_outs):
            out[b, start:start + n] = o[0].transpose(0, 1)
        return out

    kernel.per_document = True  # reads only `docs` (tree documents stay with the core)
    return kernel
