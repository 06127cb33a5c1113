"""engine.config: validation messages name the key, Hydra composition, and the generated reference."""

import importlib.util
from pathlib import Path

import pytest

from engine.config import ConfigError, RunConfig, from_dict, register_configs

ROOT = Path(__file__).resolve().parent.parent
CONFIG_PY = ROOT / "engine" / "config.py"


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_config_reference", ROOT / "scripts" / "gen_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def train_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    return path


def raw(train_file, **sections):
    """A config dict that validates, with `sections` merged in (e.g. peft={"r": 0})."""
    out = {"output_dir": "runs/test", "data": {"train_path": str(train_file)}}
    for name, values in sections.items():
        out.setdefault(name, {}).update(values)
    return out


# ---------------------------------------------------------------- validation
def test_valid_config_builds_and_validates(train_file):
    cfg = from_dict(raw(train_file, optim={"betas": [0.9, 0.95]}, peft={"targets": ["q_proj", "v_proj"]}))
    assert isinstance(cfg.validate(), RunConfig)
    assert cfg.optim.betas == (0.9, 0.95) and cfg.peft.targets == ["q_proj", "v_proj"]


@pytest.mark.parametrize("bad, key", [({"train": {"foo": 1}}, "train.foo"), ({"foo": 1}, "foo"),
                                      ({"peft": {"rank": 8}}, "peft.rank")])
def test_unknown_keys_are_named(train_file, bad, key):
    config = raw(train_file)
    for name, values in bad.items():
        if isinstance(values, dict):
            config.setdefault(name, {}).update(values)
        else:
            config[name] = values
    with pytest.raises(ConfigError, match=rf"config key '{key}': unknown key \(known: "):
        from_dict(config)


@pytest.mark.parametrize("sections, key, why", [
    ({"peft": {"r": 0}}, "peft.r", "must be a positive integer, got 0"),
    ({"peft": {"r": -4}}, "peft.r", "must be a positive integer, got -4"),
    ({"train": {"precision": "fp8"}}, "train.precision", "'fp8' is not one of 'auto', 'fp32', 'fp16', 'bf16'"),
    ({"optim": {"lr": 0.0}}, "optim.lr", "must be > 0"),
    ({"data": {"max_seq_len": 4}}, "data.max_seq_len", "must be an integer >= 8"),
    ({"train": {"micro_batch_size": "big"}}, "train.micro_batch_size", "positive integer or 'auto'"),
    ({"speed": {"mode": "fast"}}, "speed.mode", "'fast' is not one of 'auto', 'off'"),
])
def test_bad_values_name_the_key(train_file, sections, key, why):
    with pytest.raises(ConfigError, match=f"config key '{key}': .*{why}".replace("(", r"\(").replace(")", r"\)")):
        from_dict(raw(train_file, **sections)).validate()


def test_offload_without_checkpointing_is_refused(train_file):
    with pytest.raises(ConfigError, match="config key 'train.offload_activations': needs train.activation_checkpointing"):
        from_dict(raw(train_file, train={"offload_activations": True})).validate()


def test_missing_data_file_is_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ConfigError, match=rf"config key 'data.train_path': file '{missing}' does not exist"):
        from_dict({"data": {"train_path": str(missing)}}).validate()
    with pytest.raises(ConfigError, match="config key 'data.train_path': is not set"):
        from_dict({}).validate()


# ---------------------------------------------------------------- Hydra
@pytest.fixture
def compose():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        yield lambda *overrides: hydra_compose(config_name="config", overrides=list(overrides))


