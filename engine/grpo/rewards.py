"""Reward functions, loaded from the config and called as TRL's GRPOTrainer calls them.

    objective.rewards: ["path/to/file.py:function", "package.module:function", ...]
    fn(prompts=[...], completions=[...], completion_ids=[[...], ...], **columns) -> [float | None, ...]

One call per function per rollout, over all N = prompts x G completions (prompt-major). Standard
prompts: prompts and completions are strings. Conversational prompts: prompts are the message
lists and each completion is [{"role": "assistant", "content": text}]. Every other column of the
prompt file arrives as a keyword argument, a list with one value per completion. None means "not
scored" (TRL's NaN): left out of that function's mean, and a completion no function scored gets
advantage 0. A function that raises, returns the wrong number of values or a non-number stops
the run naming the function and the prompt's file:line.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from dataclasses import dataclass
from typing import Callable

from engine.grpo.data import Prompt


class RewardError(RuntimeError):
    """A reward function could not be loaded, raised, or returned something unusable; the message
    names the function and (for a bad value) the prompt's file:line."""


@dataclass
class RewardFunction:
    name: str             # the function's __name__ (TRL's metric name: rewards/<name>/mean)
    spec: str             # as configured
    fn: Callable


def load_reward_function(spec: str) -> RewardFunction:
    """"path/to/file.py:function" (relative to the working directory) or "package.module:function"."""
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise RewardError(f"reward function {spec!r}: write it as \"path/to/file.py:function\" or \"package.module:function\"")
    if target.endswith(".py") or os.sep in target:
        if not os.path.isfile(target):
            raise RewardError(f"reward function {spec!r}: file {target!r} does not exist")
        name = f"engine_reward_{abs(hash(os.path.abspath(target)))}"
        module_spec = importlib.util.spec_from_file_location(name, target)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # dataclasses and pickling inside the file look themselves up here
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - the user's file: say which and why
            raise RewardError(f"reward function {spec!r}: importing {target} failed: {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise RewardError(f"reward function {spec!r}: cannot import module {target!r}: {e}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"reward function {spec!r}: {target} has no function {attr!r}")
    return RewardFunction(getattr(fn, "__name__", attr), spec, fn)


def unique_names(functions: list[RewardFunction]) -> list[str]:
    """Metric names: the function names, numbered where two share one."""
    names = [f.name for f in functions]
    return [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]


def reward_inputs(prompts: list[Prompt], texts: list[str], num_generations: int) -> tuple[list, list, dict]:
    """(prompts, completions, columns) as TRL hands them: one entry per completion, prompt-major."""
    per_completion = [p for p in prompts for _ in range(num_generations)]
    if per_completion and per_completion[0].conversational:
        shown = [p.prompt for p in per_completion]
        completions = [[{"role": "assistant", "content": t}] for t in texts]
    else:
        shown = [p.prompt for p in per_completion]
        completions = list(texts)
    keys = sorted({k for p in prompts for k in p.columns})
    columns = {k: [p.columns.get(k) for p in per_completion] for k in keys}
    return shown, completions, columns


def score(functions: list[RewardFunction], prompts: list[Prompt], texts: list[str], completion_ids: list[list[int]],
          num_generations: int) -> list[list[float]]:
    """[N][F] rewards (NaN = not scored) of N = len(prompts) x G completions, checked (module docstring)."""
    shown, completions, columns = reward_inputs(prompts, texts, num_generations)
    n = len(texts)
    table = [[math.nan] * len(functions) for _ in range(n)]
    for j, f in enumerate(functions):
        try:
            values = f.fn(prompts=shown, completions=completions, completion_ids=completion_ids, **columns)
        except Exception as e:  # noqa: BLE001 - the user's function: stop with its name and the prompts
            raise RewardError(f"reward function {f.name} ({f.spec}) raised {type(e).__name__}: {e} "
                              f"(prompts {prompts[0].source} .. {prompts[-1].source})") from e
        try:
            values = list(values)
        except TypeError:
            raise RewardError(f"reward function {f.name} ({f.spec}) returned {type(values).__name__}, "
                              f"not a list of {n} floats (prompts {prompts[0].source} .. {prompts[-1].source})") from None
        if len(values) != n:
            raise RewardError(f"reward function {f.name} ({f.spec}) returned {len(values)} values for {n} completions "
                              f"(prompts {prompts[0].source} .. {prompts[-1].source})")
        for i, v in enumerate(values):
            if v is None:
                continue
            if not isinstance(v, (int, float)) and not _is_number(v):
                raise RewardError(f"reward function {f.name} ({f.spec}) returned {v!r} for completion {i % num_generations} "
                                  f"of prompt {prompts[i // num_generations].source}: not a number (or None)")
            v = float(v)
            if math.isinf(v) or math.isnan(v):
                raise RewardError(f"reward function {f.name} ({f.spec}) returned {v} for completion "
                                  f"{i % num_generations} of prompt {prompts[i // num_generations].source} "
                                  "(use None for 'not scored')")
            table[i][j] = v
    return table


def _is_number(v) -> bool:
    """numpy / torch scalars: anything with a float value and no length."""
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return not hasattr(v, "__len__")
