"""Speed switches compute the same thing as the plain path: train.fused_lora (LoRALinear's addmm
forward) on a float and a 4-bit base, in fp32 and under autocast, and a whole tiny-model step."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from engine.config import ModelConfig, PeftConfig
from engine.training.loss import causal_lm_loss
from engine.layers.lora import LoRALinear, lora_state_dict, set_fused_lora
from engine.model.build import build_model
from tests.conftest import make_tiny_model_dir


def _layer(base: nn.Module, dropout: float = 0.0) -> LoRALinear:
    torch.manual_seed(0)
    layer = LoRALinear(base, r=4, alpha=8.0, dropout=dropout)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.5)  # a fresh B is 0: make the update visible
    return layer


def _run(layer: LoRALinear, fused: bool, x: torch.Tensor, autocast_dtype=None):
    layer.fused = fused
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(123)  # same dropout mask for both paths
    with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
        y = layer(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach(), x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_lora_equals_plain_fp32(dropout):
    torch.manual_seed(0)
    layer = _layer(nn.Linear(16, 24, bias=True), dropout).train()
    x = torch.randn(2, 5, 16)
    plain, fused = _run(layer, False, x), _run(layer, True, x)
    assert plain[0].shape == fused[0].shape == (2, 5, 24) and fused[0].dtype == torch.float32
    for a, b in zip(plain, fused):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
    assert plain[3].abs().sum() > 0


def test_fused_lora_equals_plain_under_bf16_autocast():
    torch.manual_seed(0)
    layer = _layer(nn.Linear(16, 24))
    x = torch.randn(3, 16)
    plain, fused = _run(layer, False, x, torch.bfloat16), _run(layer, True, x, torch.bfloat16)
    assert fused[0].dtype == plain[0].dtype == torch.bfloat16
    for a, b in zip(plain, fused):
        torch.testing.assert_close(b.float(), a.float(), atol=3e-2, rtol=2e-2)  # bf16 rounding of one add
    assert fused[2].dtype == torch.float32  # LoRA grads stay fp32


def test_fused_lora_half_base_without_autocast_keeps_the_plain_path():
    """fp16 base outside autocast: out is fp16, the branch fp32 -> dtypes differ, so the layer
    must take the plain path (cast the update) and return fp16 either way."""
    layer = _layer(nn.Linear(16, 24).half())
    x = torch.randn(3, 16).half()
    plain, fused = _run(layer, False, x), _run(layer, True, x)
    assert fused[0].dtype == torch.float16
    torch.testing.assert_close(fused[0], plain[0], atol=0, rtol=0)


def test_fused_lora_equals_plain_on_a_4bit_base():
    from engine.layers.quant import QuantSpec, quantize_linear

    torch.manual_seed(0)
    base = quantize_linear(nn.Linear(64, 32), QuantSpec("nf4", True, torch.float32), "cpu")
    layer = _layer(base)
    x = torch.randn(4, 64)
    plain, fused = _run(layer, False, x), _run(layer, True, x)
    for a, b in zip(plain, fused):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_fused_lora_switch_changes_the_path(monkeypatch):
    """The switch must really select the in-place addmm path (else the tests above compare a path
    with itself)."""
    layer = _layer(nn.Linear(8, 8))
    calls = []
    original = torch.Tensor.addmm_
    monkeypatch.setattr(torch.Tensor, "addmm_", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    layer.fused = False
    layer(torch.randn(2, 8))
    assert not calls
    layer.fused = True
    layer(torch.randn(2, 8))
    assert calls


def test_tiny_model_step_same_loss_and_grads_with_fused_lora(tmp_path):
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(path=str(make_tiny_model_dir(tmp_path, "llama"))),
                           PeftConfig(r=4, alpha=8.0), "cpu", torch.float32)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.normal_(0, 0.1)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, model.config.vocab_size, (2, 12), generator=g),
             "labels": torch.randint(0, model.config.vocab_size, (2, 12), generator=g)}
    results = []
    for fused in (False, True):
        m = copy.deepcopy(model).train()
        set_fused_lora(m, fused)
        loss, _ = causal_lm_loss(m, batch, chunk_size=5)
        loss.backward()
        results.append((loss.detach(), {k: v.grad for k, v in lora_state_dict(m).items()}))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-6)
    for key, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][key], grad, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- train.packed_attention

def _packed_inputs(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (2, 30), generator=g)
    pos = torch.stack([torch.cat([torch.arange(10), torch.arange(12), torch.arange(8)]),
                       torch.cat([torch.arange(5), torch.arange(25)])])  # rows packed differently
    return ids, pos


@pytest.mark.parametrize("family", ["llama", "phi3", "qwen2"])
def test_packed_attention_equals_masked_sdpa(family):
    from engine.model.attention import NAME, set_packed_attention
    from tests.conftest import make_tiny_model

    model, _ = make_tiny_model(family)
    model.set_attn_implementation("sdpa")
    packed = copy.deepcopy(model)
    set_packed_attention(packed, True)
    assert packed.config._attn_implementation == NAME
    ids, pos = _packed_inputs(model.config.vocab_size)
    outs = []
    for m in (model, packed):
        m.train()
        logits = m(input_ids=ids, position_ids=pos.clone(), use_cache=False).logits
        logits.square().mean().backward()
        outs.append((logits.detach(), {n: p.grad for n, p in m.named_parameters()}))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=2e-5, rtol=1e-5)
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][name], grad, atol=1e-6, rtol=1e-4)
    set_packed_attention(packed, False)
    assert packed.config._attn_implementation == "sdpa"


def test_packed_attention_runs_one_causal_call_per_document(monkeypatch):
    """The per-document path is really taken for packed rows (3 + 2 documents x 2 layers), and
    not for rows holding one document (transformers' SDPA path, bit-identical)."""
    import engine.model.attention as attention
    from tests.conftest import make_tiny_model

    model, _ = make_tiny_model("llama")
    model.set_attn_implementation("sdpa")
    plain = copy.deepcopy(model)
    attention.set_packed_attention(model, True)
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append((q.shape[2], kw.get("is_causal"), kw.get("attn_mask")))
        return real(q, k, v, **kw)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    ids, pos = _packed_inputs(model.config.vocab_size)
    pos[1] = torch.cat([torch.arange(12), torch.arange(18)])
    with torch.no_grad():
        model(input_ids=ids, position_ids=pos, use_cache=False)
    assert sorted(n for n, _, _ in calls) == sorted([10, 12, 8, 12, 18] * 2)
    assert all(causal and mask is None for _, causal, mask in calls)
    assert attention.document_lengths(pos) == [[10, 12, 8], [12, 18]]

    calls.clear()
    single = torch.arange(30).repeat(2, 1)
    with torch.no_grad():
        a = model(input_ids=ids, position_ids=single, use_cache=False).logits
        b = plain(input_ids=ids, position_ids=single, use_cache=False).logits
    # one whole-row call per layer per model (transformers' SDPA path), none split
    assert [n for n, _, _ in calls] == [30] * 4 and attention.document_lengths(single) is None
    assert torch.equal(a, b)


def test_packed_attention_keeps_cudnn_out_of_the_per_document_calls(monkeypatch):
    """On CUDA the per-document calls run with SDPA's flash / memory-efficient / math backends
    only: cuDNN attention plans every new sequence length, and each document is one (an H200
    profile, benchmarks/results/gpu/profile_phi3_step_*.txt: 2.0 -> 0.46 s per Phi-3-mini step).
    On the CPU the backend choice is left alone."""
    import contextlib

    import engine.model.attention as attention
    from torch.nn.attention import SDPBackend

    assert isinstance(attention._per_document_backends(torch.zeros(1)), contextlib.nullcontext)
    chosen = []
    monkeypatch.setattr("torch.nn.attention.sdpa_kernel", lambda backends: chosen.append(backends) or "ctx")

    class FakeCuda:
        is_cuda = True

    assert attention._per_document_backends(FakeCuda()) == "ctx"
    assert SDPBackend.CUDNN_ATTENTION not in chosen[0] and SDPBackend.FLASH_ATTENTION in chosen[0]


def test_packed_attention_padded_batch_and_generation_fall_back():
    """Padded mode (attention_mask, one document per row) and cached generation take
    transformers' SDPA path: the same outputs as a plain SDPA model."""
    from engine.model.attention import set_packed_attention
    from tests.conftest import make_tiny_model

    model, _ = make_tiny_model("llama")
    model.set_attn_implementation("sdpa")
    packed = copy.deepcopy(model)
    set_packed_attention(packed, True)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        torch.testing.assert_close(packed(input_ids=ids, attention_mask=mask, use_cache=False).logits,
                                   model(input_ids=ids, attention_mask=mask, use_cache=False).logits, atol=0, rtol=0)
        gen = [m.generate(input_ids=ids[:1], max_new_tokens=5, do_sample=False, use_cache=True,
                          pad_token_id=model.config.eos_token_id) for m in (model, packed)]
    assert torch.equal(gen[0], gen[1])


def test_packed_attention_keeps_eager_and_sliding_window_models_as_they_are():
    from engine.model.attention import _needs_dense_mask, set_packed_attention
    from tests.conftest import make_tiny_model

    model, _ = make_tiny_model("llama")  # built with attn_implementation="eager"
    set_packed_attention(model, True)
    assert model.config._attn_implementation == "eager"

    class Windowed(nn.Module):
        sliding_window = 4
    assert _needs_dense_mask(Windowed())


def test_packed_attention_with_checkpointing_and_through_build_model(tmp_path):
    """Real path: build_model + apply_speed_switches + activation checkpointing (the recompute
    reuses the cached boundaries) gives the plain model's loss and LoRA grads."""
    from engine.config import TrainConfig
    from engine.model.build import apply_speed_switches, enable_activation_checkpointing

    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(path=str(make_tiny_model_dir(tmp_path, "llama")), attn_implementation="sdpa"),
                           PeftConfig(r=4, alpha=8.0), "cpu", torch.float32)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.normal_(0, 0.1)
    ids, pos = _packed_inputs(model.config.vocab_size)
    labels = torch.roll(ids, -1, 1)
    batch = {"input_ids": ids, "labels": labels, "position_ids": pos}
    results = []
    # the last: every other default switch too (compiled norms and loss, grouped LoRA A; each
    # recomputed under checkpointing), whose kernels round differently: compared a little more loosely
    for on, ckpt, rest in ((False, False, False), (True, False, False), (True, True, False), (True, True, True)):
        m = copy.deepcopy(model).train()
        apply_speed_switches(m, TrainConfig(packed_attention=on, fused_lora=True, compile_norms=rest,
                                            compile_loss=rest, grouped_lora=rest))
        if ckpt:
            enable_activation_checkpointing(m)
        loss, _ = causal_lm_loss(m, {**batch, "position_ids": pos.clone()}, chunk_size=None)
        loss.backward()
        results.append((loss.detach(), {k: v.grad for k, v in lora_state_dict(m).items()}))
    for i, (loss, grads) in enumerate(results[1:], 1):
        torch.testing.assert_close(loss, results[0][0], atol=1e-4, rtol=1e-6)
        for key, grad in results[0][1].items():
            torch.testing.assert_close(grads[key], grad, atol=1e-6 if i < 3 else 5e-6, rtol=1e-4)


