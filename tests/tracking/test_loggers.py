"""The `logger` group with the real libraries, offline: a short training run's W&B offline run and
MLflow file store read back with each library's own reader; resume continues the same runs; a
missing package or a bad tracking URI stops the run before the model is built."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import pytest

from engine import train as train_mod
from engine.config import LoggerConfig, PeftConfig, from_dict
from engine.tracking import LoggerError, Trackers, open_trackers
from engine.tracking import wandb_logger
from tests.conftest import counting_run_config, make_tiny_model_dir
from tests.tracking.wandb_files import offline_runs, read_run

pytest.importorskip("wandb")
pytest.importorskip("mlflow")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("loggers"), "llama")


def logged_cfg(root: Path, model_dir, *, max_steps: int, **train):
    cfg = counting_run_config(root, model_dir, PeftConfig(r=4, alpha=8), max_steps=max_steps)
    return replace(cfg, data=replace(cfg.data, eval_path=cfg.data.train_path),
                   train=replace(cfg.train, log_every=1, eval_every=2, **train),
                   logger=LoggerConfig(wandb=True, mlflow=True, project="engine-tests", run_name="counting",
                                       tags=["tiny", "lora"])).validate()


def jsonl(run_dir: Path) -> tuple[dict, dict]:
    """({step: train loss}, {step: eval loss}) from metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return ({r["step"]: r["loss"] for r in records if "loss" in r},
            {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r})


def mlflow_run(root: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(root / "mlruns").as_uri())  # the default: mlruns/ beside the run
    experiment = client.get_experiment_by_name("engine-tests")
    runs = client.search_runs([experiment.experiment_id])
    return client, runs


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_offline_runs_hold_config_metrics_and_summary(tmp_path, model_dir):
    cfg = logged_cfg(tmp_path, model_dir, max_steps=4)
    summary = train_mod.run_training(cfg)
    out = Path(cfg.output_dir)
    train_losses, eval_losses = jsonl(out)
    ids = json.loads((out / "tracking.json").read_text())

    # MLflow: one run in the experiment, its params, metric series, summary and artifacts
    client, runs = mlflow_run(tmp_path)
    assert [r.info.run_id for r in runs] == [ids["mlflow"]["run_id"]]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "counting"
    assert run.data.params["train.max_steps"] == "4" and run.data.params["peft.r"] == "4"
    assert run.data.tags["tiny"] == "true" and run.data.tags["lora"] == "true"
    assert history(client, run.info.run_id, "train/loss") == pytest.approx(sorted(train_losses.items()))
    assert history(client, run.info.run_id, "eval/loss") == pytest.approx(sorted(eval_losses.items()))
    for key in ("train/lr", "train/grad_norm", "train/tokens_per_s", "train/peak_mem_gib", "train/skipped_steps"):
        assert [s for s, _ in history(client, run.info.run_id, key)] == [1, 2, 3, 4], key
    assert run.data.metrics["summary/eval_loss_after"] == pytest.approx(summary["eval_loss_after"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "summary.json"} <= artifacts
    stored = json.loads(Path(client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path))).read_text())
    assert stored["final_train_loss"] == pytest.approx(summary["final_train_loss"])

    # W&B: the offline run's transaction log
    [path] = offline_runs(out / "wandb")
    wb = read_run(path)
    assert wb["run_id"] == ids["wandb"]["run_id"] and wb["name"] == "counting" and wb["tags"] == ["tiny", "lora"]
    assert wb["project"] == "engine-tests"
    assert wb["config"]["train"]["max_steps"] == 4 and wb["config"]["peft"]["r"] == 4
    logged = {h["_step"]: h for h in wb["history"]}
    assert {s: logged[s]["train/loss"] for s in train_losses} == pytest.approx(train_losses)
    assert {s: logged[s]["eval/loss"] for s in eval_losses} == pytest.approx(eval_losses)
    assert all("train/grad_norm" in logged[s] and "train/tokens_per_s" in logged[s] for s in train_losses)
    assert wb["summary"]["eval_loss_after"] == pytest.approx(summary["eval_loss_after"])
    assert wb["summary"]["steps"] == 4


