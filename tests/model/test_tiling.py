"""Sequence tiling (engine/model/tiling.py): train.mlp_tile_tokens and train.norm_tile_tokens. The
engine's step with the MLPs (and / or the RMSNorms) tiled computes the untiled step's loss and LoRA
gradients (fp32 to rounding, bf16 to its precision) for LoRA and QLoRA, Llama / Qwen2 / Phi-3 (fused
gate|up) / Qwen3 (per-head q/k norms) / Gemma (its own norm), packed rows, with and without
activation checkpointing; LoRA dropout draws the same masks in the backward recompute as in forward;
grouped LoRA projects each tile once; the swaps are reversible and keep every name."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from engine.config import ConfigError, PeftConfig, TrainConfig
from engine.layers.groups import SharedInputGroup
from engine.layers.inject import inject_lora
from engine.layers.lora import lora_state_dict, mark_only_lora_trainable
from engine.layers.quant import QuantSpec, quantize_module_linears
from engine.model.build import decoder_linear_names, enable_activation_checkpointing
from engine.model.tiling import (TilingError, find_mlps, find_norms, is_tiled, resolve_tile_tokens, tile_bounds,
                                tile_mlps, tile_norms)
from engine.parallel.distributed import init_distributed
from engine.train import build_everything
from engine.training.loss import causal_lm_loss
from tests.conftest import (apply_speed, assert_close_reduced, counting_run_config, make_tiny_model,
                            make_tiny_model_dir, packed_batch)

TILE = 24            # 2 rows x 32 tokens = 64 tokens -> tiles of 22, 21, 21 (across the row boundary)
DOCS = [[12, 20], [32]]


def _model(family="llama", *, method="lora", dtype=torch.float32, dropout=0.0, checkpointing=False, grouped=True,
           compile="auto", fused=True):
    model, _ = make_tiny_model(family)
    model.to(dtype)
    if method == "qlora":
        quantize_module_linears(model, decoder_linear_names(model), QuantSpec("nf4", True, dtype), "cpu")
    torch.manual_seed(0)
    inject_lora(model, "all-linear", 4, 8.0, dropout=dropout)
    mark_only_lora_trainable(model)
    with torch.no_grad():  # B != 0: every A gets a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    if checkpointing:
        enable_activation_checkpointing(model)
    precision = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    # the engine's step: fused + grouped LoRA, packed attention, compiled norms where auto says so
    off = (() if grouped else ("grouped_lora",)) + (() if fused else ("fused_blocks",))
    apply_speed(model, precision, off=off, compile=compile)
    return model.train()


def _batch(vocab):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, 32), generator=g)
    labels = torch.randint(0, vocab, (2, 32), generator=g)
    labels[0, :4] = labels[0, 11] = labels[:, -1] = -100
    return packed_batch(ids, DOCS, labels)


def _step(model, batch, dtype=torch.float32, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        loss, _ = causal_lm_loss(model, batch, chunk_size=16)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def _assert_same_step(tiled, plain, dtype):
    (loss, grads), (ref_loss, ref_grads) = tiled, plain
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    if dtype == torch.float32:
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-6)
        for k, g in ref_grads.items():  # sums over 64 tokens, now in 3 tiles
            assert_close_reduced(grads[k], g, terms=64, msg=k)
    else:  # bf16 autocast: every matmul output is rounded to 8 bits; the tiles' GEMMs block differently
        torch.testing.assert_close(loss, ref_loss, atol=2e-2, rtol=2e-2)
        for k, g in ref_grads.items():
            torch.testing.assert_close(grads[k], g, atol=3e-2 * max(1.0, g.abs().max().item()), rtol=3e-2, msg=k)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", ["lora", "qlora"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_tiled_step_equals_the_untiled_step(family, method, dtype, checkpointing):
    model = _model(family, method=method, dtype=dtype, checkpointing=checkpointing)
    batch = _batch(model.config.vocab_size)
    plain = _step(model, batch, dtype)
    assert tile_mlps(model, TILE) == model.config.num_hidden_layers
    tiled = _step(model, batch, dtype)
    _assert_same_step(tiled, plain, dtype)
    assert tile_mlps(model, 0) == 0 and not any(is_tiled(m) for m in find_mlps(model).values())
    again = _step(model, batch, dtype)
    assert torch.equal(again[0], plain[0])  # untiled again: the same step, bit for bit


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family,method", [("llama", "qlora"), ("qwen3", "lora"), ("gemma", "lora"), ("phi3", "lora")])
def test_tiled_norms_and_mlps_step_equals_the_untiled_step(family, method, dtype, checkpointing):
    """Every RMSNorm tiled (Qwen3's per-head q/k norms: rows are tokens x heads; Gemma's (1 + w)
    in fp32), with and without the MLPs tiled too. Norms are not compiled here (a tiled norm never is)."""
    model = _model(family, method=method, dtype=dtype, checkpointing=checkpointing, compile=False)
    batch = _batch(model.config.vocab_size)
    plain = _step(model, batch, dtype)
    norms = tile_norms(model, TILE)
    assert norms == 2 * model.config.num_hidden_layers + 1 + (4 if family == "qwen3" else 0)
    _assert_same_step(_step(model, batch, dtype), plain, dtype)
    tile_mlps(model, TILE)
    _assert_same_step(_step(model, batch, dtype), plain, dtype)
    tile_norms(model, 0)
    tile_mlps(model, 0)
    assert torch.equal(_step(model, batch, dtype)[0], plain[0])


def test_a_tiled_norm_is_left_alone_by_compile_norms():
    from engine.speed.compiled import set_compiled_norms

    model = _model(compile=False)
    tile_norms(model, TILE)
    assert set_compiled_norms(model, True) == 0
    assert all(is_tiled(m) for m in find_norms(model).values())


def test_tiles_run_through_the_tiled_function_and_short_calls_do_not():
    model = _model()
    tile_mlps(model, TILE)
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 32, 64, requires_grad=True)
    assert type(mlp(x).grad_fn).__name__ == "_TiledBackward"
    short = torch.randn(1, TILE, 64, requires_grad=True)
    assert type(mlp(short).grad_fn).__name__ != "_TiledBackward"
    with torch.no_grad():  # nothing to differentiate: tiles without the autograd function, same output
        tiled_out = mlp(x)
        tile_mlps(model, 0)
        torch.testing.assert_close(tiled_out, mlp(x))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
def test_dropout_masks_match_between_forward_and_the_backward_recompute(checkpointing):
    """With LoRA dropout the tiled MLP draws each tile's masks in forward and again in the
    backward recompute (RNG restored). The reference runs the same tiles with autograd keeping
    everything (same draws in the same order): same loss, same gradients, same RNG state after."""
    model = _model(dropout=0.3, checkpointing=checkpointing)
    batch = _batch(model.config.vocab_size)
    reference = copy.deepcopy(model)
    for mlp in find_mlps(reference).values():  # the same tiles, all kept by autograd
        mlp.forward = _kept_tiles(mlp)
    ref = _step(reference, batch, seed=5)
    ref_rng = torch.get_rng_state()
    tile_mlps(model, TILE)
    tiled = _step(model, batch, seed=5)
    assert torch.equal(torch.get_rng_state(), ref_rng)
    _assert_same_step(tiled, ref, torch.float32)
    assert not torch.equal(tiled[0], _step(model, batch, seed=6)[0])  # dropout is really on


def _kept_tiles(mlp):
    plain = type(mlp).forward

    def forward(x):
        flat = x.reshape(-1, x.shape[-1])
        return torch.cat([plain(mlp, flat[s:e]) for s, e in tile_bounds(flat.shape[0], TILE)]).view_as(x)
    return forward


def test_grouped_lora_projects_each_tile_once_for_gate_and_up(monkeypatch):
    """Each tile is a call of the MLP module, so grouped LoRA's hooks fire per tile: gate and up
    share one stacked A matmul per tile, in forward and in the backward recompute (the LoRALinear
    path: with fused_blocks the tiles run the fused MLP, tests/layers/test_fused_blocks.py)."""
    model = _model(fused=False)
    batch = _batch(model.config.vocab_size)
    plain = _step(model, batch)
    tile_mlps(model, TILE)
    stacked, original = [], SharedInputGroup.project
    leaf = {m: n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}

    def spy(self, member, x):
        if self._active and self._x is None:  # the group's stacked A matmul is about to run on x
            stacked.append((leaf[member], x.shape[0]))
        return original(self, member, x)

    monkeypatch.setattr(SharedInputGroup, "project", spy)
    tiled = _step(model, batch)
    _assert_same_step(tiled, plain, torch.float32)
    mlp_groups = [s for s in stacked if s[0] in ("gate_proj", "gate_up_proj")]
    tiles = [e - s for s, e in tile_bounds(64, TILE)]
    assert [size for _, size in mlp_groups] == (tiles + tiles) * model.config.num_hidden_layers


def test_ungrouped_tiled_step_equals_the_untiled_step():
    model = _model(grouped=False)
    batch = _batch(model.config.vocab_size)
    plain = _step(model, batch)
    tile_mlps(model, TILE)
    _assert_same_step(_step(model, batch), plain, torch.float32)


def test_the_swap_keeps_names_copies_and_is_idempotent():
    model = _model()
    keys = list(model.state_dict())
    adapters = list(lora_state_dict(model))
    assert tile_mlps(model, TILE) == tile_mlps(model, 16) == 2
    assert all(m.forward.tile_tokens == 16 for m in find_mlps(model).values())
    assert list(model.state_dict()) == keys and list(lora_state_dict(model)) == adapters
    clone = copy.deepcopy(model)  # the copy's MLPs tile themselves, not the original's
    assert all(m.forward.module is m for m in find_mlps(clone).values())
    batch = _batch(model.config.vocab_size)
    torch.testing.assert_close(_step(clone, batch)[0], _step(model, batch)[0])


def test_tile_bounds_are_near_equal_and_cover_every_token():
    assert tile_bounds(64, 24) == [(0, 22), (22, 43), (43, 64)]
    assert tile_bounds(10, 24) == [(0, 10)]
    assert tile_bounds(48, 16) == [(0, 16), (16, 32), (32, 48)]


def test_settings_and_errors_are_named():
    assert resolve_tile_tokens("auto", 4096) == 4096 and resolve_tile_tokens(0, 64) == 0
    with pytest.raises(TilingError, match=r"train.mlp_tile_tokens: must be an integer >= 0 or 'auto', got -1"):
        resolve_tile_tokens(-1, 64)
    gpt2, _ = make_tiny_model("gpt2")
    with pytest.raises(TilingError, match=r"train.mlp_tile_tokens: GPT2LMHeadModel has no gated MLP to tile"):
        tile_mlps(gpt2, 8)
    with pytest.raises(TilingError, match=r"train.norm_tile_tokens: GPT2LMHeadModel has no RMSNorm to tile"):
        tile_norms(gpt2, 8)
    llama, _ = make_tiny_model("llama")
    llama.model.norm.forward = lambda x: x  # as speed.compile's compiled norms do
    with pytest.raises(TilingError, match=r"train.norm_tile_tokens: model.norm's forward is already replaced"):
        tile_norms(llama, 8)
    assert TrainConfig(mlp_tile_tokens="auto").validate() is None
    for bad in (-1, "big", True, 1.5):
        with pytest.raises(ConfigError, match=r"config key 'train.mlp_tile_tokens': must be an integer >= 0"):
            TrainConfig(mlp_tile_tokens=bad).validate()
    with pytest.raises(ConfigError, match=r"train.mlp_tile_tokens': is not checked under train.fsdp=true"):
        TrainConfig(mlp_tile_tokens=1024, fsdp=True).validate()
    with pytest.raises(ConfigError, match=r"config key 'train.norm_tile_tokens': must be an integer >= 0"):
        TrainConfig(norm_tile_tokens=-2).validate()


def test_build_everything_tiles_the_mlps_next_to_checkpointing(tmp_path, capsys):
    """train.mlp_tile_tokens reaches the model engine.train builds (auto: tiles of hidden_size tokens)."""
    cfg = counting_run_config(tmp_path, make_tiny_model_dir(tmp_path, "qwen2"), PeftConfig(r=4, alpha=8.0))
    cfg = replace(cfg, train=replace(cfg.train, mlp_tile_tokens="auto", norm_tile_tokens=32,
                                     activation_checkpointing=True)).validate()
    model = build_everything(cfg, init_distributed("cpu"))[0]
    mlps, norms = find_mlps(model), find_norms(model)
    assert len(mlps) == 2 and all(is_tiled(m) and m.forward.tile_tokens == 64 for m in mlps.values())
    assert len(norms) == 5 and all(is_tiled(m) and m.forward.tile_tokens == 32 for m in norms.values())
    err = capsys.readouterr().err
    assert "train.mlp_tile_tokens: 2 modules run over tiles of <= 64 tokens" in err
    assert "train.norm_tile_tokens: 5 modules run over tiles of <= 32 tokens" in err
