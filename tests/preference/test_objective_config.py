"""The objective group: sft by default, objective=dpo / orpo compose with every experiment, bad
values name the key."""

from pathlib import Path

import pytest

from engine.config import ConfigError, ObjectiveConfig, from_dict, register_configs

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def compose():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        yield lambda *overrides: hydra_compose(config_name="config", overrides=list(overrides))


def build(dcfg):
    from omegaconf import OmegaConf

    return from_dict(OmegaConf.to_container(dcfg, resolve=True)).validate()


@pytest.mark.parametrize("objective", [None, "sft", "dpo", "orpo"])
def test_objective_composes_with_every_experiment(compose, tmp_path, objective):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    # quickstart_grpo sets GRPO's own options (loss_type, rewards): it composes with objective=grpo only
    for exp in sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml") if p.stem != "quickstart_grpo"):
        overrides = [f"+experiment={exp}", "model.path=default", f"data.train_path={data}", "data.eval_path=null"]
        if objective:
            overrides.append(f"objective={objective}")
        cfg = build(compose(*overrides))
        expected = objective or ("dpo" if exp == "quickstart_dpo" else "sft")
        assert cfg.objective.name == expected, exp
        assert cfg.objective.beta == 0.1


def test_dpo_overrides(compose, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    cfg = build(compose("objective=dpo", "objective.beta=0.5", "objective.label_smoothing=0.1",
                        "objective.loss_type=robust", f"data.train_path={data}", "data.eval_path=null"))
    assert (cfg.objective.beta, cfg.objective.label_smoothing, cfg.objective.loss_type) == (0.5, 0.1, "robust")


@pytest.mark.parametrize("kwargs, key, why", [
    ({"name": "ppo"}, "objective.name", "'ppo' is not one of 'sft', 'dpo', 'orpo'"),
    ({"name": "dpo", "beta": 0.0}, "objective.beta", "must be > 0"),
    ({"name": "dpo", "label_smoothing": 0.5}, "objective.label_smoothing", "must be in [0, 0.5)"),
    ({"name": "dpo", "loss_type": "ipo"}, "objective.loss_type", "'ipo' is not one of"),
    ({"name": "orpo", "label_smoothing": 0.1}, "objective.label_smoothing", "only applies to objective=dpo"),
    ({"name": "sft", "precompute_ref": True}, "objective.precompute_ref", "only applies to objective=dpo"),
])
def test_bad_objective_values_name_the_key(kwargs, key, why):
    with pytest.raises(ConfigError) as e:
        ObjectiveConfig(**kwargs).validate()
    assert f"config key '{key}'" in str(e.value) and why in str(e.value)
