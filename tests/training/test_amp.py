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


def test_unscale_divides_by_scale():
    s = DynamicLossScaler(enabled=True, init_scale=4.0)
    params = _params()
    assert s.unscale_(params) == []
    assert torch.equal(params[0][1].grad, torch.full((3,), 2.0))


def test_inf_grad_is_named_and_scale_halves():
    s = DynamicLossScaler(enabled=True, init_scale=1024.0)
    params = _params()
    params[1][1].grad[0] = math.inf
    assert s.unscale_(params) == ["b"]
    s.update(found_inf=True)
    assert s.scale == 512.0 and s.consecutive_skips == 1
    s.update(found_inf=False)
    assert s.consecutive_skips == 0


def test_scale_grows_after_interval_and_state_round_trips():
    s = DynamicLossScaler(enabled=True, init_scale=8.0, growth_interval=3)
    for _ in range(3):
        s.update(found_inf=False)
    assert s.scale == 16.0
    t = DynamicLossScaler(enabled=True)
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict()


def test_disabled_scaler_is_identity_but_still_detects_nan():
    s = DynamicLossScaler(enabled=False)
    params = _params()
    params[0][1].grad[1] = float("nan")
    assert s.scale == 1.0
    assert s.unscale_(params) == ["a"]
    assert params[1][1].grad[0] == 4.0
