"""engine/speed/plan.py: one SpeedPlan per run, resolved from (device, precision, config), said in one
line, applied in one place; and the run's first lines say which precision and plan it took."""

from __future__ import annotations

import pytest
import torch

from engine.config import SpeedConfig
from engine.speed import plan as speed_plan
from engine.training import amp

CPU = torch.device("cpu")
CPU_LAYOUT = "onednn" if torch.backends.mkldnn.is_available() else "in_out"
"""The rollout decode copies' layout a CPU's plan picks (engine/speed/onednn_decode.py where it can)."""


def test_auto_on_a_cpu_under_bf16_takes_every_cpu_switch():
    plan = speed_plan.resolve(SpeedConfig(), device=CPU, precision="bf16")
    assert plan.fused_lora and plan.grouped_lora and plan.packed_attention
    assert plan.short_attention == speed_plan.SHORT_ATTENTION_MAX_LEN and plan.batch_short_documents
    fp32 = speed_plan.resolve(SpeedConfig(), device=CPU, precision="fp32")
    assert fp32.short_attention == 0 and not fp32.compile_norms  # the CPU kernels pay in bf16 only


def test_a_gpu_plan_has_no_cpu_kernels_and_fsdp_no_groups():
    plan = speed_plan.resolve(SpeedConfig(), device=torch.device("cuda"), precision="fp16", fsdp=True)
    assert plan.short_attention == 0 and not plan.retain_host_memory and not plan.compile_norms
    assert not plan.grouped_lora and plan.packed_attention and plan.fused_lora
    assert not plan.fused_blocks and plan.row_attention == 0  # FSDP shards; a GPU's rows take varlen
    assert plan.rollout_merge == "" and not plan.rollout_dequantize   # a merged copy of a shard: no
    assert not plan.rollout_lean_decode                                 # its copies too
    assert speed_plan.resolve(SpeedConfig(), device=torch.device("cuda"), precision="bf16").rollout_lean_decode
    assert speed_plan.resolve(SpeedConfig(), device=torch.device("cuda"), precision="bf16").fused_blocks
    assert speed_plan.resolve(SpeedConfig(), device=torch.device("cuda"), precision="bf16").rollout_merge == "out_in"
    assert speed_plan.resolve(SpeedConfig(), device=CPU, precision="fp32").rollout_merge == CPU_LAYOUT
    assert speed_plan.resolve(SpeedConfig(), device=CPU, precision="fp32").rollout_dequantize   # QLoRA: CPU only
    assert not speed_plan.resolve(SpeedConfig(), device=torch.device("cuda"), precision="fp16").rollout_dequantize


def test_rollout_switches_reach_the_rollouts_through_the_step_kernels_and_can_be_turned_off():
    from engine.layers.inject import inject_lora
    from tests.conftest import make_tiny_model

    model, _ = make_tiny_model("llama")
    inject_lora(model, "all-linear", 4, 8.0)
    on = speed_plan.resolve(SpeedConfig(retain_host_memory=False), device=CPU, precision="fp32")
    kernels = speed_plan.apply(on.off("compile_norms", "compile_loss"), model)
    assert (kernels.rollout_merge, kernels.rollout_dequantize, kernels.rollout_lean_decode) == (CPU_LAYOUT, True, True)
    config = SpeedConfig(disable=["rollout_merge"], retain_host_memory=False)
    config.validate()
    kernels = speed_plan.apply(speed_plan.resolve(config, device=CPU, precision="fp32"), model)
    assert (kernels.rollout_merge, kernels.rollout_dequantize) == ("", False)   # no copies, 4-bit ones neither
    off = speed_plan.resolve(SpeedConfig(mode="off"), device=CPU, precision="fp32")
    assert speed_plan.apply(off, model).rollout_merge == ""


def test_off_is_the_reference_path_and_disable_turns_single_switches_off():
    off = speed_plan.resolve(SpeedConfig(mode="off"), device=CPU, precision="bf16")
    assert not any(getattr(off, name) for name in speed_plan.SpeedPlan.SWITCHES)
    assert off.describe() == "speed: reference path (every switch off)"
    some = speed_plan.resolve(SpeedConfig(disable=["grouped_lora", "short_attention"], retain_host_memory=False),
                              device=CPU, precision="bf16")
    assert not some.grouped_lora and some.short_attention == 0 and some.fused_lora
    assert some.describe() == ("speed: fused_lora, fused_blocks, packed_attention, row_attention=256, compile_norms, "
                               f"compile_loss, rollout_merge={CPU_LAYOUT}, rollout_dequantize, rollout_lean_decode")
    # no short-document kernel: rows of <= 256 tokens take row_attention


def test_off_names_an_unknown_switch():
    with pytest.raises(ValueError, match=r"unknown speed switches \['flash'\] \(known: fused_lora, "):
        speed_plan.SpeedPlan().off("flash")


def test_applying_a_plan_switches_the_model_and_back():
    from engine.layers.inject import inject_lora
    from engine.layers.lora import lora_modules
    from tests.conftest import make_tiny_model

    model, _ = make_tiny_model("llama")
    model.set_attn_implementation("sdpa")
    inject_lora(model, "all-linear", 4, 8.0)
    plan = speed_plan.resolve(SpeedConfig(retain_host_memory=False), device=CPU, precision="bf16").off(
        "compile_norms", "compile_loss")
    speed_plan.apply(plan, model)
    assert model.config._attn_implementation.startswith("engine_packed")
    assert all(m.fused for m in lora_modules(model).values())
    assert any(m.shared_input is not None for m in lora_modules(model).values())
    assert any(m.fused_group is not None for m in lora_modules(model).values())  # q/k/v, o (the MLP: its forward)
    speed_plan.apply(speed_plan.resolve(SpeedConfig(mode="off"), device=CPU, precision="bf16"), model)
    assert model.config._attn_implementation == "sdpa"
    assert not any(m.fused or m.shared_input is not None or m.fused_group is not None
                   for m in lora_modules(model).values())


@pytest.mark.parametrize("native,expected", [(True, "bf16"), (False, "fp32")])
def test_precision_auto_on_a_cpu_is_bf16_where_its_matmuls_are_native(monkeypatch, native, expected):
    monkeypatch.setattr(amp, "cpu_has_native_bf16", lambda: native)
    precision, why = amp.choose_precision("auto", CPU)
    assert precision == expected
    assert ("has native bf16" if native else "no native bf16") in why
    assert amp.choose_precision("fp32", CPU) == ("fp32", "asked for")


def test_fused_blocks_fall_back_is_said_beside_the_plan_line(capsys):
    from engine.layers.inject import inject_lora
    from tests.conftest import make_tiny_model

    model, _ = make_tiny_model("llama")
    inject_lora(model, "all-linear", 4, 8.0, use_dora=True)
    plan = speed_plan.resolve(SpeedConfig(retain_host_memory=False), device=CPU, precision="fp32")
    speed_plan.apply(plan, model)
    err = capsys.readouterr().err
    assert "speed: fused_blocks: 0 MLPs" in err and "14 DoRALinear layers" in err, err
