"""engine/speed/compiled.py (speed.compile). compile_norms: compiled RMSNorm computes what the module's own forward
does (forward and backward, fp32 and bf16, per norm and in a whole LoRA step), only in the training
forward, and switches on and off without touching parameters. compile_loss: the fused
cross-entropy equals the eager chunked loss (loss, hidden and lm_head LoRA gradients, fp32 and
bf16), and only where a gradient is needed without a logit transform. auto / true / false
resolve as documented."""

from __future__ import annotations

import pytest
import torch

from engine.config import ConfigError, SpeedConfig
from engine.speed import compiled
from engine.speed import plan as speed_plan
from engine.speed.compiled import CompileError, is_rms_norm, set_compiled_norms
from engine.training.loss import EAGER, StepKernels
from tests.conftest import make_tiny_model

CPU = torch.device("cpu")


def _norm_outputs(model, x_of, dtype):
    """(out, d input, d weight) of every RMSNorm of `model` on a seeded input of its width."""
    results = []
    for i, norm in enumerate(m for m in model.modules() if is_rms_norm(m)):
        norm.weight.requires_grad_(True)
        norm.weight.grad = None
        x = x_of(norm, i).to(dtype).requires_grad_(True)
        out = norm(x)
        (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        results.append((out.detach().float(), x.grad.float(), norm.weight.grad.float()))
    return results


@pytest.mark.parametrize("family", ["llama", "gemma", "qwen3"])  # w * y; (1 + w) * y in fp32; per-head q/k norms
def test_compiled_norms_equal_the_modules_forward_and_backward(family):
    model, _ = make_tiny_model(family)
    with torch.no_grad():
        for m in model.modules():
            if is_rms_norm(m):
                m.weight.normal_(0.5, 0.3)

    def x_of(norm, i):
        g = torch.Generator().manual_seed(i)
        return 3 * torch.randn(2, 7, norm.weight.shape[0], generator=g)

    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, None)):
        model.to(dtype)
        reference = _norm_outputs(model.double(), x_of, torch.float64) if tol is None else None
        model.to(dtype)
        eager = _norm_outputs(model, x_of, dtype)
        assert set_compiled_norms(model, True) == sum(map(is_rms_norm, model.modules())) >= 3
        compiled = _norm_outputs(model, x_of, dtype)
        set_compiled_norms(model, False)
        for e, c, r in zip(eager, compiled, reference or eager):
            for a, b, ref in zip(e, c, r):
                if tol is not None:
                    torch.testing.assert_close(b, a, atol=tol, rtol=tol)
                else:  # bf16: the compiled kernel's error against fp64 within 2x the eager one's
                    assert (b - ref).abs().max() <= 2 * (a - ref).abs().max() + 1e-2 * ref.abs().max()


