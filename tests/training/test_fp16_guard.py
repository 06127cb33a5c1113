"""The fp16 guard: modules whose activations leave fp16's range run in fp32, found by measurement.

CPU autocast runs fp16 matmuls, so a model whose weights are scaled to write ~3e5 into an
activation overflows here as it would on a T4."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch

from engine import train as train_mod
from engine.config import PeftConfig
from engine.layers.inject import inject_lora
from engine.model.isolation import probe_batches
from engine.training import amp
from engine.training.fp16_guard import Fp16Guard, decoder_blocks
from engine.training.loss import decoder_hidden
from tests.conftest import counting_run_config, make_tiny_model

PLANTED = 3e5  # what the planted module writes: > fp16's 65,504


def plant(model, where: str, value: float = PLANTED) -> float:
    """Scale the first block's `where` (a module path inside it) so its largest output is `value`."""
    block = decoder_blocks(model)[0][1]
    module = block.get_submodule(where)
    seen = {}
    handle = module.register_forward_hook(lambda m, a, o: seen.update(out=o.abs().max().item()))
    with torch.no_grad():
        decoder_hidden(model, probe_batches(model)[1])
    handle.remove()
    factor = value / seen["out"]
    with torch.no_grad():  # a linear's weight; fused MoE experts: their down projection (a 3-D parameter)
        (module.weight if hasattr(module, "weight") else module.down_proj).mul_(factor)
    return factor


def _fp16_hidden(model, batch):
    with torch.no_grad(), amp.autocast("fp16", torch.device("cpu")):
        return decoder_hidden(model, batch).float()


@pytest.mark.parametrize("family,where", [
    ("llama", "mlp.down_proj"), ("qwen2", "self_attn.o_proj"), ("mistral", "mlp.down_proj"),
    ("phi3", "mlp.gate_up_proj"), ("qwen3", "mlp.up_proj"), ("gemma2", "mlp.down_proj"), ("gemma", "self_attn.o_proj"),
    ("qwen2_moe", "mlp.shared_expert.down_proj"), ("mixtral", "self_attn.o_proj"),
])
def test_the_guard_heals_a_planted_overflow_in_any_family(family, where):
    """Found by structure: the blocks, the module, the residual stream; afterwards the fp16 forward
    is finite and equals the fp32 one to fp16 rounding."""
    model, _ = make_tiny_model(family)
    inject_lora(model, "all-linear", r=4, alpha=8)
    plant(model, where)
    batch = probe_batches(model)[1]
    with torch.no_grad():
        reference = decoder_hidden(model, batch).float()
    assert not torch.isfinite(_fp16_hidden(model, batch)).all()  # the planted overflow is real
    guard = Fp16Guard(model, torch.device("cpu"))
    line = guard.install(probe_batches(model))
    assert "in fp32" in line and "model.layers.0" in line, line
    healed = _fp16_hidden(model, batch)
    assert torch.isfinite(healed).all()
    assert ((healed - reference).norm() / reference.norm()).item() < 2e-2
    guard.remove()
    assert not torch.isfinite(_fp16_hidden(model, batch)).all()  # undone: the overflow is back


def test_nothing_is_put_in_fp32_where_nothing_overflows():
    model, _ = make_tiny_model("llama")
    guard = Fp16Guard(model, torch.device("cpu"))
    line = guard.install(probe_batches(model))
    assert guard.decisions == {} and line.startswith("fp16_guard: no module within 4x of fp16's range: max |activation|")


def test_a_residual_stream_that_grows_past_the_range_is_kept_in_fp32():
    """Gemma-2's case: no module's output overflows, the residual sum of the blocks does (each
    block adds 4e4, representable in fp16; two of them are not). The weights are fp16, as on a GPU
    (there the residual stream is fp16 too; a CPU keeps an fp32 base), so the fp32 probe upcasts
    each block's weights for its call and puts them back."""
    model, _ = make_tiny_model("gemma2")
    model.half()
    for _, block in decoder_blocks(model):
        block.post_feedforward_layernorm.register_forward_hook(lambda m, args, out: out + 4e4)
    batch = probe_batches(model)[1]
    assert not torch.isfinite(_fp16_hidden(model, batch)).all()
    guard = Fp16Guard(model, torch.device("cpu"))
    guard.install([batch])
    assert guard.decisions["model.layers.0"].residual
    assert torch.isfinite(_fp16_hidden(model, batch)).all()
    assert {p.dtype for p in model.parameters()} == {torch.float16}  # the probe's upcasts put back


