"""Data-parallel training in two CPU processes (gloo, launched with torch.distributed.run).

* 2 ranks at micro-batch 1 equal 1 rank at micro-batch 2: the same rows per step (checked on the
  loaders), the same losses and, within fp32 tolerance, the same adapter;
* a 2-rank run (with LoRA dropout, so each rank's RNG matters) killed mid-step and resumed from its
  checkpoint continues bit for bit like the uninterrupted 2-rank run;
* the same with train.fsdp=true (FSDP2 on gloo), against the plain 2-rank run;
* a rank that fails takes the job down, and the message names the rank;
* the loader state is the same on every rank, so rank 0's copy in the checkpoint restores each
  rank's own share; a 2-rank checkpoint refuses to resume in 1 process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from engine import train as train_mod
from tests.e2e.test_train import (_eval_calls, adapter_tensors, assert_same_tensors, losses, make_cfg,  # noqa: F401
                                  workdir)

REPO = Path(__file__).resolve().parents[2]

RUNNER = r'''
import json, os, sys, time
import engine.evaluate
import engine.training.objective
from engine import train
from tests.e2e.test_train import CrashAt, _boom


def patch_loss(fn):  # every caller of causal_lm_loss: the training objective, held-out evaluation
    engine.training.objective.causal_lm_loss = engine.evaluate.causal_lm_loss = fn

mode, arg = sys.argv[1], sys.argv[2]
rank = int(os.environ["RANK"])
if mode == "crash":  # every rank raises at its Nth loss call: a crash in the middle of a step
    patch_loss(CrashAt(int(sys.argv[3]), _boom))
if mode == "signal" and rank == 0:  # rank 0, at its Nth loss call, signals torchrun's process group
    def signal_torchrun(signum=int(sys.argv[4])):
        os.killpg(os.getpgid(os.getppid()), signum)  # as a terminal's Ctrl-C or a `kill` of the job does
        time.sleep(1.0)  # the step goes on while torchrun forwards the signal to the workers
    patch_loss(CrashAt(int(sys.argv[3]), signal_torchrun))
if mode == "fail_rank1":  # only rank 1 fails, through the real command-line entry point
    if rank == 1:
        def failing(*a, **k):
            raise RuntimeError("simulated failure")
        patch_loss(failing)
    sys.argv = [sys.argv[0], *sys.argv[2:]]
    train._hydra_main()
else:
    from engine.config import from_dict
    with open(arg) as f:
        cfg = from_dict(json.load(f)).validate()
    train.run_training(cfg)
    if mode == "run":  # a complete run ends as the engine's CLI ends it (exit_now: no gloo teardown abort)
        train.exit_now(0)
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp: Path, mode: str, *args: str, nproc: int = 2, timeout: int = 400) -> subprocess.CompletedProcess:
    """python -m torch.distributed.run --nproc_per_node=2 runner.py MODE ARGS (gloo, 1 thread each)."""
    script = tmp / "runner.py"
    script.write_text(RUNNER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    env.pop("ENGINE_TRACEBACK", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", "--monitor_interval=0.2", str(script), mode, *args]
    # its own session, like a terminal's foreground job: a test's Ctrl-C reaches torchrun, not pytest
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO,
                          start_new_session=True)


def run_two(cfg, *crash_at: int, signum: int | None = None) -> subprocess.CompletedProcess:
    """Train `cfg` in 2 processes; with crash_at=N every rank raises at its Nth loss call (with
    `signum`: rank 0 sends that signal to torchrun's process group there instead)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_file = out.parent / f"{out.name}.json"
    cfg_file.write_text(json.dumps(asdict(cfg)))
    if crash_at and signum is not None:
        return launch(out.parent, "signal", str(cfg_file), str(crash_at[0]), str(int(signum)))
    if crash_at:
        return launch(out.parent, "crash", str(cfg_file), str(crash_at[0]))
    proc = launch(out.parent, "run", str(cfg_file))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# 2 ranks x micro-batch 1 x accumulation 2 == 1 rank x micro-batch 2 x accumulation 2: 4 rows a step
DP = {"max_steps": 6, "micro_batch_size": 1, "grad_accum": 2, "save_every": 2, "keep_last": 5}


@pytest.fixture(scope="module")
def two_rank_run(workdir):
    """The uninterrupted 2-rank reference run (no dropout)."""
    cfg = make_cfg(workdir, "dp2", train=DP)
    run_two(cfg)
    return cfg


# ---------------------------------------------------------------- rows per step
def _loader(cfg, rank: int, world_size: int, micro_batch_size: int):
    from engine.data import load_dataset, make_loader
    from engine.model.build import load_tokenizer

    tok = load_tokenizer(cfg.model.path)
    ds = load_dataset(cfg.data.train_path, tok, cfg.data)
    return make_loader(ds, max_seq_len=cfg.data.max_seq_len, micro_batch_size=micro_batch_size, packing=True,
                       seed=cfg.train.seed, pad_token_id=tok.pad_token_id, rank=rank, world_size=world_size)


def _row_set(batches, pad_id: int) -> Counter:
    """The rows of `batches` as (input_ids, labels) tuples without the trailing padding (a row is
    padded to the longest row of its micro-batch, which differs between the two layouts)."""
    rows = Counter()
    for b in batches:
        for ids, labels in zip(b["input_ids"].tolist(), b["labels"].tolist()):
            while ids and ids[-1] == pad_id and labels[-1] == -100:
                ids, labels = ids[:-1], labels[:-1]
            rows[(tuple(ids), tuple(labels))] += 1
    return rows


def test_rank_shares_make_the_same_global_batches_as_one_rank(workdir):
    """Rank r takes global batches r, r+W, ...: with W=2 at micro-batch b and accumulation k, step
    s sees global batches [2ks, 2k(s+1)) of b rows = the rows of 1 rank at micro-batch 2b, step s."""
    cfg = make_cfg(workdir, "unused")
    pad = _loader(cfg, 0, 1, 1).pad_token_id
    ranks = [iter(_loader(cfg, r, 2, 1)) for r in range(2)]
    single = iter(_loader(cfg, 0, 1, 2))
    assert len(_loader(cfg, 0, 2, 1)) >= DP["max_steps"] * DP["grad_accum"], "the comparison must stay in epoch 0"
    for step in range(DP["max_steps"]):
        two = [next(it) for it in ranks for _ in range(DP["grad_accum"])]
        one = [next(single) for _ in range(DP["grad_accum"])]
        assert _row_set(two, pad) == _row_set(one, pad), step
        assert sum(b["num_loss_tokens"] for b in two) == sum(b["num_loss_tokens"] for b in one)


def test_loader_state_is_rank_independent(workdir):
    """After k batches every rank's state_dict is the same, and rank 0's restores rank 1's position."""
    cfg = make_cfg(workdir, "unused")
    r0, r1 = _loader(cfg, 0, 2, 1), _loader(cfg, 1, 2, 1)
    it0, it1 = iter(r0), iter(r1)
    for _ in range(21):  # past the end of epoch 0 (17 batches per rank)
        next(it0), next(it1)
    assert r0.state_dict() == r1.state_dict()
    fresh = _loader(cfg, 1, 2, 1)
    fresh.load_state_dict(r0.state_dict())
    a, b = next(iter(fresh)), next(it1)
    assert torch.equal(a["input_ids"], b["input_ids"]) and a["num_loss_tokens"] == b["num_loss_tokens"]


# ---------------------------------------------------------------- two processes
@pytest.mark.slow
def test_two_ranks_equal_one_rank_at_twice_the_micro_batch(workdir, two_rank_run):
    one = make_cfg(workdir, "dp1", train={**DP, "micro_batch_size": 2})
    summary = train_mod.run_training(one)
    two_summary = json.loads((Path(two_rank_run.output_dir) / "summary.json").read_text())
    assert two_summary["world_size"] == 2 and summary["world_size"] == 1
    assert two_summary["tokens"] == summary["tokens"] and two_summary["loss_tokens"] == summary["loss_tokens"]
    assert two_summary["eval_loss_before"] == pytest.approx(summary["eval_loss_before"], abs=1e-6)
    got, want = losses(two_rank_run.output_dir), losses(one.output_dir)
    assert got.keys() == want.keys() == set(range(1, 7))
    for step in got:
        assert got[step] == pytest.approx(want[step], abs=2e-5), (step, got[step], want[step])
    a, b = adapter_tensors(two_rank_run.output_dir), adapter_tensors(one.output_dir)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"max |adapter(2 ranks) - adapter(1 rank)| = {worst:.2e}")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4)
    # only rank 0 wrote: one metrics record per step (plus evals), one adapter, complete checkpoints
    records = (Path(two_rank_run.output_dir) / "metrics.jsonl").read_text().splitlines()
    assert len([r for r in records if '"loss"' in r]) == 6
    ckpts = sorted(p.name for p in (Path(two_rank_run.output_dir) / "checkpoints").iterdir())
    assert ckpts == ["step-2", "step-4", "step-6"]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_under_torchrun_checkpoints_every_rank_and_resumes_identically(workdir, two_rank_run,
                                                                                         signum):
    """Ctrl-C in the terminal running torchrun (SIGINT), or SIGTERM to the job: torchrun forwards
    the signal to each worker (torch 2.13 starts them in their own sessions; where they share the
    terminal's group they also get its copy, which StopOnSignal takes as the same request). All
    ranks stop at the end of the same step, write its checkpoint, and the resumed run is the
    uninterrupted one."""
    cut = make_cfg(workdir, f"dp2_signal{int(signum)}", train=DP)
    at = _eval_calls(cut) + DP["grad_accum"] * 2 + 1  # rank 0's first micro-batch of step 3
    proc = run_two(cut, at, signum=signum)
    assert proc.returncode != 0
    assert "interrupted at step 3: checkpoint written to" in proc.stderr, proc.stderr[-3000:]
    ck = Path(cut.output_dir) / "checkpoints"
    assert (ck / "step-3" / "manifest.json").exists()
    assert not (ck / "step-4").exists()
    run_two(cut)  # resume=auto on both ranks
    assert losses(two_rank_run.output_dir) == losses(cut.output_dir)


