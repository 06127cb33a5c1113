"""Early stopping on an evaluation metric, and the best adapter kept beside the last.

    every evaluation during training (train.eval_every):
        value = record[metric]                      eval_loss, eval_preference_accuracy, eval_exact_match, ...
        better than best by > threshold?  -> best = (step, value), write adapter_best/, misses = 0
        else                              -> misses += 1; stop once misses == patience

The evaluation before training (step 0) is not a candidate: the adapter there is the identity.
The state (best step and value, misses) rides in the checkpoint's counters, so a resumed run
stops where the uninterrupted one would. adapter_best/ is written like a checkpoint: into a
temporary directory, then renamed into place, so a crash leaves the previous best whole.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Callable

MINIMISED = ("loss", "ppl", "perplexity")
BEST_DIR = "adapter_best"


def metric_key(name: str) -> str:
    """The evaluation record key a metric name means: exact_match -> eval_exact_match."""
    return name if name.startswith("eval_") else f"eval_{name}"


def resolve_mode(name: str, mode: str) -> str:
    """min for losses and perplexity, max for anything else (auto); else `mode` as given."""
    if mode != "auto":
        return mode
    return "min" if any(name.endswith(word) for word in MINIMISED) else "max"


class EarlyStopping:
    def __init__(self, patience: int, metric: str = "eval_loss", mode: str = "auto", threshold: float = 0.0):
        self.patience, self.threshold = patience, threshold
        self.metric = metric_key(metric)
        self.mode = resolve_mode(self.metric, mode)
        self.best_step: int | None = None
        self.best_value: float | None = None
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.patience > 0

    @property
    def should_stop(self) -> bool:
        return self.enabled and self.misses >= self.patience

    def _better(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best_value is None:
            return True
        gain = self.best_value - value if self.mode == "min" else value - self.best_value
        return gain > self.threshold

    def observe(self, step: int, record: dict) -> bool:
        """Take one evaluation's record; True when it is the new best (write adapter_best/ now)."""
        if not self.enabled or step == 0:
            return False
        if self.metric not in record:
            known = ", ".join(sorted(k for k in record if k.startswith("eval_")))
            raise KeyError(f"train.early_stopping_metric: {self.metric!r} is not among this run's evaluation "
                           f"metrics ({known})")
        value = float(record[self.metric])
        if self._better(value):
            self.best_step, self.best_value, self.misses = step, value, 0
            return True
        self.misses += 1
        return False

    def message(self, step: int, best_dir: Path) -> str:
        return (f"early stopping at step {step}: {self.metric} has not improved for {self.patience} evaluations "
                f"(best {self.best_value:.4f} at step {self.best_step}, kept in {best_dir})")

    def state_dict(self) -> dict:
        return {"best_step": self.best_step, "best_value": self.best_value, "misses": self.misses}

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            self.best_step, self.best_value, self.misses = state["best_step"], state["best_value"], state["misses"]

    def summary(self, stopped_at: int | None) -> dict:
        """The summary's rows: which metric, its best step and value, where the run stopped."""
        return {"early_stopping_metric": self.metric, "best_step": self.best_step, "best_value": self.best_value,
                "stopped_early": stopped_at is not None, "stopped_at_step": stopped_at,
                "adapter_best": BEST_DIR if self.best_step is not None else None}


def write_atomically(final: str | Path, write: Callable[[Path], None]) -> Path:
    """Write a directory with `write(tmp)` into a sibling temporary directory, then move it into
    place (the old one is removed only after the new one is complete)."""
    final = Path(final)
    tmp, old = final.with_name(f".tmp-{final.name}"), final.with_name(f".old-{final.name}")
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    write(tmp)
    for path in tmp.rglob("*"):  # on disk before it is the best
        if path.is_file():
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final
