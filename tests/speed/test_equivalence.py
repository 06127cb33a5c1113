"""Speed switches compute the same thing as the plain path: fused_lora (LoRALinear's addmm forward)
on a float and a 4-bit base, in fp32 and under autocast, and a whole tiny-model step; packed
attention (per document) against transformers' masked SDPA; the CPU short-document kernels
against SDPA; every switch of the speed plan together, with activation checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from engine.config import ModelConfig, PeftConfig
from engine.training.loss import causal_lm_loss
from engine.layers.lora import LoRALinear, lora_state_dict, set_fused_lora
from engine.model.build import build_model
from tests.conftest import (apply_speed, assert_close_reduced, make_tiny_model, make_tiny_model_dir, packed_batch,
                            use_packed_attention)


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


# ----------------------------------------------------------------------------- packed attention

LENGTHS = [[10, 12, 8], [5, 25]]  # two rows packed differently


def _packed_inputs(vocab: int, lengths=LENGTHS) -> dict:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (len(lengths), sum(lengths[0])), generator=g)
    return packed_batch(ids, lengths, labels=torch.roll(ids, -1, 1))


def _forward(model, batch: dict, packing: bool = True):
    """Logits of a packed batch: with its packing context (the engine's path), or with the
    position_ids alone (transformers' block-diagonal mask from the restarts)."""
    extra = {"packing": batch["packing"]} if packing else {}
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"].clone(), use_cache=False,
                 **extra).logits


@pytest.mark.parametrize("family", ["llama", "phi3", "qwen2"])
def test_packed_attention_equals_masked_sdpa(family):
    from engine.model.attention import NAME

    model, _ = make_tiny_model(family)
    model.set_attn_implementation("sdpa")
    packed = copy.deepcopy(model)
    use_packed_attention(packed)
    assert packed.config._attn_implementation == NAME
    batch = _packed_inputs(model.config.vocab_size)
    outs = []
    for m, with_context in ((model, False), (packed, True)):
        m.train()
        logits = _forward(m, batch, with_context)
        logits.square().mean().backward()
        outs.append((logits.detach(), {n: p.grad for n, p in m.named_parameters()}))
    terms = batch["input_ids"].numel() * model.config.hidden_size
    assert_close_reduced(outs[1][0], outs[0][0], terms=terms)
    for name, grad in outs[0][1].items():
        assert_close_reduced(outs[1][1][name], grad, terms=terms, msg=name)
    use_packed_attention(packed, False)
    assert packed.config._attn_implementation == "sdpa"


def test_packed_attention_runs_one_causal_call_per_document(monkeypatch):
    """The per-document path is really taken for packed rows (3 + 2 documents x 2 layers), and
    not for rows holding one document (transformers' SDPA path, bit-identical)."""
    import engine.model.attention as attention

    model, _ = make_tiny_model("llama")
    model.set_attn_implementation("sdpa")
    plain = copy.deepcopy(model)
    use_packed_attention(model)
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append((q.shape[2], kw.get("is_causal"), kw.get("attn_mask")))
        return real(q, k, v, **kw)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    batch = _packed_inputs(model.config.vocab_size, [[10, 12, 8], [12, 18]])
    with torch.no_grad():
        _forward(model, batch)
    assert sorted(n for n, _, _ in calls) == sorted([10, 12, 8, 12, 18] * 2)
    assert all(causal and mask is None for _, causal, mask in calls)

    calls.clear()
    single = _packed_inputs(model.config.vocab_size, [[30], [30]])
    with torch.no_grad():
        a = _forward(model, single)
        b = _forward(plain, single, packing=False)
    # one whole-row call per layer per model (transformers' SDPA path), none split
    assert [n for n, _, _ in calls] == [30] * 4
    assert torch.equal(a, b)


def test_packed_attention_keeps_cudnn_out_of_the_per_document_calls(monkeypatch):
    """On CUDA the per-document calls run with SDPA's flash / memory-efficient / math backends
    only: cuDNN attention plans every new sequence length, and each document is one.
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
    model, _ = make_tiny_model("llama")
    model.set_attn_implementation("sdpa")
    packed = copy.deepcopy(model)
    use_packed_attention(packed)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        torch.testing.assert_close(packed(input_ids=ids, attention_mask=mask, use_cache=False).logits,
                                   model(input_ids=ids, attention_mask=mask, use_cache=False).logits, atol=0, rtol=0)
        gen = [m.generate(input_ids=ids[:1], max_new_tokens=5, do_sample=False, use_cache=True,
                          pad_token_id=model.config.eos_token_id) for m in (model, packed)]
    assert torch.equal(gen[0], gen[1])


def test_packed_attention_keeps_eager_models_as_they_are():
    model, _ = make_tiny_model("llama")  # built with attn_implementation="eager"
    use_packed_attention(model)
    assert model.config._attn_implementation == "eager"


def test_packed_attention_refuses_a_keyword_it_does_not_implement():
    from engine.model.attention import PackedAttentionError, packed_attention

    batch = _packed_inputs(64)
    q = torch.randn(2, 4, 30, 8)
    module = nn.Module()
    with pytest.raises(PackedAttentionError, match=r"Module passes \['s_aux'\] to its attention function"):
        packed_attention(module, q, q, q, None, packing=batch["packing"], s_aux=torch.zeros(4))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_speed_switch_with_checkpointing_and_through_build_model(tmp_path, precision):
    """Real path: build_model + the speed plan (every switch: packed attention, fused and grouped
    LoRA, compiled norms and loss, in bf16 the CPU's short-document kernels) + activation
    checkpointing (the recompute goes through the same kernels) gives the reference path's loss
    and LoRA gradients, within the rounding of the dtype over the reduction's size."""
    from engine.model.build import enable_activation_checkpointing
    from engine.training import amp
    from engine.training.objective import CausalLM

    dtype = amp.DTYPES[precision]
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(path=str(make_tiny_model_dir(tmp_path, "llama")), attn_implementation="sdpa"),
                           PeftConfig(r=4, alpha=8.0), "cpu", dtype)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.normal_(0, 0.1)
    batch = _packed_inputs(model.config.vocab_size)
    results = []
    for mode, ckpt in (("off", False), ("auto", False), ("auto", True)):
        m = copy.deepcopy(model).train()
        if ckpt:
            enable_activation_checkpointing(m)
        kernels = apply_speed(m, precision, mode=mode)
        with amp.autocast(precision, torch.device("cpu")):
            loss, _ = CausalLM(chunk_size=7, kernels=kernels).loss_sum(m, batch if mode == "auto" else
                                                                          {k: v for k, v in batch.items() if k != "packing"})
        loss.backward()
        results.append((loss.detach(), {k: v.grad for k, v in lora_state_dict(m).items()}))
    terms = batch["input_ids"].numel() * model.config.hidden_size
    for loss, grads in results[1:]:
        assert_close_reduced(loss, results[0][0], terms=terms, dtype=dtype)
        for key, grad in results[0][1].items():
            assert_close_reduced(grads[key], grad, terms=terms, dtype=dtype, msg=key)


# ----------------------------------------------------------------------------- the CPU's short-document kernels

@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_short_causal_attention_gradcheck_and_equals_sdpa(heads, kv_heads):
    """ShortCausalAttention in float64: its hand-written backward passes gradcheck, and forward and
    gradients equal causal SDPA over K/V repeated per query head (GQA as transformers does it)."""
    from transformers.integrations.sdpa_attention import repeat_kv

    from engine.speed.cpu_attention import ShortCausalAttention, causal_bias

    g = torch.Generator().manual_seed(0)
    q = torch.randn(heads, 7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(kv_heads, 7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(kv_heads, 7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    bias = causal_bias(7, heads // kv_heads, torch.float64, "cpu")
    assert torch.autograd.gradcheck(lambda a, b, c: ShortCausalAttention.apply(a, b, c, 0.4, bias), (q, k, v),
                                    fast_mode=True)

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

    from engine.speed.cpu_attention import ShortCausalAttention, causal_bias

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
    from engine.speed.cpu_attention import causal_bias

    cache = {}
    bias = causal_bias(3, 2, torch.float32, "cpu", cache)
    inf = float("-inf")
    block = torch.tensor([[0, inf, inf], [0, 0, inf], [0, 0, 0]])
    assert torch.equal(bias, torch.cat([block, block]))             # [g n, n]: one block per group member
    assert causal_bias(3, 2, torch.float32, "cpu", cache) is bias    # built once per length
    assert causal_bias(3, 2, torch.bfloat16, "cpu", cache) is not bias


def _bf16_packed_step(model, batch, **speed):
    """Logits and every grad of a bf16 forward/backward of a packed batch: a bf16 base under bf16
    autocast, as build_model makes it for train.precision=bf16 (q, k, v reach attention in bf16)."""
    model = copy.deepcopy(model).to(torch.bfloat16).train()
    apply_speed(model, "bf16", compile=False, **speed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = _forward(model, batch)
    logits.float().square().mean().backward()
    return logits.float().detach(), {n: p.grad.float() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["llama", "phi3", "qwen2", "gemma", "mistral"])
def test_cpu_short_attention_under_bf16_is_as_close_to_fp32_as_sdpa(monkeypatch, family):
    """A packed bf16 step with the short-document kernel (documents <= 10 tokens: 10, 8, 5 take
    it, 12 and 25 keep SDPA) lands as close to the fp32 reference as the all-SDPA bf16 step does.
    Families: fused qkv (phi3), q/k/v biases (qwen2), a head_dim that is not hidden / heads (gemma),
    mistral."""
    import engine.speed.cpu_attention as cpu_attention
    import engine.speed.plan as speed_plan

    model, _ = make_tiny_model(family)  # 4 heads, 2 KV heads: the grouped path
    model.set_attn_implementation("sdpa")
    batch = _packed_inputs(model.config.vocab_size)

    m32 = copy.deepcopy(model).train()
    use_packed_attention(m32)
    ref_logits = _forward(m32, batch)
    ref_logits.square().mean().backward()
    ref_grads = {n: p.grad for n, p in m32.named_parameters()}

    taken = []
    real = cpu_attention.ShortCausalAttention.apply
    monkeypatch.setattr(cpu_attention.ShortCausalAttention, "apply", lambda q, *a: taken.append(q.shape[1]) or real(q, *a))
    flash = _bf16_packed_step(model, batch, disable=["short_attention", "row_attention"])  # SDPA per document
    assert taken == []
    monkeypatch.setattr(speed_plan, "SHORT_ATTENTION_MAX_LEN", 10)
    short = _bf16_packed_step(model, batch, disable=["batch_short_documents"])
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


@pytest.mark.parametrize("limit", [256, 6])  # 6: the 9- and 7-token documents go through SDPA
def test_packed_short_attention_equals_attention_per_document(limit):
    """The batched short-document kernel in float64 over two packed rows with GQA: output and q, k,
    v gradients equal causal SDPA run per document (also where long documents come in from SDPA),
    and its hand-written backward passes gradcheck."""
    from engine.model.attention import sdpa_per_document
    from engine.model.packing import PackingContext
    lengths = [[5, 9, 3, 7], [10, 4, 10]]
    docs = [(b, sum(row[:i]), n) for b, row in enumerate(lengths) for i, n in enumerate(row)]
    context = PackingContext(lengths, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 48, 0)
    g = torch.Generator().manual_seed(0)
    # [B, T, H, D] storage seen as [B, H, T, D], as transformers hands q, k, v over
    q, k, v = (torch.randn(2, 24, h, 4, dtype=torch.float64, generator=g).transpose(1, 2).requires_grad_()
               for h in (6, 2, 2))

    def packed(a, b, c):
        return _packed_short_node(limit, a, b, c, docs, context)

    w = torch.randn(2, 24, 6, 4, dtype=torch.float64, generator=g)
    out = packed(q, k, v)
    ref = sdpa_per_document(q, k, v, docs, scale=0.3, dropout=0.0, packing=context)
    torch.testing.assert_close(out, ref)
    for a, b in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(packed, (q, k, v), fast_mode=True)


def _packed_short_node(limit, q, k, v, docs, context):
    """What short_document_kernel(limit) runs for bf16 on a CPU, in any dtype (the kernel itself
    defers to SDPA outside bf16): documents up to `limit` in the node, longer ones by SDPA."""
    from engine.speed.cpu_attention import PackedShortAttention, causal_bias

    groups = q.shape[1] // k.shape[1]
    short = [d for d in docs if d[2] <= limit]
    long = [d for d in docs if d[2] > limit]
    biases = {n: causal_bias(n, groups, q.dtype, q.device, context.kernel_cache) for n in {d[2] for d in short}}
    long_outs = [torch.nn.functional.scaled_dot_product_attention(
        q[b:b + 1, :, s:s + n], k[b:b + 1, :, s:s + n].repeat_interleave(groups, 1),
        v[b:b + 1, :, s:s + n].repeat_interleave(groups, 1), is_causal=True, scale=0.3) for b, s, n in long]
    return PackedShortAttention.apply(q, k, v, 0.3, short, biases, long, *long_outs)


@pytest.mark.parametrize("family", ["llama", "phi3", "qwen2", "gemma"])
def test_batch_short_documents_step_equals_one_node_per_document(family):
    """A packed bf16 training step gives the same logits and gradients with all documents in one
    PackedShortAttention node as with a ShortCausalAttention node per document: bit for bit (the
    same kernels on the same operands per document)."""
    import engine.speed.cpu_attention as cpu_attention

    model, _ = make_tiny_model(family)
    model.set_attn_implementation("sdpa")
    batch = _packed_inputs(model.config.vocab_size)
    per_node = _bf16_packed_step(model, batch, disable=["batch_short_documents"])
    nodes = []
    real = cpu_attention.PackedShortAttention.apply
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cpu_attention.PackedShortAttention, "apply", lambda *a: nodes.append(len(a[4])) or real(*a))
        one_node = _bf16_packed_step(model, batch)
    assert nodes == [5] * model.config.num_hidden_layers        # both rows' documents, one node a layer
    torch.testing.assert_close(one_node[0], per_node[0], rtol=0, atol=0)
    for name, grad in per_node[1].items():
        torch.testing.assert_close(one_node[1][name], grad, rtol=0, atol=0, msg=name)


def test_cpu_short_attention_stays_off_in_fp32_and_with_dropout(monkeypatch):
    """The kernel defers to SDPA per document outside CPU bf16 and under attention dropout."""
    import engine.speed.cpu_attention as cpu_attention
    from engine.model.packing import PackingContext

    taken = []
    monkeypatch.setattr(cpu_attention, "sdpa_per_document", lambda *a, **k: taken.append(a[0].dtype) or "sdpa")
    kernel = cpu_attention.short_document_kernel(256)
    context = PackingContext([[3]], torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 3, 0)
    q = torch.zeros(1, 2, 3, 4)
    assert kernel(q, q, q, [(0, 0, 3)], scale=0.5, dropout=0.0, packing=context) == "sdpa"       # fp32
    q16 = q.to(torch.bfloat16)
    assert kernel(q16, q16, q16, [(0, 0, 3)], scale=0.5, dropout=0.1, packing=context) == "sdpa"  # dropout
    assert taken == [torch.float32, torch.bfloat16]
    assert speed_plan_short("fp32") == 0 and speed_plan_short("bf16") > 0


def speed_plan_short(precision: str) -> int:
    from engine.config import SpeedConfig
    from engine.speed import plan as speed_plan

    return speed_plan.resolve(SpeedConfig(), device=torch.device("cpu"), precision=precision).short_attention
