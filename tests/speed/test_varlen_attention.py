"""engine/speed/cuda_attention.py: one attention kernel call per layer per forward for a packed batch.

The CUDA kernels cannot run on a CPU (flash varlen is CUDA only; torch's CPU backend for SDPA on
nested tensors refuses is_causal), so here the op under each kernel is replaced by a reference
that checks what it is handed (cu_seqlens, max length, window, heads) and computes causal
attention per document as ONE masked SDPA over all tokens: the kernels' own plumbing (token-major
layout, nested tensors, GQA, the window rule, the output view) runs for real, and the numerics are
compared with the core's reference kernel (one SDPA per document), forward and gradients. The
`gpu` test at the end runs the real kernels where a GPU is present.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import engine.model.attention as attention
from engine.config import SpeedConfig
from engine.model.attention import register_packed_attention, set_attention
from engine.speed import cuda_attention
from engine.speed import plan as speed_plan
from engine.speed.cuda_attention import TorchAttention, choose_varlen_attention
from engine.speed.measure import AttentionCalls
from tests.conftest import make_tiny_model, packed_batch, use_packed_attention

LENGTHS = [[10, 12, 8, 18], [20, 15, 13]]  # several documents per row; the last of each could be padding
BOTH = TorchAttention(flash_varlen=True, nested_sdpa=True)


# ----------------------------------------------------------------------------- the choice

@pytest.mark.parametrize("capability,precision,features,expected", [
    (None, "bf16", BOTH, ""),                                        # a CPU: its own kernels
    ((9, 0), "bf16", BOTH, "flash_varlen"),                          # H100
    ((8, 0), "fp16", BOTH, "flash_varlen"),                          # A100
    ((8, 6), "bf16", TorchAttention(False, True), "nested_sdpa"),    # a torch without varlen_attn
    ((8, 0), "fp32", BOTH, "nested_sdpa"),                           # flash is half precision only
    ((7, 5), "fp16", BOTH, "nested_sdpa"),                           # T4: the memory-efficient kernel
    ((7, 5), "fp32", BOTH, "nested_sdpa"),
    ((7, 5), "bf16", BOTH, ""),                                      # no bf16 kernel before sm80
    ((7, 0), "fp16", BOTH, ""),                                      # not a GPU the engine targets
    ((9, 0), "bf16", TorchAttention(False, False), ""),
])
def test_the_kernel_is_a_function_of_the_gpu_the_precision_and_torch(capability, precision, features, expected):
    kernel, why = choose_varlen_attention(capability, precision, features)
    assert kernel == expected
    assert (why == "") == (capability is None)


def test_flash_varlen_is_offered_only_by_a_torch_whose_varlen_attn_takes_window_and_gqa(monkeypatch, tmp_path):
    """torch 2.13's varlen_attn takes scale, window_size and enable_gqa; an older one without them
    (or none at all) is not offered flash varlen: the plan falls back to nested SDPA."""
    import importlib.util
    import inspect

    from torch.nn.attention import varlen

    params = inspect.signature(varlen.varlen_attn).parameters
    assert cuda_attention.torch_attention_features().flash_varlen == all(
        k in params for k in ("scale", "window_size", "enable_gqa"))
    older = tmp_path / "varlen.py"
    older.write_text("def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale: float = None,\n"
                     "                is_causal: bool = False) -> None:\n    pass\n")
    spec = importlib.util.spec_from_file_location("torch.nn.attention.varlen", older)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec)
    assert not cuda_attention.torch_attention_features().flash_varlen
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert not cuda_attention.torch_attention_features().flash_varlen


def test_the_plan_says_the_choice_once_and_registers_it(monkeypatch):
    monkeypatch.setattr(cuda_attention, "cuda_capability", lambda device: (7, 5))
    cuda = torch.device("cuda")
    plan = speed_plan.resolve(SpeedConfig(), device=cuda, precision="fp16")
    assert plan.varlen_attention == "nested_sdpa" and plan.short_attention == 0
    line = plan.describe()
    assert "varlen_attention=nested_sdpa" in line and "sm75 fp16: nested SDPA (memory-efficient)" in line
    off = speed_plan.resolve(SpeedConfig(disable=["varlen_attention"]), device=cuda, precision="fp16")
    assert off.varlen_attention == "" and "varlen" not in off.describe() and "nested" not in off.describe()
    model, _ = make_tiny_model("llama")
    model.set_attn_implementation("sdpa")
    speed_plan.apply(plan, model)  # the model stays on the CPU: apply only swaps the attention function
    assert model.config._attn_implementation == "engine_packed_nested_sdpa"
    speed_plan.apply(plan.off("varlen_attention"), model)
    assert model.config._attn_implementation == "engine_packed_sdpa"


# ----------------------------------------------------------------------------- references

def reference_varlen(q, k, v, cu_seqlens, *, scale, window=None):
    """q [N, H, D], k / v [N, H_kv, D] -> [N, H, D]: causal attention inside each segment of
    cu_seqlens (keys within `window`), as one SDPA over all N tokens with an [N, N] mask (test
    sizes only)."""
    N = q.shape[0]
    doc = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1), cu_seqlens.diff().long())
    i = torch.arange(N)
    allowed = (doc[:, None] == doc[None, :]) & (i[None, :] <= i[:, None])
    if window is not None:
        allowed &= (i[:, None] - i[None, :]) < window
    out = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), attn_mask=allowed,
                                         scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def fake_varlen_attn(seen: list, packing):
    """Stands in for torch.nn.attention.varlen.varlen_attn: checks its arguments against the
    packing context the loader made, records them, computes `reference_varlen`."""

    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        assert cu_q is cu_k and cu_q.dtype == torch.int32 and torch.equal(cu_q, packing.cu_seqlens)
        assert type(max_q) is int and max_q == max_k == packing.max_doc_length  # a host int, no device read
        assert q.shape[0] == k.shape[0] == packing.num_tokens and enable_gqa == (q.shape[1] != k.shape[1])
        assert window_size[1] == 0 and isinstance(window_size, tuple)       # causal: (-1, 0) or (w - 1, 0)
        seen.append(window_size)
        window = None if window_size[0] < 0 else window_size[0] + 1
        return reference_varlen(q, k, v, cu_q, scale=scale, window=window)

    return varlen_attn


def fake_jagged_sdpa(seen: list, packing):
    """Stands in for torch's SDPA on jagged nested tensors (its CPU backend refuses is_causal):
    checks the nested tensors the kernel built (offsets = cu_seqlens, bounds given, equal head
    counts), computes `reference_varlen` on their values and returns a nested tensor as torch does."""
    from torch.nested._internal.nested_tensor import NestedTensor, nested_view_from_values_offsets_lengths

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        assert all(isinstance(t, NestedTensor) for t in (query, key, value)) and is_causal and attn_mask is None
        assert query.offsets() is key.offsets() is value.offsets()
        assert torch.equal(query.offsets(), packing.cu_seqlens)
        assert (query._maybe_max_seqlen, query._maybe_min_seqlen) == (packing.max_doc_length, packing.min_doc_length)
        assert query.shape[1] == key.shape[1] == value.shape[1]              # [docs, H, j, D]: K/V repeated
        seen.append(query.shape[1])
        q, k, v = (t.transpose(1, 2).values() for t in (query, key, value))  # [N, H, D]
        out = reference_varlen(q, k, v, query.offsets(), scale=scale)
        nested = nested_view_from_values_offsets_lengths(out, query.offsets(), None,
                                                         min_seqlen=query._maybe_min_seqlen,
                                                         max_seqlen=query._maybe_max_seqlen)
        return nested.transpose(1, 2)

    return sdpa


def _models(family: str, kernel, **overrides):
    """(the reference: the core's kernel, one SDPA per document; the same weights with `kernel`)."""
    model, _ = make_tiny_model(family, **overrides)
    model.set_attn_implementation("sdpa")
    use_packed_attention(model)
    fast = copy.deepcopy(model)
    set_attention(fast, register_packed_attention(f"engine_test_{family}", kernel))
    for m in (model, fast):
        m.train()
    return model, fast


def _step(model, batch):
    """Logits and every parameter gradient of one packed forward + backward."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], packing=batch["packing"],
                   use_cache=False).logits
    F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten()).backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_step(reference, fast, batch):
    logits, grads = _step(reference, batch)
    with AttentionCalls() as calls:
        fast_logits, fast_grads = _step(fast, batch)
    torch.testing.assert_close(fast_logits, logits, atol=2e-5, rtol=2e-5)
    assert fast_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(fast_grads[name], grads[name], atol=2e-5, rtol=2e-4, msg=name)
    return calls


def _batch(vocab: int, lengths=LENGTHS):
    ids = torch.randint(0, vocab, (len(lengths), sum(lengths[0])), generator=torch.Generator().manual_seed(0))
    return packed_batch(ids, lengths, labels=torch.roll(ids, -1, 1))


# ----------------------------------------------------------------------------- flash varlen (fake op)

@pytest.mark.parametrize("family,window", [("llama", None), ("mistral", 9), ("mistral", 64)])
def test_flash_varlen_is_one_call_per_layer_and_equals_the_reference(monkeypatch, family, window):
    """GQA (4 heads, 2 K/V heads), 4 + 3 documents: the kernel's one call per layer per forward
    equals one SDPA per document, logits and gradients; a window shorter than some documents
    rides in the same call as (window - 1, 0), and the core recomputes nothing."""
    from torch.nn.attention import varlen

    overrides = {"sliding_window": window} if window else {}
    reference, fast = _models(family, cuda_attention.flash_varlen_kernel(dtypes=(torch.float32,)), **overrides)
    batch = _batch(reference.config.vocab_size)
    seen, exact = [], []
    monkeypatch.setattr(varlen, "varlen_attn", fake_varlen_attn(seen, batch["packing"]))
    real_exact = attention.exact_document_attention
    calls = _assert_same_step(reference, fast, batch)
    monkeypatch.setattr(attention, "exact_document_attention", lambda *a, **k: exact.append(1) or real_exact(*a, **k))
    layers = reference.config.num_hidden_layers
    assert seen == [(window - 1 if window == 9 else -1, 0)] * layers  # 64: no document is longer
    assert (calls.forward, calls.backward) == (layers, layers)
    _step(fast, batch)
    assert exact == []


def test_flash_varlen_takes_the_reference_kernel_where_it_cannot_run(monkeypatch):
    """fp32 (flash is fp16 / bf16) and attention dropout: the reference kernel, documents longer
    than the window recomputed exactly, the same numbers."""
    from torch.nn.attention import varlen

    monkeypatch.setattr(varlen, "varlen_attn", lambda *a, **k: pytest.fail("flash called"))
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 48, 8, generator=g)
    k, v = (torch.randn(2, 2, 48, 8, generator=g) for _ in range(2))
    packing = _batch(64)["packing"]
    docs = [(b, sum(row[:i]), n) for b, row in enumerate(LENGTHS) for i, n in enumerate(row)]
    out = cuda_attention.flash_varlen_kernel()(q, k, v, docs, scale=0.3, dropout=0.0, packing=packing, window=9)
    expected = reference_varlen(*(t.transpose(1, 2).flatten(0, 1) for t in (q, k, v)), packing.cu_seqlens,
                                scale=0.3, window=9)
    torch.testing.assert_close(out.flatten(0, 1), expected)


# ----------------------------------------------------------------------------- nested SDPA (fake backend)

@pytest.mark.parametrize("family,window", [("llama", None), ("mistral", 9)])
def test_nested_sdpa_is_one_call_per_layer_and_equals_the_reference(monkeypatch, family, window):
    """The same batch through SDPA on nested jagged tensors: one SDPA per layer per forward (and
    one backward), K/V heads repeated to the query's 4; with a window shorter than some documents
    (a T4's uncommon case) those documents are recomputed exactly by the core after the call."""
    import torch.nested._internal.ops as nested_ops

    overrides = {"sliding_window": window} if window else {}
    reference, fast = _models(family, cuda_attention.nested_sdpa_kernel(), **overrides)
    batch = _batch(reference.config.vocab_size)
    seen = []
    monkeypatch.setattr(nested_ops, "jagged_scaled_dot_product_attention", fake_jagged_sdpa(seen, batch["packing"]))
    calls = _assert_same_step(reference, fast, batch)
    layers = reference.config.num_hidden_layers
    assert seen == [reference.config.num_attention_heads] * layers
    assert (calls.forward, calls.backward) == (layers, layers)


def test_the_kernel_path_reads_nothing_back_from_the_device(monkeypatch):
    """No .item() (aten._local_scalar_dense) or nonzero while packed attention runs through either
    kernel, forward: the lengths come from the packing context's host lists and ints. (.tolist()
    bypasses the dispatcher, and on a CPU a device-to-host copy cannot be told from a host one:
    the gpu test runs the kernels with CUDA's sync debug mode set to error.)"""
    import torch.nested._internal.ops as nested_ops
    from torch.nn.attention import varlen
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostReads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.name() in ("aten::_local_scalar_dense", "aten::nonzero", "aten::item"):
                self.ops.append(func.name())
            return func(*args, **(kwargs or {}))

    batch = _batch(64)
    monkeypatch.setattr(varlen, "varlen_attn", fake_varlen_attn([], batch["packing"]))
    monkeypatch.setattr(nested_ops, "jagged_scaled_dot_product_attention", fake_jagged_sdpa([], batch["packing"]))
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 48, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, 48, 8, generator=g, requires_grad=True) for _ in range(2))
    module = torch.nn.Module()
    for kernel in (cuda_attention.flash_varlen_kernel(dtypes=(torch.float32,)), cuda_attention.nested_sdpa_kernel()):
        with HostReads() as reads:
            out = attention.packed_attention(module, q, k, v, None, packing=batch["packing"], kernel=kernel)[0]
        assert reads.ops == []
        out.sum().backward()


