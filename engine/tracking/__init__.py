"""Where a run's numbers go besides metrics.jsonl: TensorBoard, Weights & Biases, MLflow (the
`logger` config group). runs.py is the fan-out the training loop talks to; one module per logger."""

from engine.tracking.runs import LoggerError, Trackers, open_trackers

__all__ = ["LoggerError", "Trackers", "open_trackers"]
