"""Training steps never wait on the device between log steps.

On a GPU every op below forces a device-to-host synchronisation: the host stops queueing work until
the GPU has caught up, and a fast GPU idles while Python prepares the next kernels. On this CPU
nothing waits, but the same ops run, so a dispatch mode (aten level) plus a function mode (Python
level: `.item()`, `.tolist()`, `bool(t)`, `.cpu()`, ...) can find every one of them.

How "between log steps" is measured: two whole runs (`engine.train.run_training`, the real loop)
that differ only in their number of steps, logging only at their last step: 2 steps and 7. Set-up,
the final log, evaluation and the checkpoint are the same in both, so whatever the longer run does
more is what 5 plain steps do. It must be nothing. Host-side data preparation (engine/data/: the
loader turns token lists into tensors on the host, where a GPU is never involved) is exempt.
What this CPU cannot tell: a `.to(device)` whose source is on the GPU from one that moves a host
batch (here both are CPU to CPU). The GPU check runs the same steps under
`torch.cuda.set_sync_debug_mode("error")`, which sees those too.
"""

from __future__ import annotations

import collections
import json
import math
import os
import traceback
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import engine.training.objective
from engine import train as train_mod
from engine.config import PeftConfig
from tests.conftest import counting_run_config, make_tiny_model_dir

aten = torch.ops.aten
SYNCING_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.is_nonzero.default,
               aten.masked_select.default, aten.equal.default, aten.allclose.default}
# Python-level reads of a tensor's values: on a GPU each is a device-to-host copy that waits
HOST_READS = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.item, torch.Tensor.__bool__,
              torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.cpu}


# the engine package's own folder: a checkout may itself sit in a folder named engine (CI's fresh clone)
# (as imported, not resolved: frames carry the path their module was imported from)
ENGINE_DIR = os.path.dirname(os.path.dirname(engine.training.objective.__file__)) + "/"


def _host_side() -> bool:
    """Host-side data preparation: engine/data/, and a GRPO rollout (generate, decode, score, pack:
    `GRPO._fetch`, which reads its completions back by design, once per rollout)."""
    return any(frame.filename.startswith(ENGINE_DIR + "data/")
               or (frame.filename == ENGINE_DIR + "grpo/plugin.py" and frame.name == "_fetch")
               for frame in traceback.extract_stack())


def _where() -> str:
    frames = [f for f in traceback.extract_stack()
              if f.filename.startswith(ENGINE_DIR) or "site-packages" in f.filename]
    return " <- ".join(f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno}"
                       for f in reversed(frames[-5:]))


def _bool_index(func, args) -> bool:
    """aten.index / index_put with a boolean mask: a hidden nonzero (the output size needs the count)."""
    if func not in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()))


class SyncRecorder:
    """Counts every syncing op, by op and call site, while active."""

    def __init__(self):
        self.seen: collections.Counter = collections.Counter()
        recorder = self

        class Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if (func in SYNCING_OPS or _bool_index(func, args)) and not _host_side():
                    recorder.seen[(str(func), _where())] += 1
                return func(*args, **(kwargs or {}))

        class Function(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func in HOST_READS and not _host_side():
                    recorder.seen[(getattr(func, "__name__", str(func)), _where())] += 1
                return func(*args, **kwargs)

        self._modes = (Function(), Dispatch())

    def __enter__(self):
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("sync"), "llama")


def _run(root: Path, model_dir, *, steps: int, precision: str, method: str, packing: bool = True,
         recorder=SyncRecorder, neftune_alpha: float = 0.0) -> collections.Counter:
    root.mkdir(parents=True, exist_ok=True)
    peft = PeftConfig(method=method, r=4, alpha=8, targets="all-linear", dropout=0.1)
    cfg = counting_run_config(root, model_dir, peft, max_steps=steps)
    cfg = replace(cfg, train=replace(cfg.train, precision=precision, log_every=1000, grad_accum=2,
                                     neftune_alpha=neftune_alpha),
                  data=replace(cfg.data, packing=packing))
    with recorder() as seen:
        train_mod.run_training(cfg)
    return seen.seen


def _extra_syncs(tmp_path, model_dir, **run) -> collections.Counter:
    short = _run(tmp_path / "short", model_dir, steps=2, **run)
    long = _run(tmp_path / "long", model_dir, steps=7, **run)
    return long - short


class CudaSyncWarnings:
    """On a GPU: every synchronising CUDA call (torch.cuda.set_sync_debug_mode("warn") warns on
    each, stream synchronisations inside copies and kernels included), by Python call site."""

    def __enter__(self):
        self.seen = collections.Counter()
        self._catch = warnings.catch_warnings(record=True)
        self._caught = self._catch.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(0)
        self._catch.__exit__(*exc)
        for w in self._caught:
            if "synchroniz" in str(w.message):
                self.seen[(str(w.message).splitlines()[0], f"{w.filename}:{w.lineno}")] += 1


@pytest.mark.parametrize("method,precision,packing", [
    ("lora", "fp32", True), ("lora", "fp16", True), ("qlora", "fp32", True), ("qlora", "fp16", True),
    ("lora", "bf16", True), ("lora", "fp32", False)])
def test_no_syncing_op_between_log_steps(tmp_path, model_dir, method, precision, packing):
    extra = _extra_syncs(tmp_path, model_dir, precision=precision, method=method, packing=packing)
    assert not extra, "ops that wait on the device, per 5 steps: " + "; ".join(f"{n}x {k}" for k, n in extra.items())