def test_resumed_run_appends_to_the_same_runs(tmp_path, model_dir):
    """A run interrupted after step 3 (its last checkpoint at step 2) and rerun: the same MLflow run
    and W&B run id, every step logged once (3 was sent before the interruption: not again)."""
    cfg = logged_cfg(tmp_path, model_dir, max_steps=4, save_every=2, keep_last=5)
    train_mod.run_training(cfg)
    out = Path(cfg.output_dir)
    first_ids = json.loads((out / "tracking.json").read_text())
    # as if killed after logging step 3: only the step-2 checkpoint, metrics.jsonl through step 3
    shutil.rmtree(out / "checkpoints" / "step-4")
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records if r["step"] <= 3))
    client, runs = mlflow_run(tmp_path)
    loss_at_3 = dict(history(client, runs[0].info.run_id, "train/loss"))[3]

    train_mod.run_training(cfg)
    ids = json.loads((out / "tracking.json").read_text())
    assert ids["mlflow"] == first_ids["mlflow"] and ids["wandb"]["run_id"] == first_ids["wandb"]["run_id"]
    client, runs = mlflow_run(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [s for s, _ in history(client, runs[0].info.run_id, "train/loss")]
    assert steps == [1, 2, 3, 4, 4]  # the first run's 4 steps, then the resumed run's step 4 (3 not again)
    assert dict(history(client, runs[0].info.run_id, "train/loss"))[3] == loss_at_3

    first, second = offline_runs(out / "wandb")  # an offline resume: a second directory, the same id
    runs_wb = [read_run(first), read_run(second)]
    assert {r["run_id"] for r in runs_wb} == {first_ids["wandb"]["run_id"]}
    assert sorted(h["_step"] for h in runs_wb[1]["history"] if "train/loss" in h) == [4]


@pytest.mark.parametrize("package, logger", [("wandb", {"wandb": True}), ("mlflow", {"mlflow": True})])
def test_missing_package_fails_before_the_model_is_built(tmp_path, model_dir, monkeypatch, package, logger):
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
    if package == "mlflow":
        monkeypatch.setitem(sys.modules, "mlflow.tracking", None)
    monkeypatch.setattr(train_mod, "build_everything", lambda *a, **k: pytest.fail("the model was built"))
    cfg = replace(counting_run_config(tmp_path, model_dir, PeftConfig(r=4, alpha=8)), logger=LoggerConfig(**logger))
    with pytest.raises(LoggerError, match=rf"logger={package} needs the {package} package: pip install 'engine\[{package}\]'"):
        train_mod.run_training(cfg)
    assert not (Path(cfg.output_dir) / "metrics.jsonl").exists()


@pytest.mark.parametrize("uri", ["bogus-scheme://nowhere", "FILE_UNDER_A_FILE", "http://127.0.0.1:9/"])
def test_bad_tracking_uri_fails_before_the_model_is_built(tmp_path, model_dir, monkeypatch, uri):
    if uri == "FILE_UNDER_A_FILE":
        (tmp_path / "a-file").write_text("not a directory")
        uri = (tmp_path / "a-file" / "mlruns").as_uri()
    monkeypatch.setattr(train_mod, "build_everything", lambda *a, **k: pytest.fail("the model was built"))
    cfg = replace(counting_run_config(tmp_path, model_dir, PeftConfig(r=4, alpha=8)),
                  logger=LoggerConfig(mlflow=True, mlflow_tracking_uri=uri))
    with pytest.raises(LoggerError, match=r"logger=mlflow: tracking URI .* does not work: "):
        train_mod.run_training(cfg)
    assert not (Path(cfg.output_dir) / "metrics.jsonl").exists()


def test_cli_bad_uri_is_one_line_and_exit_1(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "engine.train", f"output_dir={tmp_path / 'run'}",
                           f"data.train_path={data}", "data.eval_path=null", "logger=[wandb,mlflow]",
                           "logger.mlflow_tracking_uri=bogus-scheme://nowhere"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr
    assert lines == [lines[0]] and lines[0].startswith("error: LoggerError: logger=mlflow: tracking URI 'bogus-scheme://nowhere'")


# ---------------------------------------------------------------- pieces
class Broken:
    name = "broken"

    def log_metrics(self, record):
        raise ConnectionError("server went away")

    def finish(self, status):
        pass


class Recording:
    name = "recording"

    def __init__(self):
        self.records, self.status = [], None

    def log_metrics(self, record):
        self.records.append(record)

    def finish(self, status):
        self.status = status


def test_a_logger_failing_mid_run_is_dropped_with_one_warning():
    trackers, good = Trackers(), Recording()
    trackers.active = [Broken(), good]
    with pytest.warns(UserWarning, match=r"logger broken failed to log metrics \(ConnectionError: server went away\)"):
        trackers.log_metrics({"step": 1, "loss": 1.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trackers.log_metrics({"step": 2, "loss": 0.5})
    assert [r["step"] for r in good.records] == [1, 2]


@pytest.mark.parametrize("error, status", [(None, "finished"), (KeyboardInterrupt, "killed"), (ValueError, "failed")])
def test_runs_close_with_the_outcome(tmp_path, error, status):
    cfg = replace(counting_run_config(tmp_path, tmp_path, PeftConfig(r=4, alpha=8)), logger=LoggerConfig())
    good = Recording()
    with pytest.raises(error) if error else warnings.catch_warnings():
        with open_trackers(cfg, is_main=True) as trackers:
            trackers.active = [good]
            if error:
                raise error()
    assert good.status == status


def test_only_rank_0_opens_loggers(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # would fail on rank 0
    cfg = replace(counting_run_config(tmp_path, tmp_path, PeftConfig(r=4, alpha=8)), logger=LoggerConfig(wandb=True))
    with open_trackers(cfg, is_main=False) as trackers:
        assert trackers.factories == {}
    with pytest.raises(LoggerError):
        with open_trackers(cfg, is_main=True):
            pass


def test_wandb_mode(monkeypatch, tmp_path):
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_logger.resolve_mode("auto") == "offline"  # no account
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password KEY\n")
    assert wandb_logger.resolve_mode("auto") == "online"   # `wandb login` wrote the key
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_logger.resolve_mode("auto") is None       # WANDB_MODE decides (wandb reads it)
    assert wandb_logger.resolve_mode("online") == "online"  # the config's explicit choice


# ---------------------------------------------------------------- config
def test_logger_group_on_the_command_line():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from engine.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        def chosen(*overrides):
            raw = OmegaConf.to_container(compose(config_name="config", overrides=list(overrides)), resolve=True)
            return raw["logger"]["tensorboard"], from_dict(raw).logger.backends

        assert chosen() == ("auto", [])
        assert chosen("logger=wandb") == (False, ["wandb"])
        assert chosen("logger=[wandb,mlflow]") == (False, ["wandb", "mlflow"])
        assert chosen("logger=[tensorboard,mlflow]") == (True, ["tensorboard", "mlflow"])
        assert chosen("logger=none") == (False, [])


def test_logger_shorthand_in_code_and_bad_names(tmp_path):
    base = {"data": {"train_path": str(tmp_path / "t.jsonl")}}
    assert from_dict({**base, "logger": ["wandb", "mlflow"]}).logger.backends == ["wandb", "mlflow"]
    assert from_dict({**base, "logger": "none"}).logger.tensorboard is False
    from engine.config import ConfigError
    with pytest.raises(ConfigError, match="config key 'logger': 'neptune' is not one of"):
        from_dict({**base, "logger": "neptune"})
    with pytest.raises(ConfigError, match="logger.wandb_mode"):
        LoggerConfig(wandb_mode="sometimes").validate()