@pytest.mark.slow
def test_two_rank_resume_continues_identically(workdir):
    """With LoRA dropout (each rank draws its own masks, so each rank's RNG state must come back)."""
    peft = {"dropout": 0.1}
    full = make_cfg(workdir, "dp2_drop_full", peft=peft, train=DP)
    run_two(full)
    cut = make_cfg(workdir, "dp2_drop_cut", peft=peft, train=DP)
    crash = _eval_calls(cut) + DP["grad_accum"] * 4 + 1  # first micro-batch of step 5
    proc = run_two(cut, crash)
    assert proc.returncode != 0 and "simulated crash" in proc.stderr
    ck = Path(cut.output_dir) / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["step-2", "step-4"]
    state = json.loads((ck / "step-4" / "state.json").read_text())
    assert "rng_ranks" in json.dumps(state)  # both ranks' RNG states were gathered
    run_two(cut)  # resume=auto on both ranks
    assert losses(full.output_dir) == losses(cut.output_dir)
    assert_same_tensors(adapter_tensors(full.output_dir), adapter_tensors(cut.output_dir))


@pytest.mark.slow
def test_two_rank_checkpoint_refuses_one_process(workdir, two_rank_run):
    cfg = make_cfg(workdir, "dp2_as_1", train={**DP, "resume": str(Path(two_rank_run.output_dir) / "checkpoints/step-4")})
    with pytest.raises(ValueError, match=r"loader state key 'world_size': checkpoint has 2, this loader has 1"):
        train_mod.run_training(cfg)


