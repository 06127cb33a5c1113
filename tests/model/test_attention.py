"""engine/model/attention.py: packed attention honours sliding windows and soft-capping per document,
builds no [T, T] mask anywhere on the packed path, and refuses what it cannot honour."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from engine.model.attention import exact_document_attention, packed_attention
from tests.conftest import make_tiny_model, packed_batch, use_packed_attention


class Module(nn.Module):
    def __init__(self, training=False):
        super().__init__()
        self.train(training)
        self.num_key_value_groups = 2


def _eager_reference(q, k, v, lengths, *, scale, window=None, softcap=None):
    """Per document, the textbook formula in float64: softmax over keys j <= i (and i - j < window)
    of scale q.k (soft-capped), times v; GQA by repeating K/V heads."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    out = torch.zeros_like(q)
    for b, row in enumerate(lengths):
        start = 0
        for n in row:
            s = slice(start, start + n)
            scores = scale * q[b, :, s] @ k[b, :, s].transpose(-1, -2)
            if softcap is not None:
                scores = softcap * torch.tanh(scores / softcap)
            i = torch.arange(n)
            ok = (i[None, :] <= i[:, None]) & ((i[:, None] - i[None, :] < window) if window else True)
            out[b, :, s] = scores.masked_fill(~ok, float("-inf")).softmax(-1) @ v[b, :, s]
            start += n
    return out.transpose(1, 2)


@pytest.mark.parametrize("window,softcap", [(None, None), (4, None), (20, None), (None, 5.0), (4, 5.0)])
def test_packed_attention_equals_the_formula_per_document(window, softcap):
    lengths = [[9, 3, 12], [14, 10]]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 24, 8, dtype=torch.float64, generator=g)
    k, v = (torch.randn(2, 2, 24, 8, dtype=torch.float64, generator=g) for _ in range(2))
    batch = packed_batch(torch.zeros(2, 24, dtype=torch.long), lengths)
    kwargs = {"sliding_window": window, "softcap": softcap}
    out, _ = packed_attention(Module(), q, k, v, None, scaling=0.3, packing=batch["packing"], **kwargs)
    torch.testing.assert_close(out, _eager_reference(q, k, v, lengths, scale=0.3, window=window, softcap=softcap))


def test_exact_document_attention_gradients_match_the_formula():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 7, 4, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: exact_document_attention(
        a, b, c, scale=0.5, window=3, softcap=2.0, dropout=0.0, training=False), (q, k, v), fast_mode=True)


class Shapes(TorchDispatchMode):
    """Every tensor shape an op returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_no_row_by_row_mask_on_the_packed_path(family):
    """A packed forward and backward allocates no [T, T] (or [B, 1, T, T]) tensor: documents of at
    most 16 tokens in rows of 48, so any tensor ending in (48, 48) is a whole-row mask or score."""
    model, _ = make_tiny_model(family, **({"sliding_window": 8} if family == "mistral" else {}))
    model.set_attn_implementation("sdpa")
    use_packed_attention(model)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    batch = packed_batch(ids, [[16, 16, 16], [10, 14, 12, 12]])
    with Shapes() as seen:
        logits = model(input_ids=ids, position_ids=batch["position_ids"], packing=batch["packing"],
                       use_cache=False).logits
        logits.float().square().mean().backward()
    assert [s for s in seen.shapes if s[-2:] == (48, 48)] == []


def test_the_attention_sees_a_padding_mask_and_a_cache_as_transformers_does():
    """Padded rows and cached generation keep their masks (left padding included): the packed
    attention's outputs there equal plain SDPA's at every real position."""
    model, tokenizer = make_tiny_model("llama")
    model.set_attn_implementation("sdpa")
    import copy

    packed = copy.deepcopy(model)
    use_packed_attention(packed)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0  # left padding, as batched generation has it
    with torch.no_grad():
        a = packed(input_ids=ids, attention_mask=mask, use_cache=False).logits
        b = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        torch.testing.assert_close(a[mask.bool()], b[mask.bool()], atol=1e-5, rtol=1e-5)
        gen = [m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                          pad_token_id=0) for m in (model, packed)]
    assert torch.equal(gen[0], gen[1])


class _SavesItsOutput(torch.autograd.Function):
    """Identity that saves its output for backward, as a varlen kernel's autograd does: writing
    into that output in place would fail in backward."""

    @staticmethod
    def forward(ctx, x):
        out = x.clone()
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        ctx.saved_tensors  # raises if the output was modified in place
        return grad


def _kernel(takes_window: bool, calls: list):
    """A document kernel computing the formula itself (windowed when it takes the window)."""
    def kernel(q, k, v, docs, *, scale, dropout, packing, window=None):
        calls.append(window)
        out = _eager_reference(q, k, v, packing.doc_lengths, scale=scale, window=window)
        return _SavesItsOutput.apply(out)
    kernel.takes_window = takes_window
    return kernel


@pytest.mark.parametrize("takes_window", [True, False])
def test_a_kernel_that_takes_the_window_gets_it_and_others_are_corrected_per_document(monkeypatch, takes_window):
    """window 6, documents 9, 3, 12 and 14, 10: a kernel that takes the window gets it and nothing
    is recomputed; another kernel's documents longer than the window are recomputed exactly, on a
    copy of its output (backward still works where the kernel saved that output)."""
    import engine.model.attention as attention

    exact_calls = []
    real = attention.exact_document_attention
    monkeypatch.setattr(attention, "exact_document_attention", lambda *a, **kw: exact_calls.append(1) or real(*a, **kw))
    lengths = [[9, 3, 12], [14, 10]]
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 24, 8, dtype=torch.float64, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, 24, 8, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
    packing = packed_batch(torch.zeros(2, 24, dtype=torch.long), lengths)["packing"]
    calls = []
    out, _ = packed_attention(Module(), q, k, v, None, scaling=0.3, packing=packing,
                              kernel=_kernel(takes_window, calls), sliding_window=6)
    torch.testing.assert_close(out, _eager_reference(q, k, v, lengths, scale=0.3, window=6))
    assert calls == [6 if takes_window else None]
    assert len(exact_calls) == (0 if takes_window else 4)  # 9, 12, 14, 10 > 6
    out.square().sum().backward()
    assert q.grad.isfinite().all()


def test_soft_capping_calls_no_kernel():
    calls = []
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 10, 4, dtype=torch.float64, generator=g) for _ in range(3))
    packing = packed_batch(torch.zeros(1, 10, dtype=torch.long), [[6, 4]])["packing"]
    out, _ = packed_attention(Module(), q, k, v, None, scaling=0.5, packing=packing,
                              kernel=_kernel(True, calls), softcap=3.0)
    assert calls == []
    torch.testing.assert_close(out, _eager_reference(q, k, v, [[6, 4]], scale=0.5, softcap=3.0))
