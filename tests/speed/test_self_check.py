"""The kernel self-check: a switch that raises or computes something else is turned off, with its line."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import engine.speed.plan as speed_plan
from engine import train as train_mod
from engine.config import PeftConfig, SpeedConfig
from engine.layers.groups import SharedInputGroup
from engine.speed import self_check
from tests.conftest import counting_run_config, make_tiny_model_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("check"), "llama")


def _losses(root, model_dir, **speed) -> list[float]:
    root.mkdir(parents=True, exist_ok=True)
    cfg = counting_run_config(root, model_dir, PeftConfig(r=4, alpha=8, targets="all-linear"), max_steps=4)
    cfg = replace(cfg, train=replace(cfg.train, log_every=1), speed=SpeedConfig(retain_host_memory=False, **speed))
    train_mod.run_training(cfg)
    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_every_check_passes_on_the_reference_device(capsys):
    """On this CPU each switch of the plan agrees with its reference (fp32 and bf16 autocast)."""
    from tests.conftest import make_tiny_model
    from engine.layers.inject import inject_lora

    model, _ = make_tiny_model("llama")
    inject_lora(model, "all-linear", r=4, alpha=8)
    for precision in ("fp32", "bf16"):
        plan = speed_plan.resolve(SpeedConfig(retain_host_memory=False, compile=False), device=torch.device("cpu"),
                                  precision=precision)
        speed_plan.apply(plan, model)
        checked, lines, _ = self_check.check_plan(plan, model, precision=precision)
        assert lines == [] and checked == plan, lines


def test_a_kernel_that_raises_is_turned_off_and_the_run_equals_speed_off(tmp_path, model_dir, monkeypatch, capsys):
    reference = _losses(tmp_path / "off", model_dir, mode="off")

    def boom(self, member, x):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(SharedInputGroup, "project", boom)
    losses = _losses(tmp_path / "raise", model_dir)
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if "self-check turned" in line and "grouped_lora" in line)
    assert "raised RuntimeError: no kernel image" in line and "please report it" in line
    assert "speed: self-check turned 1 switch(es) off" in err
    torch.testing.assert_close(losses, reference, rtol=1e-5, atol=1e-6)


def test_a_kernel_that_computes_wrong_values_is_turned_off(tmp_path, model_dir, monkeypatch, capsys):
    reference = _losses(tmp_path / "off", model_dir, mode="off")
    original = speed_plan.document_kernel

    def off_by_a_bit(plan):
        chosen = original(plan)
        if chosen is None:
            return None
        kernel = chosen[1]
        return "engine_packed_wrong", lambda *args, **kwargs: kernel(*args, **kwargs) * 1.01

    monkeypatch.setattr(speed_plan, "document_kernel", off_by_a_bit)
    unchecked = _losses(tmp_path / "unchecked", model_dir, self_check=False)
    assert max(abs(a - b) for a, b in zip(unchecked, reference)) > 1e-4  # the wrong kernel does train here
    capsys.readouterr()
    losses = _losses(tmp_path / "checked", model_dir)
    # the wrong kernel stands behind every attention switch of the plan (row_attention on this
    # CPU's fp32 rows, then packed_attention's per-document kernel): each is turned off
    lines = [line for line in capsys.readouterr().err.splitlines() if "self-check turned" in line and " off on " in line]
    assert any("packed_attention off" in line for line in lines), lines
    assert all("differs from the reference by 1.0" in line for line in lines), lines
    torch.testing.assert_close(losses, reference, rtol=1e-5, atol=1e-6)


def test_a_new_switch_registers_its_check_with_one_function(monkeypatch):
    """The protocol a new switch (a fused block) uses: a Case of fast and reference callables."""
    monkeypatch.setattr(self_check, "CHECKS", dict(self_check.CHECKS))
    w = torch.randn(8, 8)
    x = torch.randn(4, 8, requires_grad=True)

    @self_check.register_check("fused_lora")
    def _check(plan, shape, model):
        return self_check.Case(fast=lambda: (x @ w.t() * (1 + 1e-3),), reference=lambda: (x @ w.t(),),
                               leaves=(x,), reduction=8)

    model = torch.nn.Linear(8, 8)
    plan = speed_plan.SpeedPlan(grouped_lora=False, packed_attention=False)
    checked, lines, _ = self_check.check_plan(plan, model, precision="fp32")
    assert not checked.fused_lora and "fused_lora off" in lines[0] and "differs" in lines[0]


def test_fused_blocks_and_row_attention_are_checked_and_a_wrong_fused_mlp_is_turned_off(monkeypatch):
    """The CPU plan's fused_blocks and row_attention have checks that pass; a fused MLP Function that
    returns 1% too much is caught and only fused_blocks is turned off."""
    from engine.layers import fused_mlp
    from engine.layers.inject import inject_lora
    from tests.conftest import make_tiny_model

    model, _ = make_tiny_model("llama")
    inject_lora(model, "all-linear", r=4, alpha=8)
    plan = speed_plan.resolve(SpeedConfig(retain_host_memory=False, compile=False), device=torch.device("cpu"),
                              precision="fp32")
    assert plan.fused_blocks and plan.row_attention and {"fused_blocks", "row_attention"} <= set(self_check.CHECKS)
    speed_plan.apply(plan, model)
    assert self_check.check_plan(plan, model, precision="fp32")[1] == []

    real = fused_mlp.LoRAGatedMLP.forward

    def off_by_one_percent(ctx, *args):
        return real(ctx, *args) * 1.01

    monkeypatch.setattr(fused_mlp.LoRAGatedMLP, "forward", staticmethod(off_by_one_percent))
    checked, lines, _ = self_check.check_plan(plan, model, precision="fp32")
    assert checked == plan.off("fused_blocks") and len(lines) == 1, lines
    assert "turned fused_blocks off" in lines[0] and "differs from the reference" in lines[0]
