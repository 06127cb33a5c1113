"""The speed switch fused_blocks (engine/model/fused_blocks.py and the Functions in engine/layers/fused_*.py):
a model with the LoRA blocks, RMSNorm and RoPE swapped for Functions with their own backward computes
the reference path's loss and LoRA gradients, for every family the tests build, in fp32 (to the
rounding of a reordered sum) and under bf16 autocast (no further from an fp32 reference than the
reference path is); 4-bit bases, activation checkpointing, cast caches across optimizer steps;
what cannot take it falls back (DoRA, dropout, tiled MLPs, adapters switched off) and says so; the
swap is reversible."""

from __future__ import annotations

import copy

import pytest
import torch

from engine.layers.inject import inject_lora
from engine.layers.lora import adapters_disabled, lora_state_dict, mark_only_lora_trainable
from engine.model.fused_blocks import set_fused_blocks
from tests.conftest import FAMILIES, MORE_FAMILIES, assert_close_reduced, make_tiny_model

# families whose linears LoRA wraps as nn.Linear (GPT-2's Conv1D is swapped on load by the engine's
# builder, not by make_tiny_model)
ALL = [f for f in FAMILIES + tuple(MORE_FAMILIES) if f != "gpt2"]


def _lora_model(family, dropout=0.0, use_dora=False, **overrides):
    model, _ = make_tiny_model(family, **overrides)
    torch.manual_seed(0)
    inject_lora(model, "all-linear", 4, 8.0, dropout=dropout, use_dora=use_dora)
    mark_only_lora_trainable(model)
    with torch.no_grad():
        for name, p in lora_state_dict(model).items():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # a fresh B is 0: make every branch count
    return model.eval()  # gradients still flow; eval only turns the families' own dropout off (OPT, Falcon, ...)