@pytest.mark.parametrize("precision,method,loss_type,beta,iterations", [
    ("fp32", "lora", "dapo", 0.04, 2), ("fp32", "lora", "grpo", 0.0, 1), ("fp16", "qlora", "dr_grpo", 0.04, 2)])
def test_grpo_training_steps_never_sync(tmp_path, model_dir, precision, method, loss_type, beta, iterations):
    """GRPO through the real loop: besides its rollouts (host work, exempt above), the 4 more steps
    of the longer run (3 and 7 steps: both end inside a re-used rollout, so their final
    checkpoints hold the same tensors) wait on nothing: the GRPO loss, its metrics (kl, clip ratios) and the
    re-used rollout's old / reference log-probs stay on the device."""
    from tests.grpo.conftest import grpo_config

    def run(root, steps):
        peft = PeftConfig(method=method, r=4, alpha=8, dropout=0.1)
        cfg = grpo_config(root, model_dir, peft=peft, max_steps=steps, loss_type=loss_type, beta=beta,
                          num_iterations=iterations)
        cfg = replace(cfg, train=replace(cfg.train, precision=precision, log_every=1000, save_every=0))
        with SyncRecorder() as seen:
            train_mod.run_training(cfg)
        return seen.seen

    short = run(tmp_path / "short", 3)  # first: what a process does once (a RoPE probe, 4-bit set-up) lands here
    extra = run(tmp_path / "long", 7) - short
    assert not extra, "ops that wait on the device, per 4 GRPO steps: " + "; ".join(f"{n}x {k}" for k, n in extra.items())


@pytest.mark.parametrize("packing", [True, False])
def test_neftune_adds_no_syncing_op(tmp_path, model_dir, packing):
    """NEFTune's per-document scale comes from the packing context's cu_seqlens on the device."""
    extra = _extra_syncs(tmp_path, model_dir, precision="fp32", method="lora", packing=packing, neftune_alpha=5.0)
    assert not extra, "ops that wait on the device, per 5 steps: " + "; ".join(f"{n}x {k}" for k, n in extra.items())


def test_fp16_skip_of_an_injected_inf_stays_on_the_device(tmp_path, model_dir, monkeypatch, capsys):
    """A step whose gradients overflow is skipped without the host looking: the skip is decided on
    the device (fused AdamW's found_inf) and read, with the scale, on the log step. The inf is in
    the loss, so the fp16 guard re-probes that step's batch on the log step (its reads are the log
    step's, engine/training/fp16_guard.py) and finds the decoder finite: the scaler's business."""
    inner = engine.training.objective.causal_lm_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):  # the 9th micro-batch: step 5 of the long run (2 per step)
        calls["n"] += 1
        loss, n = inner(*args, **kwargs)
        return (loss * math.inf if calls["n"] == 9 else loss), n

    monkeypatch.setattr(engine.training.objective, "causal_lm_loss", poisoned)
    short = _run(tmp_path / "short", model_dir, steps=2, precision="fp16", method="lora")
    calls["n"] = 0
    with pytest.warns(UserWarning, match=r"step 7: inf/NaN gradients in 1 of steps 1\.\.7, skipped; loss scale now 32768"):
        long = _run(tmp_path / "long", model_dir, steps=7, precision="fp16", method="lora")
    extra = long - short
    # the guard reads nothing per step (it keeps each step's loss tensor); all it reads, it reads
    # at start or in `at_log_step`, the re-probe of the overflowed step on the log step
    extra = collections.Counter({k: n for k, n in extra.items() if "training/fp16_guard.py" not in k[1]})
    assert not extra, "ops that wait on the device: " + "; ".join(f"{n}x {k}" for k, n in extra.items())
    assert "step 7: fp16_guard: the loss overflowed in 5 (skipped)" in capsys.readouterr().err
    summary = json.loads((tmp_path / "long" / "run" / "summary.json").read_text())
    assert summary["skipped_steps"] == 1


def test_the_recorder_sees_what_it_must(model_dir):
    """The test above can fail: each kind of sync it looks for is seen when it happens."""
    t = torch.arange(6.0)
    with SyncRecorder() as recorder:
        t.sum().item()
        bool(t.max() > 3)
        t.nonzero()
        t[t > 2]
        t.tolist()
        t.cpu()
        t.masked_select(t > 1)
    kinds = {name.split(".")[1] if name.startswith("aten.") else name for name, _ in recorder.seen}
    assert {"_local_scalar_dense", "nonzero", "index", "tolist", "cpu", "masked_select", "item", "__bool__"} <= kinds


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method,precision,neftune_alpha", [("lora", "fp16", 0.0), ("qlora", "fp16", 0.0),
                                                           ("lora", "bf16", 0.0), ("qlora", "bf16", 0.0),
                                                           ("lora", "bf16", 5.0)])
def test_no_synchronising_cuda_call_between_log_steps(tmp_path, model_dir, method, precision, neftune_alpha):
    """The same two runs on the GPU, under CUDA's sync debug mode (which also sees copies that wait)."""
    if precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has no bf16")
    extra = _extra_syncs(tmp_path, model_dir, precision=precision, method=method, recorder=CudaSyncWarnings,
                         neftune_alpha=neftune_alpha)
    assert not extra, "synchronising CUDA calls, per 5 steps: " + "; ".join(f"{n}x {k}" for k, n in extra.items())
