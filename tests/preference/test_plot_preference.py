"""loss.png of a DPO run shows reward accuracy and held-out preference accuracy."""

import json

import pytest

pytest.importorskip("matplotlib")
import engine.plot as plot  # noqa: E402


def test_preference_run_plots_accuracy(tmp_path, monkeypatch):
    recs = [{"step": 0, "eval_loss": 0.69, "eval_reward_accuracy": 0.0, "eval_preference_accuracy": 0.7}]
    recs += [{"step": s, "loss": 0.69 - 0.01 * s, "lr": 1e-4, "tokens_per_s": 100.0, "reward_accuracy": 0.1 * s}
             for s in range(1, 6)]
    recs += [{"step": 5, "eval_loss": 0.5, "eval_reward_accuracy": 0.8, "eval_preference_accuracy": 0.9}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    figures = []
    real_save = plot._save
    monkeypatch.setattr(plot, "_save", lambda fig, out: (figures.append(fig), real_save(fig, out)))
    out = plot.plot_run(tmp_path)
    assert out.is_file() and out.stat().st_size > 1000
    axes = {ax.get_ylabel(): ax for ax in figures[0].axes}
    assert "accuracy" in axes and "loss (per pair)" in axes
    labels = [line.get_label() for line in axes["accuracy"].get_lines()]
    assert labels == ["reward accuracy", "eval reward accuracy", "eval preference accuracy"]
    assert list(axes["accuracy"].get_lines()[2].get_ydata()) == [0.7, 0.9]


def test_grpo_run_plots_rollout_and_held_out_reward(tmp_path, monkeypatch):
    recs = [{"step": 0, "eval_reward": 0.2, "eval_rewards/city_exact": 0.0}]
    recs += [{"step": s, "loss": 0.01, "lr": 1e-4, "tokens_per_s": 100.0, "reward": 0.1 * s} for s in range(1, 6)]
    recs += [{"step": 5, "eval_reward": 0.6, "eval_rewards/city_exact": 0.4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    figures = []
    monkeypatch.setattr(plot, "_save", lambda fig, out: figures.append(fig))
    plot.plot_run(tmp_path)
    axes = {ax.get_ylabel(): ax for ax in figures[0].axes}
    lines = {line.get_label(): list(line.get_ydata()) for line in axes["mean reward"].get_lines()}
    assert lines["held-out reward"] == [0.2, 0.6]
    assert lines["reward (rollouts)"] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])


def test_sft_run_has_no_accuracy_axis(tmp_path, monkeypatch):
    recs = [{"step": s, "loss": 1.0, "lr": 1e-4, "tokens_per_s": 100.0} for s in range(1, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    figures = []
    monkeypatch.setattr(plot, "_save", lambda fig, out: figures.append(fig))
    plot.plot_run(tmp_path)
    labels = [ax.get_ylabel() for ax in figures[0].axes]
    assert "accuracy" not in labels and "loss (nats / token)" in labels
