"""TensorBoard event files beside metrics.jsonl, holding the same scalars (optional `tensorboard` extra).

Event files go into the run directory itself, so `tensorboard --logdir runs` lists each run under
its own name. metrics.jsonl stays the record of truth; this is a mirror for people who watch
training in TensorBoard. `TensorBoardTracker` is the logger engine/tracking/runs.py starts for
logger=tensorboard (and logger=auto where tensorboard is installed).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from engine.tracking.records import LoggerError, metric_name, numeric_items, table_rows

INSTALL_HINT = "pip install 'engine[tensorboard]'"
_said_missing = False  # say "not installed" once per process, not at every run/evaluation


class TensorBoardWriter:
    """Writes each metrics.jsonl record's numeric values as scalars at the record's step.

    `purge_step`: on resume, pass the first step that will be written again; TensorBoard then hides
    events at or after it left by the interrupted run (as MetricsLog drops those records)."""

    def __init__(self, run_dir: str | Path, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter  # imports the `tensorboard` package
        except ImportError as e:
            raise ImportError(f"TensorBoard logging needs the tensorboard package: {INSTALL_HINT}") from e
        self.run_dir = Path(run_dir)
        self._writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=purge_step)

    def write(self, record: dict) -> None:
        """Log one metrics.jsonl record ({"step": int, key: number, ...}) and flush it to disk."""
        step = int(record["step"])
        for key, value in numeric_items(record):  # a skipped fp16 step's NaN grad_norm: a gap, not a point
            self._writer.add_scalar(metric_name(key), value, step)
        # Flushing each record keeps the file current for a live TensorBoard and means the loop
        # never has to close us; records come once per log step, so this is cheap.
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def maybe_tensorboard(run_dir: str | Path, enabled: bool, purge_step: int | None = None) -> TensorBoardWriter | None:
    """A TensorBoardWriter when `enabled` and tensorboard is installed; otherwise None.

    When enabled but not installed, says so once on stderr (training goes on without it)."""
    global _said_missing
    if not enabled:
        return None
    try:
        return TensorBoardWriter(run_dir, purge_step=purge_step)
    except ImportError:
        if not _said_missing:
            print(f"TensorBoard logging is off: tensorboard is not installed ({INSTALL_HINT})", file=sys.stderr)
            _said_missing = True
        return None


def installed(announce: bool = False) -> bool:
    """Whether torch.utils.tensorboard imports; `announce`: say once when it does not (logger=auto)."""
    global _said_missing
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        return True
    except ImportError:
        if announce and not _said_missing:
            print(f"TensorBoard logging is off: tensorboard is not installed ({INSTALL_HINT})", file=sys.stderr)
            _said_missing = True
        return False


def check() -> None:
    if not installed():
        raise LoggerError(f"logger=tensorboard needs the tensorboard package: {INSTALL_HINT}")


class TensorBoardTracker(TensorBoardWriter):
    """The run's TensorBoard logger: scalars per record; on resume, events past the resume step
    are hidden (purge_step) and written again; the summary and the generations as text."""

    name = "tensorboard"

    def __init__(self, cfg, config: dict, out: Path, *, previous: dict | None, resume_step: int, logged_through: int):
        super().__init__(out, purge_step=resume_step + 1 if resume_step else None)
        self._writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", resume_step)
        self._last_step = resume_step

    def identity(self) -> dict:
        return {"log_dir": str(self.run_dir)}

    def log_metrics(self, record: dict) -> None:
        self._last_step = int(record["step"])
        self.write(record)

    def log_table(self, name: str, rows: list[dict], step: int) -> None:
        columns, cells = table_rows(rows)
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |"
                  for row in cells]
        self._writer.add_text(name, "\n".join(lines), step)
        self._writer.flush()

    def log_summary(self, summary: dict) -> None:
        self._writer.add_text("summary", "```\n" + json.dumps(summary, indent=2) + "\n```", self._last_step)
        self._writer.flush()

    def log_artifact(self, path: Path) -> None:
        pass  # the files sit in the run directory TensorBoard reads

    def finish(self, status: str) -> None:
        self.close()
