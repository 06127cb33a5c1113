"""Early stopping (engine/training/early_stopping.py): the rule, the atomic adapter_best/, and a real
run whose held-out loss rises: it stops after the patience and adapter_best/ is the best step's
checkpoint adapter."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from engine import train as train_mod
from engine.training import sft as sft_mod
from engine.config import ConfigError, PeftConfig
from engine.training.early_stopping import EarlyStopping, resolve_mode, write_atomically
from tests.conftest import counting_run_config, make_tiny_model_dir


# ---------------------------------------------------------------- the rule
def feed(stopper: EarlyStopping, values: list[float], key: str = "eval_loss") -> list[tuple[int, bool, bool]]:
    """(step, new best?, stop?) per evaluation at steps 1, 2, ..."""
    return [(step, stopper.observe(step, {key: v}), stopper.should_stop) for step, v in enumerate(values, 1)]


def test_stops_after_patience_evaluations_without_improvement():
    stopper = EarlyStopping(patience=2)
    assert feed(stopper, [3.0, 2.0, 2.5, 1.9, 2.0, 2.1]) == [
        (1, True, False), (2, True, False), (3, False, False), (4, True, False), (5, False, False), (6, False, True)]
    assert (stopper.best_step, stopper.best_value) == (4, 1.9)


def test_direction_threshold_and_the_evaluation_before_training():
    stopper = EarlyStopping(patience=1, metric="preference_accuracy", threshold=0.05)
    assert stopper.metric == "eval_preference_accuracy" and stopper.mode == "max"
    assert not stopper.observe(0, {"eval_preference_accuracy": 0.9})  # step 0: the untrained adapter
    assert feed(stopper, [0.5, 0.53], "eval_preference_accuracy") == [(1, True, False), (2, False, True)]
    assert resolve_mode("eval_ppl", "auto") == "min" and resolve_mode("eval_exact_match", "auto") == "max"
    assert resolve_mode("eval_loss", "max") == "max"
    assert feed(EarlyStopping(patience=1), [float("nan")]) == [(1, False, True)]


def test_unknown_metric_names_the_known_ones():
    with pytest.raises(KeyError, match=r"'eval_exact_match' is not among this run's evaluation metrics \(eval_loss, eval_ppl\)"):
        EarlyStopping(patience=1, metric="exact_match").observe(1, {"step": 1, "eval_loss": 1.0, "eval_ppl": 2.7})


def test_state_round_trips_and_off_never_stops():
    stopper = EarlyStopping(patience=3)
    feed(stopper, [2.0, 1.0, 1.5])
    again = EarlyStopping(patience=3)
    again.load_state_dict(json.loads(json.dumps(stopper.state_dict())))
    assert again.state_dict() == {"best_step": 2, "best_value": 1.0, "misses": 1}
    off = EarlyStopping(patience=0)
    assert feed(off, [1.0, 2.0, 3.0]) == [(1, False, False), (2, False, False), (3, False, False)]


def test_write_atomically_replaces_whole_or_not_at_all(tmp_path):
    final = tmp_path / "adapter_best"

    def write(content):
        def go(d: Path):
            d.mkdir()
            (d / "weights").write_text(content)
        return go

    write_atomically(final, write("one"))
    (tmp_path / ".tmp-adapter_best").mkdir()  # a crash's leftover
    write_atomically(final, write("two"))
    assert (final / "weights").read_text() == "two" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter_best"]

    def crash(d: Path):
        d.mkdir()
        raise OSError("disk full")
    with pytest.raises(OSError):
        write_atomically(final, crash)
    assert (final / "weights").read_text() == "two"  # the previous best is whole


@pytest.mark.parametrize("train, key", [({"early_stopping_patience": 2}, "train.early_stopping_patience"),
                                        ({"early_stopping_mode": "up"}, "train.early_stopping_mode"),
                                        ({"early_stopping_patience": -1}, "train.early_stopping_patience"),
                                        ({"neftune_alpha": -1.0}, "train.neftune_alpha")])
def test_config_errors(tmp_path, train, key):
    cfg = counting_run_config(tmp_path, tmp_path, PeftConfig())
    with pytest.raises(ConfigError, match=rf"config key '{key}'"):
        replace(cfg, train=replace(cfg.train, **train)).validate()
    with pytest.raises(ConfigError, match="needs held-out data: set data.eval_path"):
        replace(cfg, train=replace(cfg.train, early_stopping_patience=2, eval_every=1)).validate()


# ---------------------------------------------------------------- a run
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("early"), "llama")


def test_run_stops_after_patience_and_keeps_the_best_steps_adapter(tmp_path, model_dir, monkeypatch):
    """Held-out loss (the real one, plus a rise from step 3 on, as when a model starts to overfit)
    at steps 0..: best at step 2, two evaluations without improvement: stop at step 4 of 10."""
    real = sft_mod.heldout_loss
    rise = {0: 0.0, 1: 0.0, 2: 0.0, 3: 1.0, 4: 2.0}
    calls = []

    def heldout(*args, **kwargs):
        result = real(*args, **kwargs)
        step = len(calls)
        calls.append(step)
        return {**result, "loss": result["loss"] + rise.get(step, 5.0)}

    monkeypatch.setattr(sft_mod, "heldout_loss", heldout)
    cfg = counting_run_config(tmp_path, model_dir, PeftConfig(r=4, alpha=8), max_steps=10)
    cfg = replace(cfg, data=replace(cfg.data, eval_path=cfg.data.train_path),
                  train=replace(cfg.train, eval_every=1, save_every=1, keep_last=20, log_every=1,
                                early_stopping_patience=2)).validate()
    summary = train_mod.run_training(cfg)
    out = Path(cfg.output_dir)
    assert calls == [0, 1, 2, 3, 4]  # evaluated before training and after steps 1..4, the last once
    assert summary["steps"] == 4 and summary["stopped_early"] and summary["stopped_at_step"] == 4
    assert summary["best_step"] == 2 and summary["early_stopping_metric"] == "eval_loss"
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    assert summary["best_value"] == pytest.approx(evals[2]) and min(evals[s] for s in (1, 3, 4)) > evals[2]
    assert max(r["step"] for r in records) == 4
    best = out / "adapter_best"
    checkpoint = out / "checkpoints" / "step-2" / "adapter"
    assert sorted(p.name for p in best.iterdir()) == sorted(p.name for p in checkpoint.iterdir())
    for f in checkpoint.iterdir():
        assert (best / f.name).read_bytes() == f.read_bytes(), f.name
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (out / "checkpoints" / "step-4" / "adapter" / "adapter_model.safetensors").read_bytes()

    # rerun (train.resume=auto): the stopped run is complete, nothing trains again
    again = train_mod.run_training(cfg)
    assert again["steps"] == 4 and again["best_step"] == 2 and again["stopped_early"]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 4 and not (out / "checkpoints" / "step-5").exists()


def test_generation_metric_is_scored_at_each_evaluation(tmp_path, model_dir):
    cfg = counting_run_config(tmp_path, model_dir, PeftConfig(r=4, alpha=8), max_steps=2)
    cfg = replace(cfg, data=replace(cfg.data, eval_path=cfg.data.train_path),
                  eval=replace(cfg.eval, max_examples=2, max_new_tokens=3, batch_size=2),
                  train=replace(cfg.train, eval_every=1, log_every=1, early_stopping_patience=5,
                                early_stopping_metric="exact_match")).validate()
    summary = train_mod.run_training(cfg)
    records = [json.loads(x) for x in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    scored = sorted(r["step"] for r in records if "eval_exact_match" in r)
    assert scored == [1, 2] and summary["early_stopping_metric"] == "eval_exact_match"
    assert summary["best_step"] == 1 and (Path(cfg.output_dir) / "adapter_best" / "adapter_config.json").is_file()
