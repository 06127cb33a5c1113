"""The pair objectives on a tiny model: packed rows = padded rows, the reference without dropout
and without the adapters, accumulation normalised by pairs, the precomputed reference table, and
the loss formulas' limits."""

from __future__ import annotations

import json
import math

import pytest
import torch

from engine.config import DataConfig, ModelConfig, PeftConfig
from engine.layers.lora import adapters_disabled, lora_state_dict
from engine.model.build import build_model
from engine.preference.batches import make_pair_loader
from engine.preference.data import load_pair_dataset
from engine.preference.logprobs import reference_logps, sequence_logps
from engine.preference.loss import dpo_losses, orpo_losses
from engine.preference.objective import DPOObjective, ORPOObjective

ROWS = [{"prompt": f"count to {i}", "chosen": " ".join(map(str, range(i + 1))), "rejected": "no " * (i % 3 + 1)}
        for i in range(6)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.conftest import make_tiny_model_dir

    root = tmp_path_factory.mktemp("objective")
    model_dir = make_tiny_model_dir(root, "llama")
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    torch.manual_seed(0)
    model, tok = build_model(ModelConfig(path=str(model_dir)), PeftConfig(r=4, alpha=8, dropout=0.3),
                             device="cpu", compute_dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in sorted(lora_state_dict(model).items()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    ds = load_pair_dataset(str(path), tok, DataConfig(train_path=str(path), max_seq_len=48, cache_dir=str(root / "c")))
    return model, tok, ds, model_dir


def batch_of(tiny, packing, size=8):
    model, tok, ds, model_dir = tiny
    loader = make_pair_loader(ds, max_seq_len=64, micro_batch_size=size, packing=packing, seed=0,
                              pad_token_id=tok.pad_token_id, shuffle=False)
    return list(loader.one_pass())


def by_pair(batch, logps):
    P = batch["num_pairs"]
    return {int(i): (logps[k], logps[P + k]) for k, i in enumerate(batch["pair_index"])}


def test_packed_rows_give_the_padded_log_probs(tiny):
    model = tiny[0].eval()
    packed, padded = {}, {}
    with torch.no_grad():
        packed_batches = batch_of(tiny, True, size=1)
        assert max(b["num_pairs"] for b in packed_batches) >= 2  # several pairs share one row
        for b in packed_batches:
            assert b["input_ids"].shape[0] == 1
            packed.update(by_pair(b, sequence_logps(model, b, chunk_size=5)))
        for b in batch_of(tiny, False):
            assert "attention_mask" in b
            padded.update(by_pair(b, sequence_logps(model, b, chunk_size=None)))
    assert sorted(packed) == sorted(padded) == list(range(len(ROWS)))
    for i in packed:
        torch.testing.assert_close(torch.stack(packed[i]), torch.stack(padded[i]), atol=2e-5, rtol=0)


def test_reference_is_the_base_without_dropout(tiny):
    model = tiny[0]
    b = batch_of(tiny, True)[0]
    model.train()  # LoRA dropout 0.3 is active in training mode
    torch.manual_seed(1)
    first = reference_logps(model, b)
    second = reference_logps(model, b)
    assert model.training  # restored
    torch.testing.assert_close(first, second, atol=0, rtol=0)  # no dropout draw
    model.eval()
    with torch.no_grad(), adapters_disabled(model):
        base = sequence_logps(model, b)
    torch.testing.assert_close(first, base, atol=0, rtol=0)
    with torch.no_grad():
        assert (sequence_logps(model, b) - base).abs().max() > 1e-3  # the adapters change the policy


@pytest.mark.parametrize("objective", [DPOObjective(beta=0.2, chunk_size=7), ORPOObjective(beta=0.3, chunk_size=7)])
def test_accumulation_is_normalised_by_pairs(tiny, objective):
    """Gradient of sum(pair losses) / n over micro-batches of 1 row = over one batch of all rows."""
    model = tiny[0].eval()  # no dropout: both ways see the same function
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(batches):
        for p in params:
            p.grad = None
        n = sum(objective.count(b) for b in batches)
        for b in batches:
            loss_sum, _ = objective.loss_sum(model, b)
            (loss_sum / n).backward()
        return [p.grad.clone() for p in params]

    small, whole = batch_of(tiny, True, size=1), batch_of(tiny, True, size=8)
    assert len(small) > 1 and len(whole) == 1
    for a, b in zip(grads(small), grads(whole)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_precomputed_reference_equals_the_per_batch_one(tiny):
    model, tok, ds, model_dir = tiny
    model.train()
    dpo = DPOObjective(beta=0.1)
    batch = batch_of(tiny, True, size=1)[1]
    per_batch = dpo.reference(model, batch)
    dpo.precompute_reference(model, ds, max_seq_len=48, micro_batch_size=2, packing=False,
                             pad_token_id=tok.pad_token_id, device=torch.device("cpu"),
                             autocast=lambda: torch.autocast("cpu", enabled=False))
    assert model.training
    torch.testing.assert_close(dpo.reference(model, batch), per_batch, atol=2e-5, rtol=0)


def test_loss_formulas():
    pc, pr = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    rc, rr = torch.tensor([-3.5, -4.0]), torch.tensor([-3.5, -4.0])
    z = 0.5 * ((pc - rc) - (pr - rr))
    losses, c, r = dpo_losses(pc, pr, rc, rr, beta=0.5)
    torch.testing.assert_close(losses, torch.log1p(torch.exp(-z)))
    torch.testing.assert_close(c - r, z)
    smoothed, _, _ = dpo_losses(pc, pr, rc, rr, beta=0.5, label_smoothing=0.2)
    torch.testing.assert_close(smoothed, 0.8 * torch.log1p(torch.exp(-z)) + 0.2 * torch.log1p(torch.exp(z)))
    hinge, _, _ = dpo_losses(pc, pr, rc, rr, beta=0.5, loss_type="hinge")
    torch.testing.assert_close(hinge, torch.relu(1 - z))
    with pytest.raises(ValueError, match="loss_type 'ipo' is not one of sigmoid, robust, hinge"):
        dpo_losses(pc, pr, rc, rr, beta=0.5, loss_type="ipo")
    a_c, a_r = torch.tensor([-0.1, -2.0]), torch.tensor([-1.0, -0.05])
    losses, log_odds, _, _ = orpo_losses(a_c, a_r, beta=0.3)
    odds = lambda a: math.exp(a) / (1 - math.exp(a))
    for i in range(2):
        ratio = math.log(odds(a_c[i].item()) / odds(a_r[i].item()))
        assert log_odds[i].item() == pytest.approx(ratio, rel=1e-5)
        assert losses[i].item() == pytest.approx(-a_c[i].item() + 0.3 * math.log1p(math.exp(-ratio)), rel=1e-5)


def test_precomputed_reference_is_cached_beside_the_tokenized_pairs(tiny, tmp_path, capsys):
    from dataclasses import replace

    from engine.config import ObjectiveConfig, RunConfig
    from engine.preference.run import prepare_reference, reference_cache_file

    model, tok, ds, model_dir = tiny
    cfg = RunConfig(model=ModelConfig(path=str(model_dir)), peft=PeftConfig(r=4, alpha=8),
                    data=DataConfig(train_path=ds.stats.path, max_seq_len=48, cache_dir=str(tmp_path / "c")),
                    objective=ObjectiveConfig(name="dpo", precompute_ref=True))
    file = reference_cache_file(cfg, tok, precision="fp32", packing=True, micro_batch_size=2)
    assert file.startswith(str(tmp_path / "c"))
    qlora = replace(cfg, peft=replace(cfg.peft, method="qlora"))
    assert reference_cache_file(qlora, tok, precision="fp32", packing=True, micro_batch_size=2) != file
    assert reference_cache_file(cfg, tok, precision="bf16", packing=True, micro_batch_size=2) != file
    kwargs = dict(max_seq_len=48, micro_batch_size=2, packing=True, pad_token_id=tok.pad_token_id,
                  device=torch.device("cpu"), autocast=lambda: torch.autocast("cpu", enabled=False))
    first, second = DPOObjective(), DPOObjective()
    prepare_reference(first, model, ds, cache_file=file, **kwargs)
    assert "precomputed for 6 pairs" in capsys.readouterr().err
    prepare_reference(second, model, ds, cache_file=file, **kwargs)
    assert "loaded from" in capsys.readouterr().err
    assert torch.equal(first.ref_table, second.ref_table) and first.ref_table.shape == (6, 2)


def test_evaluation_computes_the_held_out_reference_once(tiny, monkeypatch):
    import engine.preference.objective as objective_mod
    from engine.preference.run import preference_accuracy, preference_eval

    model, tok, ds, _ = tiny
    ds.ref_table = None
    kwargs = dict(max_seq_len=64, batch_size=2, packing=True, precision="fp32", device=torch.device("cpu"),
                  pad_token_id=tok.pad_token_id)
    dpo = DPOObjective(beta=0.1)
    per_batch = {}
    for b in batch_of(tiny, True, size=2):  # the reference of every batch, computed the plain way
        with torch.no_grad():
            per_batch.update(by_pair(b, dpo.reference(model, b)))
    first = preference_eval(model, dpo, ds, **kwargs)
    assert dpo.ref_table is None and ds.ref_table.shape == (6, 2)  # the training table is left alone
    for i, (c, r) in per_batch.items():
        torch.testing.assert_close(ds.ref_table[i], torch.stack([c, r]), atol=0, rtol=0)
    calls = []
    monkeypatch.setattr(objective_mod, "reference_logps", lambda *a, **k: calls.append(1))
    assert preference_eval(model, dpo, ds, **kwargs) == first and calls == []  # no second reference pass
    base = preference_accuracy(model, ds, base=True, chunk_size=None, **kwargs)
    ds.ref_table = None
    assert preference_accuracy(model, ds, base=True, chunk_size=None, **kwargs) == base
