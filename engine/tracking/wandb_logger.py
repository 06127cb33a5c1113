"""Weights & Biases as a run's logger (logger=wandb; optional `wandb` extra).

Offline unless an account is configured, so it works on a machine without network: the run is
kept in output_dir/wandb/offline-run-*/ and `wandb sync output_dir/wandb/offline-run-*` uploads it
later. WANDB_MODE, when set, decides (logger.wandb_mode=online|offline decides over it). Metrics are
logged at the training step (train/loss, eval/loss, ...); a resumed run continues the same run id
(output_dir/tracking.json), and an offline resume is a second offline-run directory with that id,
which `wandb sync` merges into the one run.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

from engine.tracking.records import LoggerError, flatten, metric_name, numeric_items, table_rows

INSTALL_HINT = "pip install 'engine[wandb]'"
STATUS_EXIT_CODES = {"finished": 0, "killed": 130, "failed": 1}


def check(lc) -> None:
    """The package imports (a missing one is one line, before training)."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise LoggerError(f"logger=wandb needs the wandb package: {INSTALL_HINT}") from None


def has_account() -> bool:
    """An API key is configured: WANDB_API_KEY, or a netrc entry for the W&B host (`wandb login`)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(wandb_mode: str) -> str | None:
    """online | offline, or None to let WANDB_MODE decide (see the module docstring)."""
    if wandb_mode != "auto":
        return wandb_mode
    if os.environ.get("WANDB_MODE"):
        return None
    return "online" if has_account() else "offline"


def run_name(lc, out: Path) -> str:
    return lc.run_name or Path(out).resolve().name


class WandbTracker:
    name = "wandb"

    def __init__(self, cfg, config: dict, out: Path, *, previous: dict | None, resume_step: int, logged_through: int):
        import wandb

        lc = cfg.logger
        run_id = (previous or {}).get("run_id")
        self._wandb = wandb
        self._skip_through = logged_through if run_id else 0
        self.run = wandb.init(project=lc.project, entity=lc.wandb_entity, name=run_name(lc, out), tags=list(lc.tags),
                              config=config, dir=str(out), id=run_id, resume="allow" if run_id else None,
                              mode=resolve_mode(lc.wandb_mode), reinit="finish_previous", job_type="train")
        self._last_step = resume_step

    def identity(self) -> dict:
        return {"run_id": self.run.id, "project": self.run.project, "mode": "offline" if self.run.offline else "online",
                "dir": self.run.dir}

    def log_metrics(self, record: dict) -> None:
        step = int(record["step"])
        if step <= self._skip_through and self._skip_through:  # sent before the interruption
            return
        self._last_step = max(self._last_step, step)
        values = {metric_name(k): v for k, v in numeric_items(record)}
        if values:
            self.run.log(values, step=step)

    def log_table(self, name: str, rows: list[dict], step: int) -> None:
        columns, cells = table_rows(rows)
        table = self._wandb.Table(columns=columns, data=[[c if isinstance(c, (int, float, str)) or c is None else str(c)
                                                         for c in row] for row in cells])
        self.run.log({name: table}, step=max(step, self._last_step))

    def log_summary(self, summary: dict) -> None:
        self.run.summary.update({k: v for k, v in flatten(summary).items()
                                 if v is None or isinstance(v, (bool, int, float, str))})

    def log_artifact(self, path: Path) -> None:
        self.run.save(str(path), base_path=str(Path(path).parent), policy="now")

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=STATUS_EXIT_CODES[status])