def test_hydra_composes_config_with_overrides(compose, train_file):
    from omegaconf import OmegaConf

    dcfg = compose("train.max_steps=7", "peft=qlora", "peft.r=8", "peft.targets=[q_proj,v_proj]",
                   "train.micro_batch_size=auto", f"data.train_path={train_file}", "data.eval_path=null")
    cfg = from_dict(OmegaConf.to_container(dcfg, resolve=True)).validate()
    assert cfg.train.max_steps == 7 and cfg.train.micro_batch_size == "auto"
    assert cfg.peft.method == "qlora" and cfg.peft.r == 8 and cfg.peft.targets == ["q_proj", "v_proj"]
    assert cfg.data.train_path == str(train_file) and cfg.data.eval_path is None
    assert cfg.optim.betas == (0.9, 0.999)  # a YAML list becomes the dataclass's tuple


def test_hydra_rejects_unknown_keys(compose):
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf

    with pytest.raises(ConfigCompositionException, match="Could not override 'train.foo'"):
        compose("train.foo=1")  # struct mode: the schema has no train.foo
    with pytest.raises(ConfigCompositionException, match="train.max_steps"):
        compose("train.max_steps=many")  # typed: an int field
    # `+key=` forces Hydra to add the key; from_dict still refuses it by name.
    dcfg = compose("+train.foo=1")
    with pytest.raises(ConfigError, match="config key 'train.foo': unknown key"):
        from_dict(OmegaConf.to_container(dcfg, resolve=True))


@pytest.mark.parametrize("overrides", [["+experiment=seed_msa_qlora"], ["model=hf_dir"]])
def test_model_path_the_user_must_set_is_required(compose, train_file, overrides):
    from omegaconf import OmegaConf

    dcfg = compose(*overrides, f"data.train_path={train_file}", "data.eval_path=null")
    with pytest.raises(ConfigError, match="config key 'model.path': is not set"):
        from_dict(OmegaConf.to_container(dcfg, resolve=True)).validate()


def test_every_experiment_composes(compose, train_file):
    from omegaconf import OmegaConf

    for exp in sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")):
        dcfg = compose(f"+experiment={exp}", "model.path=default", f"data.train_path={train_file}",
                       "data.eval_path=null")
        from_dict(OmegaConf.to_container(dcfg, resolve=True)).validate()


# ---------------------------------------------------------------- docs and the reference
def test_every_field_has_a_doc_string():
    assert load_generator().undocumented(CONFIG_PY.read_text()) == []


def test_undocumented_field_is_reported():
    gen = load_generator()
    source = CONFIG_PY.read_text()
    doc = '    """Optimizer steps to train for."""\n'
    assert doc in source
    assert gen.undocumented(source.replace(doc, "")) == ["train.max_steps"]
    with pytest.raises(ValueError, match="no doc string for train.max_steps"):
        gen.render(source.replace(doc, ""))


def test_config_reference_is_up_to_date():
    gen = load_generator()
    assert (ROOT / "docs" / "CONFIG.md").read_text() == gen.render(), \
        "docs/CONFIG.md is stale: run python scripts/gen_config_reference.py"
    assert gen.main(["--check"]) == 0


def test_reference_lists_every_key_once():
    gen = load_generator()
    text = gen.render()
    for prefix, cls in gen.sections():
        for f in gen.scalar_fields(cls):
            key = f"{prefix}.{f.name}" if prefix else f.name
            assert text.count(f"| `{key}` |") == 1, key
    assert "| `train.max_steps` | `int` | `100` | Optimizer steps to train for. |" in text
    assert "| `optim.betas` | `Tuple[float, float]` | `[0.9, 0.999]` |" in text
    assert "`peft=qlora`" in text


def test_check_fails_on_stale_reference(tmp_path, monkeypatch, capsys):
    gen = load_generator()
    stale = tmp_path / "CONFIG.md"
    stale.write_text("# old\n")
    monkeypatch.setattr(gen, "OUTPUT", stale)
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    assert gen.main(["--check"]) == 1
    assert "CONFIG.md is out of date: run python scripts/gen_config_reference.py" in capsys.readouterr().err
    assert gen.main([]) == 0 and gen.main(["--check"]) == 0  # regenerating fixes it
