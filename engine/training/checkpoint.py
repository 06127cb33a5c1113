"""Resumable training state, written atomically, with a manifest that marks it complete.

Layout of one checkpoint (`output_dir/checkpoints/step-N/`):

    adapter/               the adapter at step N, PEFT layout (loadable by PEFT as it is)
    trainable.safetensors  every trainable parameter by its model name, exact fp32 bits
    state.safetensors      every tensor of the training state (optimizer moments, RNG states, ...)
    state.json             the rest of the training state (numbers, strings), tensors by reference
    manifest.json          written last: step, file sizes and sha256 checksums

A checkpoint is written into `checkpoints/.tmp-step-N/` and renamed into place, and a
checkpoint without a manifest whose checksums match is never loaded (FIELD.md bug 6). Nothing is
unpickled: tensors go through safetensors, everything else through JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete or corrupt; the message names the directory and file."""


# ---------------------------------------------------------------- nested state <-> files
def _flatten(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """Replace every tensor in a nested structure by {"__tensor__": key}; tuples are tagged."""
    if isinstance(obj, torch.Tensor):
        key = path or "root"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        for k in obj:
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint state key {k!r} at {path!r} is neither str nor int")
        # JSON keys are strings: remember which were ints (optimizer state is keyed by param index).
        return {"__dict__": [[k, _flatten(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint state at {path!r} holds a {type(obj).__name__}, which is not saved")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- save
def save_checkpoint(root: str | Path, step: int, *, state: dict, trainable: dict[str, torch.Tensor],
                    write_adapter: Callable[[Path], None], keep_last: int = 2) -> Path:
    """Write `root/step-{step}` atomically and prune to the newest `keep_last` complete ones."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    write_adapter(tmp / "adapter")
    save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()},
              str(tmp / "trainable.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, tensors, "")
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(skeleton))

    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {"step": step, "files": {str(p.relative_to(tmp)): {"bytes": p.stat().st_size,
                                                                   "sha256": sha256_file(p)} for p in files}}
    for p in files:  # the data must be on disk before the manifest says it is
        with open(p, "rb+") as f:
            os.fsync(f.fileno())
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    with open(tmp / MANIFEST, "rb+") as f:
        os.fsync(f.fileno())

    if final.exists():  # a rerun of the same step (e.g. Ctrl-C right after a save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    _prune(root, keep_last)
    return final


def _prune(root: Path, keep_last: int) -> None:
    complete = sorted((s, p) for s, p in _step_dirs(root) if (p / MANIFEST).exists())
    for _, path in complete[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    return [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]


# ---------------------------------------------------------------- verify / load
def verify_checkpoint(path: str | Path) -> dict:
    """Return the manifest if every file is present with its checksum; raise CheckpointError if not."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: no {MANIFEST} (a write was interrupted)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is unreadable ({e})") from None
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} is missing")
        if f.stat().st_size != meta["bytes"] or sha256_file(f) != meta["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} does not match its checksum")
    return manifest


def load_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Verify, then return (training state, trainable tensors by parameter name)."""
    path = Path(path)
    verify_checkpoint(path)
    tensors = load_file(str(path / "state.safetensors"))
    state = _unflatten(json.loads((path / "state.json").read_text()), tensors)
    trainable = load_file(str(path / "trainable.safetensors"))
    return state, trainable


def find_resume_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`; partial or corrupt ones are reported and skipped."""
    for step, path in sorted(_step_dirs(Path(root)), reverse=True):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as e:
            warnings.warn(f"skipping {e}")
    tmp = [p.name for p in Path(root).glob(".tmp-step-*")] if Path(root).is_dir() else []
    if tmp:
        warnings.warn(f"ignoring unfinished checkpoint writes in {root}: {', '.join(sorted(tmp))}")
    return None


# ---------------------------------------------------------------- RNG states
def capture_rng() -> dict:
    """Python, numpy, torch CPU and CUDA generator states, as checkpointable values."""
    import random

    import numpy as np

    np_state = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *map(_plain, np_state[2:])),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    import random

    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def _plain(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else x
