"""Precision resolution and the dynamic loss scaler."""

import math

import pytest
import torch

from engine.training.amp import DynamicLossScaler, autocast, resolve_precision


def test_auto_on_cpu_follows_native_bf16_and_explicit_fp16_stays(monkeypatch):
    from engine.training import amp

    cpu = torch.device("cpu")
    monkeypatch.setattr(amp, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", cpu) == "fp32"
    monkeypatch.setattr(amp, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision("auto", cpu) == "bf16"
    assert resolve_precision("fp16", cpu) == "fp16"
    with autocast("fp16", cpu):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float16


@pytest.mark.parametrize("device,compute,expected", [
    ("cpu", torch.float32, torch.float32),
    ("cpu", torch.bfloat16, torch.bfloat16),   # CPUs with AVX512-BF16 / AMX: fast bf16 matmuls
    ("cpu", torch.float16, torch.float32),     # no fast fp16 matmul on a CPU: keep an fp32 base
    ("cuda", torch.float16, torch.float16),
    ("cuda", torch.bfloat16, torch.bfloat16),
])
def test_auto_base_dtype_follows_a_fast_16_bit_compute_dtype(device, compute, expected):
    from engine.model.build import resolve_dtype

    assert resolve_dtype("auto", torch.device(device), compute) == expected
    assert resolve_dtype("fp32", torch.device(device), compute) == torch.float32


def test_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch):
    import warnings

    from engine.training import amp

    cpu = torch.device("cpu")
    monkeypatch.setattr(amp, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="without native bf16 matmuls .* slower than fp32"):
        assert resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(amp, "cpu_has_native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("bf16", cpu) == "bf16"
        assert resolve_precision("auto", cpu) == "bf16"


def _params():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    a.grad, b.grad = torch.full((3,), 8.0), torch.full((2,), 4.0)
    return [("a", a), ("b", b)]


def _flag(value: float) -> torch.Tensor:
    return torch.tensor(value)


def test_unscale_divides_by_scale_and_flags_nothing():
    s = DynamicLossScaler(enabled=True, init_scale=4.0)
    params = _params()
    found_inf = s.unscale_(params)
    assert found_inf.dim() == 0 and float(found_inf) == 0.0
    assert torch.equal(params[0][1].grad, torch.full((3,), 2.0))


def test_inf_grad_is_flagged_named_and_scale_halves():
    s = DynamicLossScaler(enabled=True, init_scale=1024.0)
    params = _params()
    params[1][1].grad[0] = math.inf
    found_inf = s.unscale_(params)
    assert float(found_inf) == 1.0
    s.update(found_inf)
    state = s.read()
    assert state["scale"] == 512.0 and state["consecutive_skips"] == 1 and state["skipped_steps"] == 1
    assert state["overflowed"] == ["b"]
    params[1][1].grad[0] = 1.0
    s.update(s.unscale_(params))
    state = s.read()
    assert state["consecutive_skips"] == 0 and state["skipped_steps"] == 1
    assert state["overflowed"] == ["b"]  # the latest skipped step's, kept for the diagnosis


def test_scale_never_falls_below_min_scale():
    s = DynamicLossScaler(enabled=True, init_scale=2.0, min_scale=1.0)
    for _ in range(3):
        s.update(_flag(1.0))
    assert s.read()["scale"] == 1.0 and s.read()["consecutive_skips"] == 3


def test_scale_grows_after_interval_and_state_round_trips():
    s = DynamicLossScaler(enabled=True, init_scale=8.0, growth_interval=3)
    for _ in range(3):
        s.update(_flag(0.0))
    assert s.read()["scale"] == 16.0
    s.update(_flag(0.0))
    t = DynamicLossScaler(enabled=True)
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict() and s.state_dict()["good_steps"] == 1


def test_disabled_scaler_checks_nothing():
    """bf16 / fp32: no finiteness test, the loss is not scaled, the step is never skipped."""
    s = DynamicLossScaler(enabled=False)
    params = _params()
    params[0][1].grad[1] = float("nan")
    assert s.loss_scale == 1.0
    assert s.unscale_(params) is None
    assert params[1][1].grad[0] == 4.0


@pytest.mark.parametrize("fused", [True, False])
def test_a_flagged_step_leaves_weights_and_adam_state_alone(fused):
    """Fused AdamW skips on the device; foreach AdamW (no device-side skip) reads the flag."""
    p = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([p], lr=0.1, fused=fused, foreach=None if fused else True)
    s = DynamicLossScaler(enabled=True, init_scale=2.0)
    p.grad = torch.full((3,), 2.0)
    s.step(optimizer, s.unscale_([("p", p)]))
    after_one = (p.detach().clone(), {k: v.clone() for k, v in optimizer.state[p].items()})
    p.grad = torch.tensor([1.0, math.inf, 1.0])
    s.step(optimizer, s.unscale_([("p", p)]))
    assert torch.equal(p.detach(), after_one[0])
    for key, value in optimizer.state[p].items():
        assert torch.equal(value, after_one[1][key]), key
    assert not hasattr(optimizer, "found_inf")