# ----------------------------------------------------------------------------- train.cpu_short_attention

@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_short_causal_attention_gradcheck_and_equals_sdpa(heads, kv_heads):
    """ShortCausalAttention in float64: its hand-written backward passes gradcheck, and forward and
    gradients equal causal SDPA over K/V repeated per query head (GQA as transformers does it)."""
    from transformers.integrations.sdpa_attention import repeat_kv

    from engine.model.attention import ShortCausalAttention, causal_bias

    g = torch.Generator().manual_seed(0)
    q = torch.randn(heads, 7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(kv_heads, 7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(kv_heads, 7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    bias = causal_bias(7, heads // kv_heads, torch.float64, "cpu")
    assert torch.autograd.gradcheck(lambda a, b, c: ShortCausalAttention.apply(a, b, c, 0.4, bias), (q, k, v))

    w = torch.randn(heads, 7, 5, dtype=torch.float64, generator=g)
    out = ShortCausalAttention.apply(q, k, v, 0.4, bias)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    groups = heads // kv_heads
    ref = torch.nn.functional.scaled_dot_product_attention(
        q[None], repeat_kv(k[None], groups), repeat_kv(v[None], groups), is_causal=True, scale=0.4)[0]
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_short_causal_attention_bf16_is_as_close_to_fp64_as_sdpa():
    """At a real size (SmolLM2's 9 query / 3 K/V heads of 64, a 150-token document) in bf16, the
    output and all three gradients stay within 2x the error of PyTorch's own bf16 causal SDPA
    (both against fp64; S and dP are bf16 GEMM outputs here, fp32-accumulated in a flash kernel)."""
    from transformers.integrations.sdpa_attention import repeat_kv

    from engine.model.attention import ShortCausalAttention, causal_bias

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(h, 150, 64, dtype=torch.float64, generator=g) for h in (9, 3, 3))
    w = torch.randn(9, 150, 64, dtype=torch.float64, generator=g)

    def run(fn, dtype):
        inputs = [t.to(dtype).clone().requires_grad_() for t in (q, k, v)]
        out = fn(*inputs)
        out.backward(w.to(dtype))
        return [out.detach().double()] + [t.grad.double() for t in inputs]

    def sdpa(a, b, c):
        return torch.nn.functional.scaled_dot_product_attention(
            a[None], repeat_kv(b[None], 3), repeat_kv(c[None], 3), is_causal=True, scale=0.125)[0]

    def short(a, b, c):
        return ShortCausalAttention.apply(a, b, c, 0.125, causal_bias(150, 3, a.dtype, "cpu"))

    ref = run(sdpa, torch.float64)
    for name, s, f, r in zip(("out", "dq", "dk", "dv"), run(short, torch.bfloat16), run(sdpa, torch.bfloat16), ref):
        short_err, sdpa_err = ((s - r).norm() / r.norm()).item(), ((f - r).norm() / r.norm()).item()
        assert short_err < 2 * sdpa_err, (name, short_err, sdpa_err)


def test_causal_bias_masks_the_future_per_group_and_is_cached():
    from engine.model.attention import causal_bias

    cache = {}
    bias = causal_bias(3, 2, torch.float32, "cpu", cache)
    inf = float("-inf")
    block = torch.tensor([[0, inf, inf], [0, 0, inf], [0, 0, 0]])
    assert torch.equal(bias, torch.cat([block, block]))             # [g n, n]: one block per group member
    assert causal_bias(3, 2, torch.float32, "cpu", cache) is bias    # built once per length
    assert causal_bias(3, 2, torch.bfloat16, "cpu", cache) is not bias


def _bf16_packed_step(model, short: int, ids, pos):
    """Logits and every grad of a bf16 forward/backward of a packed batch: a bf16 base under bf16
    autocast, as build_model makes it for train.precision=bf16 (q, k, v reach attention in bf16)."""
    from engine.model.attention import set_cpu_short_attention

    model = copy.deepcopy(model).to(torch.bfloat16).train()
    set_cpu_short_attention(model, short)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids, position_ids=pos.clone(), use_cache=False).logits
    logits.float().square().mean().backward()
    return logits.float().detach(), {n: p.grad.float() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["llama", "phi3", "qwen2", "gemma", "mistral"])
def test_cpu_short_attention_under_bf16_is_as_close_to_fp32_as_sdpa(monkeypatch, family):
    """A packed bf16 step with train.cpu_short_attention (documents <= 10 tokens: 10, 8, 5 take
    it, 12 and 25 keep SDPA) lands as close to the fp32 reference as the all-SDPA bf16 step does.
    Families: fused qkv (phi3), q/k/v biases (qwen2), a head_dim that is not hidden / heads (gemma),
    mistral."""
    import engine.model.attention as attention
    from tests.conftest import make_tiny_model

    model, _ = make_tiny_model(family)  # 4 heads, 2 KV heads: the grouped path
    model.set_attn_implementation("sdpa")
    attention.set_packed_attention(model, True)
    ids, pos = _packed_inputs(model.config.vocab_size)

    m32 = copy.deepcopy(model).train()
    ref_logits = m32(input_ids=ids, position_ids=pos.clone(), use_cache=False).logits
    ref_logits.square().mean().backward()
    ref_grads = {n: p.grad for n, p in m32.named_parameters()}

    taken = []
    real = attention.ShortCausalAttention.apply
    monkeypatch.setattr(attention.ShortCausalAttention, "apply", lambda q, *a: taken.append(q.shape[1]) or real(q, *a))
    flash = _bf16_packed_step(model, 0, ids, pos)
    assert taken == []
    short = _bf16_packed_step(model, 10, ids, pos)
    assert sorted(taken) == sorted([10, 8, 5] * 2)  # per layer; the 12- and 25-token documents use SDPA

    def err(a, b):
        return ((a - b).norm() / b.norm()).item()
    flash_err, short_err = err(flash[0], ref_logits.detach()), err(short[0], ref_logits.detach())
    assert short_err < 1.5 * flash_err + 1e-3, (short_err, flash_err)
    for name, grad in ref_grads.items():
        if grad.abs().sum() == 0:
            continue
        f, s = err(flash[1][name], grad), err(short[1][name], grad)
        assert s < 1.5 * f + 1e-2, (name, s, f)


# ----------------------------------------------------------------------------- train.batch_short_documents

@pytest.mark.parametrize("limit", [256, 6])  # 6: the 9- and 7-token documents go through SDPA
def test_packed_short_attention_equals_attention_per_document(limit):
    """PackedShortAttention in float64 over two packed rows with GQA: output and q, k, v gradients
    equal causal SDPA run per document (also where long documents come in from SDPA), and its
    hand-written backward passes gradcheck."""
    from transformers.integrations.sdpa_attention import repeat_kv

    from engine.model.attention import _packed_short_attention

    lengths = [[5, 9, 3, 7], [10, 4, 10]]
    g = torch.Generator().manual_seed(0)
    # [B, T, H, D] storage seen as [B, H, T, D], as transformers hands q, k, v over
    q, k, v = (torch.randn(2, 24, h, 4, dtype=torch.float64, generator=g).transpose(1, 2).requires_grad_()
               for h in (6, 2, 2))

    def packed(a, b, c):
        return _packed_short_attention(a, b, c, lengths, limit, 0.3, 0.0, 0.3, {})

    def per_document(a, b, c):
        rows = []
        for row, n_docs in enumerate(lengths):
            outs = [torch.nn.functional.scaled_dot_product_attention(
                x[row:row + 1], repeat_kv(y[row:row + 1], 3), repeat_kv(z[row:row + 1], 3), is_causal=True, scale=0.3)
                for x, y, z in zip(a.split(n_docs, 2), b.split(n_docs, 2), c.split(n_docs, 2))]
            rows.append(torch.cat(outs, 2))
        return torch.cat(rows).transpose(1, 2)                                  # [B, T, H, D]

    w = torch.randn(2, 24, 6, 4, dtype=torch.float64, generator=g)
    out, ref = packed(q, k, v), per_document(q, k, v)
    torch.testing.assert_close(out, ref)
    for a, b in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(packed, (q, k, v))


@pytest.mark.parametrize("family", ["llama", "phi3", "qwen2", "gemma"])
def test_batch_short_documents_step_equals_one_node_per_document(family):
    """A packed bf16 training step gives the same logits and gradients with all documents in one
    PackedShortAttention node as with a ShortCausalAttention node per document: bit for bit (the
    same kernels on the same operands per document)."""
    import engine.model.attention as attention
    from tests.conftest import make_tiny_model

    model, _ = make_tiny_model(family)
    model.set_attn_implementation("sdpa")
    attention.set_packed_attention(model, True)
    ids, pos = _packed_inputs(model.config.vocab_size)
    per_node = _bf16_packed_step(model, 30, ids, pos)
    attention.set_batch_short_documents(model, True)
    nodes = []
    real = attention.PackedShortAttention.apply
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention.PackedShortAttention, "apply", lambda *a: nodes.append(len(a[4])) or real(*a))
        one_node = _bf16_packed_step(model, 30, ids, pos)
    assert nodes == [5] * model.config.num_hidden_layers        # both rows' documents, one node a layer
    torch.testing.assert_close(one_node[0], per_node[0], rtol=0, atol=0)
    for name, grad in per_node[1].items():
        torch.testing.assert_close(one_node[1][name], grad, rtol=0, atol=0, msg=name)


def test_cpu_short_attention_stays_off_in_fp32_with_dropout_and_at_zero():
    import engine.model.attention as attention

    class Attn(nn.Module):
        _engine_cpu_short_attention = 256
    bf16, fp32 = torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1)
    assert attention._short_attention_limit(Attn(), bf16, 0.0) == 256
    assert attention._short_attention_limit(Attn(), fp32, 0.0) == 0          # fp32: the flash kernel is as fast
    assert attention._short_attention_limit(Attn(), bf16, 0.1) == 0          # attention dropout: SDPA
    assert attention._short_attention_limit(nn.Module(), bf16, 0.0) == 0     # not switched on
