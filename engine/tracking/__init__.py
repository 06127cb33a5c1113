"""Where a run's numbers go: metrics.jsonl (metrics_log.py, the record of truth) and the loggers of
the `logger` group, TensorBoard, Weights & Biases, MLflow (one module each). runs.py is the fan-out
the training loop talks to; records.py what the loggers share."""

from engine.tracking.metrics_log import MetricsLog
from engine.tracking.records import LoggerError
from engine.tracking.runs import Trackers, open_trackers

__all__ = ["LoggerError", "MetricsLog", "Trackers", "open_trackers"]
