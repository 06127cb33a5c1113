"""The run's loggers as one object: checked before the model is built, started once the resume
step is known, fed every metrics.jsonl record, closed with the run's outcome.

    open_trackers(cfg, ctx)        context manager around a whole run (engine/train.py::run_training):
      |                              rank 0 imports each chosen logger's package and checks its URI;
      |                              a failure is one LoggerError line, before any model is loaded
      v
    trackers.start(out, resume_step, logged_through)
      |                              creates (or, on resume, continues) the W&B / MLflow run whose id
      |                              is kept in output_dir/tracking.json; logs the resolved config
      v
    trackers.log_metrics(record)   every log step's and evaluation's record, as written to metrics.jsonl
    trackers.log_summary(summary, out)
      |                              summary numbers, sample generations as a table, the plot,
      v                              summary.json and config.yaml as artifacts
    exit                           each run closed as finished, killed (Ctrl-C / SIGTERM) or failed

A logger that breaks mid-run (a tracking server gone away) is warned about once and dropped:
a picture of the run never stops the run. Only rank 0 logs; other ranks hold an empty fan-out.
"""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Protocol

import engine.tracking.mlflow_logger as mlflow_logger
import engine.tracking.tensorboard as tensorboard
import engine.tracking.wandb_logger as wandb_logger
from engine.tracking.records import LoggerError

TRACKING_FILE = "tracking.json"
"""output_dir/tracking.json: {logger name: its run id and where it lives}, read back on resume."""


class Tracker(Protocol):
    """One logger. `record`s are metrics.jsonl records: {"step": int, key: number, ...}."""

    name: str

    def identity(self) -> dict:
        """What finds this run again on resume (stored in tracking.json): {"run_id": ..., ...}."""

    def log_metrics(self, record: dict) -> None: ...

    def log_table(self, name: str, rows: list[dict], step: int) -> None: ...

    def log_summary(self, summary: dict) -> None: ...

    def log_artifact(self, path: Path) -> None: ...

    def finish(self, status: str) -> None:
        """status: finished | killed | failed."""


class Trackers:
    """Every chosen logger behind one call each; a logger that raises is warned about and dropped."""

    def __init__(self, cfg=None, factories: dict | None = None):
        self.cfg, self.factories = cfg, factories or {}
        self.active: list[Tracker] = []

    def start(self, out: Path, *, resume_step: int, logged_through: int) -> None:
        """Create or continue each logger's run. `logged_through`: the last step metrics.jsonl
        held before a resume (W&B and MLflow already have those records: they are not sent again)."""
        out = Path(out)
        stored = _read_ids(out) if resume_step > 0 else {}
        config = asdict(self.cfg)
        for name, make in self.factories.items():
            self.active.append(make(self.cfg, config, out, previous=stored.get(name), resume_step=resume_step,
                                    logged_through=logged_through))
        if any(t.name != "tensorboard" for t in self.active):
            (out / TRACKING_FILE).write_text(json.dumps({t.name: t.identity() for t in self.active}, indent=2))

    def _each(self, what: str, call) -> None:
        for tracker in list(self.active):
            try:
                call(tracker)
            except Exception as e:  # noqa: BLE001 - never stop a run over a picture of it
                warnings.warn(f"logger {tracker.name} failed to {what} ({type(e).__name__}: {e}); "
                              "it is off for the rest of this run")
                self.active.remove(tracker)

    def log_metrics(self, record: dict) -> None:
        self._each("log metrics", lambda t: t.log_metrics(record))

    def log_summary(self, summary: dict, out: Path) -> None:
        """The end of a run: summary numbers, generations.jsonl as a table, the run's files as artifacts."""
        out = Path(out)
        self._each("log the summary", lambda t: t.log_summary(summary))
        generations = out / "generations.jsonl"
        if generations.is_file():
            rows = [json.loads(line) for line in generations.read_text(encoding="utf-8").splitlines() if line.strip()]
            self._each("log the generations", lambda t: t.log_table("generations", rows, summary["steps"]))
        for name in ("summary.json", "config.yaml", "loss.png", "scores.md"):
            if (out / name).is_file():
                self._each(f"store {name}", lambda t: t.log_artifact(out / name))

    def finish(self, status: str) -> None:
        self._each("close its run", lambda t: t.finish(status))
        self.active = []


def _read_ids(out: Path) -> dict:
    path = out / TRACKING_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        warnings.warn(f"{path} is unreadable: the loggers start new runs")
        return {}


def _factories(cfg) -> dict:
    """{logger name: its class} for the chosen loggers, each package imported and checked now."""
    chosen = {}
    lc = cfg.logger
    if lc.tensorboard is True or (lc.tensorboard == "auto" and tensorboard.installed(announce=True)):
        tensorboard.check()
        chosen["tensorboard"] = tensorboard.TensorBoardTracker
    if lc.wandb:
        wandb_logger.check(lc)
        chosen["wandb"] = wandb_logger.WandbTracker
    if lc.mlflow:
        mlflow_logger.check(lc, Path(cfg.output_dir))
        chosen["mlflow"] = mlflow_logger.MlflowTracker
    return chosen


@contextmanager
def open_trackers(cfg, is_main: bool) -> Iterator[Trackers]:
    """The run's loggers (see the module docstring); closes their runs with the outcome."""
    trackers = Trackers(cfg, _factories(cfg) if is_main else {})
    try:
        yield trackers
    except KeyboardInterrupt:
        trackers.finish("killed")
        raise
    except BaseException:
        trackers.finish("failed")
        raise
    trackers.finish("finished")
