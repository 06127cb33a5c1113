"""What every logger shares: its error, the metric names, flattened configs and table rows."""

from __future__ import annotations

import math
from typing import Iterator


class LoggerError(RuntimeError):
    """A chosen logger cannot work (package missing, tracking URI unusable); raised before training."""


def metric_name(key: str) -> str:
    """metrics.jsonl key -> logger name: eval_loss -> eval/loss, tokens_per_s -> train/tokens_per_s."""
    return f"eval/{key[len('eval_'):]}" if key.startswith("eval_") else f"train/{key}"


def numeric_items(record: dict) -> Iterator[tuple[str, float]]:
    """(key, value) of a record's finite numbers, "step" left out (NaN: a skipped fp16 step's norm)."""
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            yield key, value


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1}} -> {"train.lr": 1}: nested config / summary as dotted keys."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def table_rows(rows: list[dict]) -> tuple[list[str], list[list]]:
    """(columns, rows of cells) for records that may nest dicts (a generation's scores)."""
    flat = [flatten(r) for r in rows]
    columns = list(dict.fromkeys(k for r in flat for k in r))
    return columns, [[r.get(c) for c in columns] for r in flat]
