"""The config's error type and the two checks every section's `validate` uses (engine/config.py,
engine/config_objective.py): a wrong value names its key and says why."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config value is wrong; the message names the key and says why."""


def _fail(key: str, why: str) -> None:
    raise ConfigError(f"config key '{key}': {why}")


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        _fail(key, f"{value!r} is not one of {', '.join(map(repr, allowed))}")
