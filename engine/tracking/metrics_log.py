"""metrics.jsonl: the run's record of truth, one JSON line per log step and per evaluation, each
also handed to the run's loggers (engine/tracking/runs.py)."""

from __future__ import annotations

import json
from pathlib import Path

from engine.tracking.runs import Trackers


class MetricsLog:
    """metrics.jsonl, one JSON record per logged step; on resume, records past the step are dropped.
    Every record also goes to the run's loggers (engine/tracking/), started here once the resume
    step is known; those that kept the dropped records (W&B, MLflow) are not sent them again."""

    def __init__(self, path: Path, resume_step: int, enabled: bool, trackers: Trackers | None = None):
        self.path, self.enabled, self.trackers = path, enabled, trackers or Trackers()
        if not enabled:
            return
        kept, logged_through = [], 0
        if resume_step > 0 and path.exists():
            for line in path.read_text().splitlines():
                try:
                    step = json.loads(line).get("step", 0)
                except json.JSONDecodeError:  # a line half-written when the process was killed
                    continue
                logged_through = max(logged_through, step)
                if step <= resume_step:
                    kept.append(line)
        path.write_text("".join(line + "\n" for line in kept))
        self.trackers.start(path.parent, resume_step=resume_step, logged_through=logged_through)

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.trackers.log_metrics(record)