@pytest.mark.slow
def test_fsdp_two_ranks_crash_resume_matches_plain_data_parallel(workdir, two_rank_run):
    """train.fsdp=true (FSDP2 over gloo): killed in step 5, resumed from the step-4 checkpoint
    (gathered LoRA weights and Adam moments, scattered back on resume); ends where the plain
    2-rank run ends, within fp32 tolerance (gradients are reduced per micro-batch, not per step)."""
    cfg = make_cfg(workdir, "fsdp2", train={**DP, "fsdp": True})
    proc = run_two(cfg, _eval_calls(cfg) + DP["grad_accum"] * 4 + 1)
    assert proc.returncode != 0 and "simulated crash" in proc.stderr
    assert (Path(cfg.output_dir) / "checkpoints/step-4/manifest.json").exists()
    run_two(cfg)
    got, want = losses(cfg.output_dir), losses(two_rank_run.output_dir)
    assert got.keys() == want.keys()
    for step in got:
        assert got[step] == pytest.approx(want[step], abs=2e-5), (step, got[step], want[step])
    a, b = adapter_tensors(cfg.output_dir), adapter_tensors(two_rank_run.output_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4)


@pytest.mark.slow
def test_failing_rank_takes_the_job_down_and_is_named(workdir):
    root, model_dir, train_path, _ = workdir
    overrides = [f"model.path={model_dir}", f"data.train_path={train_path}", "data.eval_path=null",
                 "data.max_seq_len=64", f"data.cache_dir={root / 'cache'}", f"output_dir={root / 'fail'}",
                 "peft.r=4", "train.max_steps=3", "train.device=cpu", "train.plots=false"]
    t0 = time.perf_counter()
    proc = launch(root, "fail_rank1", *overrides)
    elapsed = time.perf_counter() - t0
    assert proc.returncode != 0
    assert "error: rank 1: RuntimeError: simulated failure" in proc.stderr, proc.stderr[-3000:]
    assert elapsed < 120, f"the job took {elapsed:.0f} s to go down"
    assert not (root / "fail" / "adapter").exists()