# ----------------------------------------------------------------------------- on a GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["flash_varlen", "nested_sdpa"])
def test_one_kernel_call_per_layer_per_forward_on_the_gpu(name):
    """The real kernels: a tiny GQA Llama in half precision on this GPU, 4 + 3 documents per
    micro-batch; one attention kernel call per layer forward and one backward, logits and
    gradients as the reference kernel's within half-precision rounding."""
    capability = torch.cuda.get_device_capability()
    precision = "bf16" if capability[0] >= 8 else "fp16"
    chosen, _ = choose_varlen_attention(capability, precision, cuda_attention.torch_attention_features())
    if name == "flash_varlen" and chosen != "flash_varlen":
        pytest.skip(f"flash varlen is not chosen on sm{capability[0]}{capability[1]}")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    reference, fast = _models("llama", cuda_attention.KERNELS[name](), head_dim=64, hidden_size=256)
    reference, fast = reference.to("cuda", dtype), fast.to("cuda", dtype)
    batch = {k: v.to("cuda") for k, v in _batch(reference.config.vocab_size).items()}
    logits, grads = _step(reference, batch)
    with AttentionCalls() as calls:
        fast_logits, fast_grads = _step(fast, batch)
    layers = reference.config.num_hidden_layers
    assert (calls.forward, calls.backward) == (layers, layers), calls.ops
    torch.testing.assert_close(fast_logits.float(), logits.float(), atol=3e-2, rtol=3e-2)
    for n in grads:
        scale = grads[n].float().abs().max().item() or 1.0
        torch.testing.assert_close(fast_grads[n].float() / scale, grads[n].float() / scale, atol=3e-2, rtol=0, msg=n)
    # the kernel alone, forward and backward, with any synchronizing call (.item(), nonzero, a
    # device-to-host copy) an error
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 4, 48, 64, device="cuda", dtype=dtype, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 2, 48, 64, device="cuda", dtype=dtype, generator=g, requires_grad=True) for _ in range(2))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = attention.packed_attention(torch.nn.Module(), q, k, v, None, packing=batch["packing"],
                                         kernel=cuda_attention.KERNELS[name]())[0]
        out.float().square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