def _step(model, ids, dtype=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = model(input_ids=ids, use_cache=False).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    return logits.detach(), {k: p.grad.clone() for k, p in lora_state_dict(model).items()}


def _ids(model, batch=2, length=12):
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", ALL)
def test_fp32_values_and_gradients_match_the_reference_path(family):
    model = _lora_model(family)
    ids = _ids(model)
    ref_logits, ref_grads = _step(model, ids)
    report = set_fused_blocks(model, True)
    assert report.projections + 3 * report.groups + 3 * report.mlps > 0, report.describe()
    logits, grads = _step(model, ids)
    h = model.config.hidden_size
    assert_close_reduced(logits, ref_logits, terms=4 * h, msg=f"{family} logits")
    for name, g in grads.items():
        assert_close_reduced(g, ref_grads[name], terms=ids.numel() * h, msg=f"{family} {name}")


def test_the_gated_mlp_norms_rope_and_qkv_of_llama_like_families_are_all_taken():
    for family in ("llama", "qwen2", "qwen3", "mistral", "gemma"):
        report = set_fused_blocks(_lora_model(family), True)
        assert (report.mlps, report.groups, report.rope) == (2, 2, 2), (family, report.describe())
        assert report.norms >= 5 and not report.left, (family, report.describe())
    phi3 = set_fused_blocks(_lora_model("phi3"), True)  # fused qkv_proj / gate_up_proj
    assert (phi3.mlps, phi3.groups, phi3.projections, phi3.rope) == (2, 0, 4, 2), phi3.describe()


def _error(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma", "qwen3"])
def test_bf16_autocast_is_no_further_from_fp32_than_the_reference_path(family):
    model = _lora_model(family)
    ids = _ids(model)
    exact_logits, exact_grads = _step(model, ids)                       # fp32: the yardstick
    ref_logits, ref_grads = _step(model, ids, torch.bfloat16)
    set_fused_blocks(model, True)
    logits, grads = _step(model, ids, torch.bfloat16)
    eps = torch.finfo(torch.bfloat16).eps
    assert _error(logits, exact_logits) <= 2 * _error(ref_logits, exact_logits) + eps * exact_logits.abs().max()
    for name, g in grads.items():
        scale = exact_grads[name].abs().max().item()
        assert _error(g, exact_grads[name]) <= 2 * _error(ref_grads[name], exact_grads[name]) + eps * scale, name
        assert g.dtype == torch.float32


def test_a_4bit_base_dequantizes_per_call_and_matches_the_reference_path():
    pytest.importorskip("bitsandbytes")
    from engine.layers.quant import QuantSpec, quantize_module_linears
    from engine.model.build import decoder_linear_names

    model, _ = make_tiny_model("llama")
    quantize_module_linears(model, decoder_linear_names(model), QuantSpec("nf4", True, torch.float32))
    torch.manual_seed(0)
    inject_lora(model, "all-linear", 4, 8.0)
    mark_only_lora_trainable(model)
    with torch.no_grad():
        for name, p in lora_state_dict(model).items():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    ids = _ids(model.eval())
    ref_logits, ref_grads = _step(model, ids)
    report = set_fused_blocks(model, True)
    assert report.mlps == 2 and report.groups == 2
    logits, grads = _step(model, ids)
    assert_close_reduced(logits, ref_logits, terms=256, msg="logits")
    for name, g in grads.items():
        assert_close_reduced(g, ref_grads[name], terms=ids.numel() * 128, msg=name)


def test_activation_checkpointing_recomputes_the_fused_blocks():
    from engine.model.build import enable_activation_checkpointing

    model = _lora_model("llama")
    ids = _ids(model)
    ref_logits, ref_grads = _step(model, ids)
    enable_activation_checkpointing(model)
    set_fused_blocks(model, True)
    logits, grads = _step(model, ids)
    assert_close_reduced(logits, ref_logits, terms=256)
    for name, g in grads.items():
        assert_close_reduced(g, ref_grads[name], terms=ids.numel() * 64, msg=name)


def test_the_cast_factors_follow_the_optimizer_step():
    model = _lora_model("llama")
    twin = copy.deepcopy(model)
    set_fused_blocks(model, True)
    ids = _ids(model)
    before, _ = _step(model, ids, torch.bfloat16)  # fills the bf16 caches of SA and B
    for m in (model, twin):
        with torch.no_grad():  # in place, as an optimizer step: the fused side must not keep its old casts
            for name, p in lora_state_dict(m).items():
                p.mul_(1.5)
    logits, _ = _step(model, ids, torch.bfloat16)
    ref_logits, _ = _step(twin, ids, torch.bfloat16)
    assert _error(logits, ref_logits) < 0.1 * _error(ref_logits, before)


@pytest.mark.parametrize("kind", ["fused", "foreach"])
def test_a_real_optimizer_step_refreshes_the_cast_factors(kind):
    """A fused AdamW updates its parameters without moving their version counters: the caches must
    still see the new weights (the training loss would otherwise follow stale adapters)."""
    model = _lora_model("llama")
    twin = copy.deepcopy(model)
    set_fused_blocks(model, True)
    ids = _ids(model)
    for m in (model, twin):
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.1, **{kind: True})
        _step(m, ids)
        opt.step()
    assert_close_reduced(_step(model, ids)[0], _step(twin, ids)[0], terms=4096)


def test_dora_and_dropout_fall_back_and_say_so():
    dora = set_fused_blocks(_lora_model("llama", use_dora=True), True)
    assert dora.mlps == dora.groups == dora.projections == 0
    assert dora.left["DoRALinear layers"] == 14 and dora.left["MLPs with DoRA or dropout"] == 2
    assert "reference path for" in dora.describe()
    model = _lora_model("llama", dropout=0.1)
    report = set_fused_blocks(model, True)
    assert report.left["layers with LoRA dropout"] == 14 and report.mlps == 0
    model.eval()  # dropout off: the fallback computes exactly the reference
    ids = _ids(model)
    with torch.no_grad():
        out = model(input_ids=ids).logits
        set_fused_blocks(model, False)
        assert_close_reduced(out, model(input_ids=ids).logits, terms=256)  # norms and RoPE: reordered sums


def test_a_tiled_mlp_runs_the_fused_mlp_per_tile():
    from engine.model.tiling import tile_mlps

    model = _lora_model("llama")
    ids = _ids(model, length=16)
    ref_logits, ref_grads = _step(model, ids)
    tile_mlps(model, 8)
    report = set_fused_blocks(model, True)
    assert report.mlps == 2 and not report.left and report.groups == 2
    logits, grads = _step(model, ids)
    assert_close_reduced(logits, ref_logits, terms=256)
    for name, g in grads.items():
        assert_close_reduced(g, ref_grads[name], terms=ids.numel() * 64, msg=name)
    tile_mlps(model, 0)  # untiled: the fused forward stays
    assert sum(type(m.__dict__.get("forward")).__name__ == "FusedMLPForward" for m in model.modules()) == 2


def test_adapters_switched_off_or_a_16bit_input_without_autocast_run_the_reference():
    model = _lora_model("llama").eval()
    ids = _ids(model)
    with torch.no_grad():
        with adapters_disabled(model):
            base = model(input_ids=ids).logits
        set_fused_blocks(model, True)
        with adapters_disabled(model):
            assert_close_reduced(model(input_ids=ids).logits, base, terms=256)
        half = copy.deepcopy(model).to(torch.bfloat16)
        for p in lora_state_dict(half).values():
            p.data = p.data.float()
        ref = copy.deepcopy(half)
        set_fused_blocks(ref, False)
        assert_close_reduced(half(input_ids=ids).logits.float(), ref(input_ids=ids).logits.float(), terms=256,
                             dtype=torch.bfloat16)


def test_the_swap_is_reversible_and_leaves_other_models_alone():
    from engine.layers.fused_rope import RopeSwitch

    model, other = _lora_model("llama"), _lora_model("llama")
    ids = _ids(model)
    before = _step(other, ids)[0]
    set_fused_blocks(model, True)
    import transformers.models.llama.modeling_llama as llama
    assert isinstance(llama.apply_rotary_pos_emb, RopeSwitch)
    assert torch.equal(_step(other, ids)[0], before)  # outside a marked attention: transformers' function
    report = set_fused_blocks(model, False)
    assert report.mlps == report.groups == report.projections == report.norms == 0
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert all(m.fused_group is None for m in model.modules() if hasattr(m, "fused_group"))
    assert not any(m._forward_pre_hooks for m in model.modules())