def test_a_bf16_lora_step_with_compiled_norms_matches_eager():
    from engine.layers.lora import lora_state_dict, mark_only_lora_trainable
    from engine.layers.inject import inject_lora

    model, _ = make_tiny_model("llama")
    torch.manual_seed(0)
    inject_lora(model, "all-linear", 4, 8.0)
    mark_only_lora_trainable(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    ids = torch.randint(0, model.config.vocab_size, (1, 24))

    def step(dtype):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.detach().float(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    ref_loss, ref_grads = step(torch.float32)
    eager_loss, eager_grads = step(torch.bfloat16)
    set_compiled_norms(model, True)
    loss, grads = step(torch.bfloat16)
    set_compiled_norms(model, False)
    assert abs(loss - ref_loss) <= 2 * abs(eager_loss - ref_loss) + 1e-3
    for k in ref_grads:
        err_eager = (eager_grads[k] - ref_grads[k]).norm()
        assert (grads[k] - ref_grads[k]).norm() <= 2 * err_eager + 1e-3 * ref_grads[k].norm(), k
    assert len(grads) == len(lora_state_dict(model)) > 0


def test_only_the_training_forward_is_compiled_and_switching_off_restores_the_module(monkeypatch):
    calls = []

    def fake_compile(fn, dynamic):
        assert dynamic is True  # packed rows change length every step: one graph for all

        def compiled(*args, **kwargs):
            calls.append(args[0].shape)
            return fn(*args, **kwargs)
        return compiled
    monkeypatch.setattr(compiled.torch, "compile", fake_compile)
    model, _ = make_tiny_model("llama")
    keys = list(model.state_dict())
    n = set_compiled_norms(model, True)
    assert n == 2 * model.config.num_hidden_layers + 1
    assert set_compiled_norms(model, True) == n  # idempotent: not compiled twice
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    with torch.no_grad():
        model(input_ids=ids)
        model.generate(ids, max_new_tokens=2, do_sample=False)
    assert calls == []  # evaluation and generation: eager
    model(input_ids=ids).logits.sum().backward()
    assert len(calls) == n
    assert list(model.state_dict()) == keys
    set_compiled_norms(model, False)
    assert not any("forward" in m.__dict__ for m in model.modules())
    model(input_ids=ids)
    assert len(calls) == n


def _compiles(mode, device=CPU, fsdp=False, precision="bf16") -> bool:
    plan = speed_plan.resolve(SpeedConfig(compile=mode), device=device, precision=precision, fsdp=fsdp)
    assert plan.compile_norms == plan.compile_loss
    return plan.compile_norms


def test_auto_true_false_resolve_as_documented(monkeypatch):
    assert _compiles(False) is False
    assert _compiles("auto") is True  # this machine has a C++ compiler
    assert _compiles("auto", precision="fp32") is False  # measured no faster
    assert _compiles(True, precision="fp32") is True
    assert _compiles(True) is True
    assert _compiles("auto", fsdp=True) is False
    assert _compiles("auto", device=torch.device("cuda")) is False  # not measured on a GPU yet
    with pytest.raises(CompileError, match="speed.compile=true: FSDP"):
        _compiles(True, fsdp=True)

    import torch._inductor.cpp_builder as cpp_builder

    def no_compiler():
        raise RuntimeError("no working C++ compiler found")
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    assert "no C++ compiler" in compiled.unavailable_reason(CPU, fsdp=False)
    plan = speed_plan.resolve(SpeedConfig(), device=CPU, precision="bf16")
    assert not plan.compile_norms and any("compile off: inductor finds no C++ compiler" in n for n in plan.notes)
    assert "inductor finds no C++ compiler" in plan.describe()
    with pytest.raises(CompileError, match="speed.compile=true: inductor finds no C.. compiler"):
        _compiles(True)


def test_the_speed_plan_applies_both_and_turns_them_off():
    model, _ = make_tiny_model("llama")
    on = speed_plan.resolve(SpeedConfig(), device=CPU, precision="bf16")
    kernels = speed_plan.apply(on.off("compile_norms", "compile_loss"), model)
    assert kernels.cross_entropy is None
    assert not any(compiled._EAGER in m.__dict__ for m in model.modules())  # no compiled norm (fused ones may stand)
    kernels = speed_plan.apply(on, model)
    assert kernels.cross_entropy is not None
    assert all(compiled._EAGER in m.__dict__ for m in model.modules() if is_rms_norm(m))
    kernels = speed_plan.apply(on.off("compile_norms", "compile_loss"), model)
    assert kernels.cross_entropy is None
    assert not any(compiled._EAGER in m.__dict__ for m in model.modules())  # no compiled norm (fused ones may stand)


# ----------------------------------------------------------------------------- compile_loss

def _loss_and_grads(hidden, labels, head, *, compiled_loss, chunk, transform=None, dtype=None):
    from engine.training.loss import lm_head_loss

    h = hidden.detach().clone().requires_grad_(True)
    head.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        kernels = StepKernels(cross_entropy=compiled.compiled_cross_entropy()) if compiled_loss is True else \
            (compiled_loss or EAGER)
        loss = lm_head_loss(h, labels, head, transform=transform, chunk_size=chunk, kernels=kernels)
    (loss * 0.5).backward()  # a scale (as the loss scaler's) reaches every gradient
    return [loss.detach()] + [t.grad.float() for t in [h] + [p for p in head.parameters() if p.requires_grad]]


def _head_and_batch(dtype=torch.float32):
    from engine.layers.lora import LoRALinear

    torch.manual_seed(0)
    head = LoRALinear(torch.nn.Linear(32, 300, bias=False), r=4, alpha=8.0)  # a LoRA-targeted lm_head
    with torch.no_grad():
        head.lora_B.weight.normal_(0, 0.1)
    head.base_layer.to(dtype).weight.requires_grad_(False)
    hidden = torch.randn(2, 9, 32)
    labels = torch.randint(0, 300, (2, 9))
    labels[0, :3] = -100
    return head, hidden.to(dtype), labels


@pytest.mark.parametrize("chunk", [4, 1024])
def test_compiled_loss_equals_the_eager_chunked_loss_in_fp32(chunk):
    head, hidden, labels = _head_and_batch()
    eager = _loss_and_grads(hidden, labels, head, compiled_loss=False, chunk=chunk)
    fused = _loss_and_grads(hidden, labels, head, compiled_loss=True, chunk=chunk)
    for a, b in zip(eager, fused):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert all(g.abs().sum() > 0 for g in fused[1:])


def test_compiled_loss_under_bf16_is_as_close_to_fp32_as_the_eager_one():
    head, hidden, labels = _head_and_batch(torch.bfloat16)
    reference = _loss_and_grads(hidden.float(), labels, head.float(), compiled_loss=False, chunk=4)
    head.base_layer.to(torch.bfloat16)
    eager = _loss_and_grads(hidden, labels, head, compiled_loss=False, chunk=4, dtype=torch.bfloat16)
    fused = _loss_and_grads(hidden, labels, head, compiled_loss=True, chunk=4, dtype=torch.bfloat16)
    for ref, a, b in zip(reference, eager, fused):
        assert (b - ref).abs().max() <= 2 * (a - ref).abs().max() + 1e-3 * ref.abs().max()


def test_compiled_loss_is_used_only_with_gradients_and_without_a_transform():
    calls = []
    fn = compiled.compiled_cross_entropy()

    def counting(z, y):
        calls.append(z.dtype)
        return fn(z, y)
    kernels = StepKernels(cross_entropy=counting)
    head, hidden, labels = _head_and_batch()
    _loss_and_grads(hidden, labels, head, compiled_loss=kernels, chunk=4)
    assert len(calls) == 4  # 15 labelled rows in chunks of 4
    with torch.no_grad():
        from engine.training.loss import lm_head_loss
        lm_head_loss(hidden, labels, head, chunk_size=4, kernels=kernels)
    _loss_and_grads(hidden, labels, head, compiled_loss=kernels, chunk=4, transform=lambda z: 30 * torch.tanh(z / 30))
    _loss_and_grads(hidden, labels, head, compiled_loss=kernels, chunk=None)
    assert len(calls) == 4
    _loss_and_grads(hidden.to(torch.bfloat16), labels, head, compiled_loss=kernels, chunk=1024, dtype=torch.bfloat16)
    assert calls[-1] == torch.bfloat16  # the head's own dtype, never an fp32 copy


def test_bad_speed_values_are_refused_by_the_config():
    with pytest.raises(ConfigError, match="speed.compile.*'yes' is not one of 'auto', True, False"):
        SpeedConfig(compile="yes").validate()
    with pytest.raises(ConfigError, match="speed.retain_host_memory.*'always' is not one of"):
        SpeedConfig(retain_host_memory="always").validate()
    with pytest.raises(ConfigError, match="speed.mode.*'fast' is not one of 'auto', 'off'"):
        SpeedConfig(mode="fast").validate()
    with pytest.raises(ConfigError, match="speed.disable.*'flash' is not one of 'fused_lora'"):
        SpeedConfig(disable=["flash"]).validate()
    with pytest.raises(ConfigError, match="speed.disable': must be a list"):
        SpeedConfig(disable="grouped_lora").validate()
    SpeedConfig(disable=["grouped_lora", "compile_loss"]).validate()