# ---------------------------------------------------------------- whole runs
def _run(root, model_dir, *, precision="fp16", guard="auto", steps=6, method="lora", **train):
    root.mkdir(parents=True, exist_ok=True)
    peft = PeftConfig(method=method, r=4, alpha=8, targets="all-linear")
    cfg = counting_run_config(root, model_dir, peft, max_steps=steps)
    train.setdefault("log_every", 1)
    cfg = replace(cfg, train=replace(cfg.train, precision=precision, fp16_guard=guard, **train),
                  data=replace(cfg.data, eval_path=str(root / "train.jsonl")))
    summary = train_mod.run_training(cfg)
    records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    return summary, [r for r in records if "loss" in r]


@pytest.fixture(scope="module")
def overflowing_gemma2(tmp_path_factory):
    """A tiny Gemma-2 whose first MLP writes ~3e5 into the residual stream, saved as a model dir."""
    model, tokenizer = make_tiny_model("gemma2")
    plant(model, "mlp.down_proj")
    out = tmp_path_factory.mktemp("overflow") / "gemma2"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def fp32_losses(overflowing_gemma2, tmp_path_factory):
    summary, records = _run(tmp_path_factory.mktemp("fp32"), overflowing_gemma2, precision="fp32")
    return [r["loss"] for r in records], summary["eval_loss_after"]


@pytest.mark.slow
def test_without_the_guard_every_step_is_skipped_and_the_run_fails(tmp_path, overflowing_gemma2):
    """The issue's report: 8 of 8 steps skipped, NaN held-out loss, an adapter and exit 0. Now: an
    error that says so, and no final checkpoint or adapter."""
    with pytest.raises(amp.TrainingFailed, match=r"every one of this run's 4 steps was skipped"):
        _run(tmp_path, overflowing_gemma2, guard="off", steps=4)
    assert not (tmp_path / "run" / "adapter").exists()
    assert not (tmp_path / "run" / "checkpoints" / "step_4").exists()


@pytest.mark.slow
@pytest.mark.parametrize("variant", [
    {}, {"activation_checkpointing": True, "mlp_tile_tokens": 16, "norm_tile_tokens": 16}, {"method": "qlora"}])
def test_with_the_guard_the_run_trains_and_follows_fp32(tmp_path, overflowing_gemma2, fp32_losses, capsys, variant):
    summary, records = _run(tmp_path, overflowing_gemma2, **variant)
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("precision: fp16 (1 module in fp32"))
    # a tiled MLP runs whole in fp32 (its tiles' backward recomputes all of it)
    # the MLP's down_proj, or the whole MLP where it runs as one Function (tiled, or speed's fused_blocks:
    # its projections' own forwards are not called, so the guard's unit is the MLP)
    assert re.search(r"model\.layers\.0\.mlp(\.down_proj)? \(output [23](\.\d+)?e\+05 in fp32", line), line
    assert summary["skipped_steps"] == 0
    losses = [r["loss"] for r in records]
    reference, eval_after = fp32_losses
    if variant.get("method") == "qlora":  # 4-bit weights: another model; it must train, and stay finite
        assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]
        return
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=2e-3, atol=2e-3)
    assert abs(summary["eval_loss_after"] - eval_after) < 5e-3


