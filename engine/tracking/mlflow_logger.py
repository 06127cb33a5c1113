"""MLflow as a run's logger (logger=mlflow; optional `mlflow` extra, mlflow-skinny is enough).

The tracking URI: logger.mlflow_tracking_uri, else MLFLOW_TRACKING_URI, else the file store
`mlruns/` beside the run directory (runs/quickstart -> runs/mlruns, so the runs of one folder are
compared in one `mlflow ui --backend-store-uri runs/mlruns`). MLflow 3 refuses file stores unless
MLFLOW_ALLOW_FILE_STORE is set: for a local store we set it (when unset) for this process.
The experiment is logger.project; the resolved config becomes the run's params (dotted keys) and
config.yaml; metrics are logged at the training step; a resumed run reopens the same run id.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from engine.tracking.records import LoggerError, flatten, metric_name, numeric_items, table_rows

INSTALL_HINT = "pip install 'engine[mlflow]'"
STATUSES = {"finished": "FINISHED", "killed": "KILLED", "failed": "FAILED"}
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
BATCH = 100             # params (and metrics) per log_batch call


def tracking_uri(lc, output_dir: Path) -> str:
    uri = lc.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return (Path(output_dir).resolve().parent / "mlruns").as_uri()


def local_store(uri: str) -> Path | None:
    """The directory of a file store (file:/path or a plain path), else None."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(parsed.path)
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):  # a path (C:\\ on Windows)
        return Path(uri)
    return None


@contextmanager
def _one_quick_try():
    """MLflow retries an HTTP request for minutes by default; the start-up check asks once."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check(lc, output_dir: Path) -> None:
    """The package imports and the tracking URI answers (a file store: its directory can be made)."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise LoggerError(f"logger=mlflow needs the mlflow package: {INSTALL_HINT} (or pip install mlflow-skinny)") from None
    uri = tracking_uri(lc, output_dir)
    store = local_store(uri)
    try:
        if store is not None:
            store.mkdir(parents=True, exist_ok=True)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        with _one_quick_try():
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - OSError, MlflowException, a connection error: all one answer
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LoggerError(f"logger=mlflow: tracking URI {uri!r} does not work: {first[:300]}") from None


class MlflowTracker:
    name = "mlflow"

    def __init__(self, cfg, config: dict, out: Path, *, previous: dict | None, resume_step: int, logged_through: int):
        from mlflow.tracking import MlflowClient

        lc = cfg.logger
        self.uri = tracking_uri(lc, out)
        self.client = MlflowClient(tracking_uri=self.uri)
        run_id = (previous or {}).get("run_id") if (previous or {}).get("tracking_uri") == self.uri else None
        self._skip_through = logged_through if run_id else 0
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
        else:
            experiment = self.client.get_experiment_by_name(lc.project)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(lc.project)
            tags = {tag: "true" for tag in lc.tags}
            run_id = self.client.create_run(experiment_id, run_name=lc.run_name or Path(out).resolve().name,
                                            tags=tags).info.run_id
            self._log_config(run_id, config)
        self.run_id, self._last_step = run_id, resume_step

    def _log_config(self, run_id: str, config: dict) -> None:
        from mlflow.entities import Param
        from omegaconf import OmegaConf

        params = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in flatten(config).items()]
        for i in range(0, len(params), BATCH):
            self.client.log_batch(run_id, params=params[i:i + BATCH])
        self.client.log_text(run_id, OmegaConf.to_yaml(OmegaConf.create(config)), "config.yaml")

    def identity(self) -> dict:
        return {"run_id": self.run_id, "tracking_uri": self.uri}

    def log_metrics(self, record: dict) -> None:
        from mlflow.entities import Metric

        step = int(record["step"])
        if step <= self._skip_through and self._skip_through:  # already in the run
            return
        self._last_step = max(self._last_step, step)
        now = _now_ms()
        metrics = [Metric(metric_name(k), float(v), now, step) for k, v in numeric_items(record)]
        for i in range(0, len(metrics), BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + BATCH])

    def log_table(self, name: str, rows: list[dict], step: int) -> None:
        columns, cells = table_rows(rows)
        data = {c: [row[i] if isinstance(row[i], (int, float, str)) or row[i] is None else str(row[i]) for row in cells]
                for i, c in enumerate(columns)}
        self.client.log_table(self.run_id, data=data, artifact_file=f"{name}.json")

    def log_summary(self, summary: dict) -> None:
        from mlflow.entities import Metric

        self.client.log_dict(self.run_id, summary, "summary.json")
        now = _now_ms()
        step = int(summary.get("steps", self._last_step))
        metrics = [Metric(f"summary/{k}", float(v), now, step) for k, v in numeric_items(flatten(summary))]
        for i in range(0, len(metrics), BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + BATCH])

    def log_artifact(self, path: Path) -> None:
        if Path(path).name != "summary.json":  # log_summary stored it
            self.client.log_artifact(self.run_id, str(path))

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=STATUSES[status])


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
