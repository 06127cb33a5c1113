"""TensorBoard event files beside metrics.jsonl, holding the same scalars (optional `tensorboard` extra).

Event files go into the run directory itself, so `tensorboard --logdir runs` lists each run under
its own name. metrics.jsonl stays the record of truth; this is a mirror for people who watch
training in TensorBoard.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

INSTALL_HINT = "pip install 'engine[tensorboard]'"
_said_missing = False  # say "not installed" once per process, not at every run/evaluation


def _tag(key: str) -> str:
    """metrics.jsonl key -> TensorBoard tag: eval_loss -> eval/loss, tokens_per_s -> train/tokens_per_s."""
    return f"eval/{key[len('eval_'):]}" if key.startswith("eval_") else f"train/{key}"


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
        for key, value in record.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isnan(value):  # a skipped fp16 step's grad_norm: leave a gap, not a NaN point
                continue
            self._writer.add_scalar(_tag(key), value, step)
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