@pytest.mark.slow
def test_an_overflow_that_appears_later_widens_the_set_at_the_next_log_step(tmp_path, monkeypatch, capsys):
    """The weights move after step 2 so that block 1's MLP now overflows: steps 3 and 4 are skipped
    (their loss is inf: a forward overflow, not a gradient one), the log step 4 re-probes step 3's
    batch, puts the module in fp32, gives the loss scale back, and training goes on."""
    model, tokenizer = make_tiny_model("llama")
    model_dir = tmp_path / "llama"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    inner = train_mod.train_step
    calls = {"n": 0}

    def moving_weights(model, micro, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # before step 3: block 1's down_proj now writes ~3e5
            block = decoder_blocks(model)[1][1]
            with torch.no_grad():
                block.mlp.down_proj.base_layer.weight.mul_(PLANTED / 0.5)
        return inner(model, micro, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", moving_weights)
    summary, records = _run(tmp_path / "run", model_dir, steps=7, log_every=2)
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if "fp16_guard: the forward overflowed" in line)
    assert "step 4: fp16_guard: the forward overflowed in 2 steps from 3 to 4" in line
    assert "re-probed step 3's batch: model.layers.1" in line and "training goes on" in line
    assert summary["skipped_steps"] == 2
    by_step = {r["step"]: r for r in records}
    assert by_step[4]["loss_scale"] == 65536.0  # the skips' halvings given back
    assert all(torch.isfinite(torch.tensor(by_step[s]["loss"])) for s in (6, 7))
    assert by_step[7]["loss"] < by_step[2]["loss"] * 2


def test_a_forward_overflow_the_guard_cannot_heal_stops_the_run(monkeypatch):
    """When no decoder module can be named (the embeddings themselves are inf), the guard says so."""
    model, _ = make_tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(float("inf"))
    guard = Fp16Guard(model, torch.device("cpu"))
    with pytest.raises(amp.Fp16Overflow, match="the embeddings' output is not finite"):
        guard.install(probe_batches(model))


def test_a_run_that_trained_nothing_or_ends_non_finite_is_refused():
    amp.refuse_untrained(4, 1, 3.2, precision="fp16")  # trained: nothing raised
    with pytest.raises(amp.TrainingFailed, match="every one of this run's 4 steps was skipped"):
        amp.refuse_untrained(4, 4, 3.2, precision="fp16")
    with pytest.raises(amp.TrainingFailed, match="the held-out loss after training is nan"):
        amp.refuse_untrained(4, 0, float("nan"), precision="bf16")


def _guard_with_window(losses, *, held=True):
    model, _ = make_tiny_model("llama")
    guard = Fp16Guard(model, torch.device("cpu"))
    guard.install(probe_batches(model))
    batch = [probe_batches(model)[1]]
    for step, loss in enumerate(losses, 1):
        guard.watch(step, batch if held else None, torch.tensor(loss))
    return guard


def test_a_loss_overflow_past_the_decoder_blocks_is_reported_and_left_to_the_scaler():
    """inf loss, finite decoder output on that batch: nothing to widen, the scale is not given back."""
    guard = _guard_with_window([1.0, float("inf")])
    scaler = amp.DynamicLossScaler(enabled=True, init_scale=1024.0)
    scaler.update(torch.tensor(1.0))
    line = guard.at_log_step(scaler)
    assert "the lm_head or the loss overflowed" in line and "step 2's batch" in line
    assert scaler.read()["scale"] == 512.0 and guard.decisions == {}
    assert guard.at_log_step(scaler) is None  # the window was consumed


def test_batches_past_the_held_window_are_not_re_probed():
    guard = _guard_with_window([float("nan")] + [1.0] * 64)
    line = guard.at_log_step(amp.DynamicLossScaler(enabled=True))
    assert "no longer held" in line and "the fp32 set is unchanged" in line


def test_the_planner_counts_what_the_guard_keeps_in_fp32():
    from engine.plan import predict
    from tests.conftest import tiny_config

    config = tiny_config("llama", 384)
    base = predict(config, seq_len=128, micro_batch=2, method="lora", precision="fp16")
    more = predict(config, seq_len=128, micro_batch=2, method="lora", precision="fp16",
                   fp32_weight_bytes=1 << 20, fp32_residual_blocks=2)
    assert more.static - base.static == 1 << 20
    assert more.activations - base.activations == 2 * (2 * 128) * 64 * 2  # [tokens, h] at 4 bytes, not 2
    model, _ = make_tiny_model("llama")
    plant(model, "mlp.down_proj", 5e4)  # within fp16, past the guard's margin; weights stored in fp16 as on a GPU
    model.half().requires_grad_(False)
    guard = Fp16Guard(model, torch.device("cpu"))
    guard.install(probe_batches(model))
    down = decoder_blocks(model)[0][1].mlp.down_proj
    assert down.weight.dtype == torch.float32
    assert guard.planner_terms()["fp32_weight_bytes"] == down.weight.numel() * 2


def test_the_guard_is_on_for_fp16_only_and_says_when_fsdp_turns_it_off():
    from engine.training.fp16_guard import guard_for_run

    model, _ = make_tiny_model("llama")
    cpu = torch.device("cpu")
    assert guard_for_run("auto", model, precision="fp16", device=cpu).enabled
    assert not guard_for_run("off", model, precision="fp16", device=cpu).enabled
    assert not guard_for_run("auto", model, precision="bf16", device=cpu).enabled
    with pytest.warns(UserWarning, match="fp16_guard=auto is off under train.fsdp=true"):
        guard = guard_for_run("auto", model, precision="fp16", device=cpu, fsdp=True)
    assert not guard.enabled and guard.install([]) == "fp16_guard off" and guard.at_log_step(None) is None
