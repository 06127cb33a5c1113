"""The speed switch row_attention (engine/speed/row_attention.py): short packed rows in one masked SDPA
call per layer compute what one causal call per document computes (values and gradients), with
grouped K/V heads, a sliding window shorter than a document, the mask made once per micro-batch,
and rows over the limit handed to the per-document path."""

from __future__ import annotations

import pytest
import torch

from engine.model.attention import exact_document_attention, sdpa_per_document
from engine.model.packing import PackingContext
from engine.speed.row_attention import row_mask_kernel
from tests.conftest import assert_close_reduced


def _inputs(lengths, heads=4, kv_heads=2, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    T = sum(lengths[0])
    q = torch.randn(len(lengths), heads, T, dim, generator=gen, requires_grad=True)
    k = torch.randn(len(lengths), kv_heads, T, dim, generator=gen, requires_grad=True)
    v = torch.randn(len(lengths), kv_heads, T, dim, generator=gen, requires_grad=True)
    packing = PackingContext(lengths, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), T, 0)
    docs = [(b, start, n) for b, row in enumerate(lengths) for start, n in
            zip([sum(row[:i]) for i in range(len(row))], row)]
    return q, k, v, packing, docs


def _reference(q, k, v, docs, window):
    out = torch.zeros(q.shape[0], q.shape[2], q.shape[1], q.shape[3])
    for b, start, n in docs:
        sl = [t[b:b + 1, :, start:start + n] for t in (q, k, v)]
        o = exact_document_attention(*sl, scale=q.shape[-1] ** -0.5, window=window, softcap=None, dropout=0.0,
                                     training=False)
        out[b, start:start + n] = o[0].transpose(0, 1)
    return out


@pytest.mark.parametrize("window", [None, 5])
def test_one_masked_call_equals_each_document_alone(window):
    lengths = [[7, 12, 5], [20, 4]]
    q, k, v, packing, docs = _inputs(lengths)
    kernel = row_mask_kernel(256)
    out = kernel(q, k, v, docs, scale=q.shape[-1] ** -0.5, dropout=0.0, packing=packing, window=window)
    grad = torch.randn_like(out)
    got = [out.detach(), *torch.autograd.grad(out, (q, k, v), grad)]
    ref = _reference(q, k, v, docs, window)
    want = [ref.detach(), *torch.autograd.grad(ref, (q, k, v), grad)]
    for g, w in zip(got, want):
        assert_close_reduced(g, w, terms=24 * 8)
    assert len(packing.kernel_cache) == 1  # the mask: once per micro-batch (and window)
    kernel(q, k, v, docs, scale=q.shape[-1] ** -0.5, dropout=0.0, packing=packing, window=window)
    assert len(packing.kernel_cache) == 1


def test_rows_over_the_limit_go_per_document(monkeypatch):
    import engine.speed.row_attention as row

    calls = []
    monkeypatch.setattr(row, "sdpa_per_document", lambda *a, **k: calls.append(1) or sdpa_per_document(*a, **k))
    lengths = [[7, 12, 5]]
    q, k, v, packing, docs = _inputs(lengths)
    out = row_mask_kernel(16)(q, k, v, docs, scale=q.shape[-1] ** -0.5, dropout=0.0, packing=packing, window=6)
    assert calls == [1] and not packing.kernel_cache
    assert_close_reduced(out.detach(), _reference(q, k, v, docs, 6).detach(), terms=24 * 8)


@pytest.mark.parametrize("window", [None, 5])
def test_cpu_bf16_rows_run_in_fp32_closer_to_fp32_than_bf16_sdpa(monkeypatch, window):
    """Under bf16 autocast on a CPU the row's SDPA runs on fp32 q, k, v (its bf16 backward
    re-derives the probabilities, several times slower): output and q / k / v gradients in bf16,
    no further from the fp32 computation of the same inputs than bf16 SDPA's."""
    import engine.speed.row_attention as row

    lengths = [[7, 12, 5], [20, 4]]
    q32, k32, v32, _, docs = _inputs(lengths)
    q, k, v = (t.detach().bfloat16().requires_grad_() for t in (q32, k32, v32))
    grad = torch.randn(q.shape[0], q.shape[2], q.shape[1], q.shape[3]).bfloat16()
    scale = q.shape[-1] ** -0.5
    seen = []
    sdpa = row.F.scaled_dot_product_attention
    monkeypatch.setattr(row.F, "scaled_dot_product_attention", lambda *a, **kw: seen.append(a[0].dtype) or sdpa(*a, **kw))

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = row_mask_kernel(256)(q, k, v, docs, scale=scale, dropout=0.0, packing=_inputs(lengths)[3],
                                       window=window)
        return [out.detach(), *torch.autograd.grad(out, (q, k, v), grad)]

    ref_inputs = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = _reference(*ref_inputs, docs, window)
    want = [ref.detach(), *torch.autograd.grad(ref, ref_inputs, grad.float())]
    got = run()
    monkeypatch.setattr(row, "compute_dtype", lambda query: query.dtype)  # bf16 SDPA: the yardstick
    yardstick = run()
    assert seen == [torch.float32, torch.bfloat16]
    for g, y, w in zip(got, yardstick, want):
        assert g.dtype == torch.bfloat16
        err, err_sdpa = (g.float() - w).abs().max(), (y.float() - w).abs().max()
        assert err <= err_sdpa + 1e-3 * w.abs().max(), (err, err_sdpa)
