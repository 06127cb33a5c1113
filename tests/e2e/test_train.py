"""End-to-end training on a tiny random Llama: loss goes down, recorded losses, accumulation,
exact resume (checkpoint, Ctrl-C, SIGKILL during a checkpoint write), fp16 loss scaling."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import engine.evaluate
import engine.training.loss
import engine.training.objective
from engine import train as train_mod
from engine.training.objective import CausalLM
from engine.training.step import forward_backward
from engine.training.amp import Fp16Overflow
from engine.config import DataConfig, ModelConfig, OptimConfig, PeftConfig, RunConfig, TrainConfig
from tests.conftest import make_tiny_model_dir

WORDS = ("the quick brown fox jumps over lazy dog what is capital of france paris you are helpful "
         "assistant answer question in one sentence hello how today fine thank numbers").split()


def write_chat_data(path: Path, n: int, seed: int) -> Path:
    """n chats with prompts and answers of varied lengths (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for i in range(n):
            k_user, k_answer = (int(x) for x in torch.randint(2, 14, (2,), generator=g))
            user = " ".join(WORDS[int(j)] for j in torch.randint(0, len(WORDS), (k_user,), generator=g))
            # a learnable mapping: the answer repeats the user's words reversed
            answer = " ".join(reversed(user.split()))[: 4 * k_answer + 8]
            f.write(json.dumps({"messages": [{"role": "user", "content": user},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    model_dir = make_tiny_model_dir(root, "llama")
    train = write_chat_data(root / "train.jsonl", 48, seed=1)
    evalf = write_chat_data(root / "eval.jsonl", 8, seed=2)
    return root, model_dir, train, evalf


def make_cfg(workdir, out: str, *, peft: dict | None = None, train: dict | None = None,
             optim: dict | None = None, data: dict | None = None) -> RunConfig:
    root, model_dir, train_path, eval_path = workdir
    cfg = RunConfig(
        output_dir=str(root / out),
        model=ModelConfig(path=str(model_dir)),
        data=DataConfig(train_path=str(train_path), eval_path=str(eval_path), max_seq_len=64,
                        cache_dir=str(root / "cache")),
        peft=PeftConfig(r=4, alpha=8, targets="all-linear"),
        optim=OptimConfig(lr=1e-2, warmup_steps=2, schedule="cosine"),
        train=TrainConfig(max_steps=8, micro_batch_size=2, grad_accum=2, seed=0, precision="fp32", plots=False,
                          log_every=1),  # a record per step: the tests compare them step by step
    )
    for section, values in (("peft", peft), ("train", train), ("optim", optim), ("data", data)):
        if values:
            cfg = replace(cfg, **{section: replace(getattr(cfg, section), **values)})
    return cfg.validate()


def losses(run_dir) -> dict[int, float]:
    records = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def adapter_tensors(run_dir, sub="adapter"):
    return load_file(str(Path(run_dir) / sub / "adapter_model.safetensors"))


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# Recorded with this exact setup (tiny Llama seed 0, r=4, lr 1e-2, fp32 CPU). If the numerics of the
# layers, the loss, the data pipeline or the loop change, these change: update them deliberately.
RECORDED_LORA = {1: 6.480282, 2: 6.256689, 3: 6.131425}


def test_lora_run_lowers_loss_and_matches_recorded(workdir):
    cfg = make_cfg(workdir, "lora", train={"max_steps": 30})
    summary = train_mod.run_training(cfg)
    got = losses(cfg.output_dir)
    first, last = sum(got[s] for s in (1, 2, 3)) / 3, sum(got[s] for s in range(26, 31)) / 5
    assert last < 0.85 * first, got
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    out = Path(cfg.output_dir)
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "adapter/adapter_model.safetensors",
                 "adapter/adapter_config.json", "checkpoints/step-30/manifest.json"):
        assert (out / name).exists(), name
    for step, value in RECORDED_LORA.items():
        assert got[step] == pytest.approx(value, abs=1e-5), (step, got[step])


def test_qlora_run_lowers_loss(workdir):
    cfg = make_cfg(workdir, "qlora", peft={"method": "qlora", "quant_type": "nf4"}, train={"max_steps": 20})
    train_mod.run_training(cfg)
    got = losses(cfg.output_dir)
    first, last = sum(got[s] for s in (1, 2, 3)) / 3, sum(got[s] for s in range(16, 21)) / 5
    assert last < 0.9 * first, got


def test_accumulation_is_normalised_by_total_tokens(workdir):
    """micro-batch 8 x accumulation 1 == micro-batch 1 x accumulation 8 (documents of different lengths)."""
    from engine.data import load_dataset, make_loader
    from engine.model.build import build_model

    cfg = make_cfg(workdir, "unused", data={"packing": False})
    torch.manual_seed(0)
    model, tok = build_model(cfg.model, cfg.peft, "cpu", torch.float32)
    with torch.no_grad():  # non-zero B so every LoRA weight gets a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ds = load_dataset(cfg.data.train_path, tok, cfg.data)
    grads = []
    for mbs, accum in ((8, 1), (1, 8)):
        loader = make_loader(ds, max_seq_len=64, micro_batch_size=mbs, packing=False, seed=0,
                             pad_token_id=tok.pad_token_id, shuffle=False)
        it = loader.one_pass()
        micro = [next(it) for _ in range(accum)]
        lengths = {b["num_loss_tokens"] for b in micro}
        n = sum(b["num_loss_tokens"] for b in micro)
        model.zero_grad(set_to_none=True)
        loss, _ = forward_backward(model, micro, objective=CausalLM(16), count=n, scale=1.0, precision="fp32",
                                   device=torch.device("cpu"))
        grads.append((loss / n, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}))
    assert len(lengths) > 1, "documents of equal length would not test the normalisation"
    assert grads[0][0].item() == pytest.approx(grads[1][0].item(), abs=1e-6)
    for k in grads[0][1]:
        torch.testing.assert_close(grads[0][1][k], grads[1][1][k], atol=1e-6, rtol=1e-5)


def test_micro_batch_without_targets_adds_nothing(workdir):
    from engine.model.build import build_model

    cfg = make_cfg(workdir, "unused")
    torch.manual_seed(0)
    model, _ = build_model(cfg.model, cfg.peft, "cpu", torch.float32)
    batch = {"input_ids": torch.randint(0, 50, (1, 10)), "labels": torch.full((1, 10), -100),
             "position_ids": torch.arange(10)[None], "num_tokens": 10, "num_loss_tokens": 0}
    loss, _ = forward_backward(model, [batch], objective=CausalLM(4), count=5, scale=1.0, precision="fp32",
                               device=torch.device("cpu"))
    assert loss.item() == 0.0
    for n, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            assert torch.all(p.grad == 0) and torch.isfinite(p.grad).all(), n


def patch_loss(monkeypatch, fn) -> None:
    """Every caller of causal_lm_loss (the training objective, held-out evaluation) calls `fn`."""
    for module in (engine.training.objective, engine.evaluate):
        monkeypatch.setattr(module, "causal_lm_loss", fn)


def poison_loss(monkeypatch, call: int, factor: float) -> None:
    """The `call`-th causal_lm_loss of the run (evaluation's included) comes back times `factor`."""
    inner, calls = engine.training.loss.causal_lm_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, n = inner(*args, **kwargs)
        return (loss * factor if calls["n"] == call else loss), n

    patch_loss(monkeypatch, poisoned)


class CrashAt:
    """Wrap causal_lm_loss: on its Nth call, run `action` (raise, or send a signal)."""

    def __init__(self, n: int, action):
        self.n, self.calls, self.action = n, 0, action
        self.inner = engine.training.loss.causal_lm_loss

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.n:
            self.action()
        return self.inner(*args, **kwargs)


def _boom():
    raise RuntimeError("simulated crash")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16 on a CPU: compiled norms and loss (auto)
def test_resume_is_bit_exact(workdir, monkeypatch, precision):
    """Stopped at step 5 (mid-epoch, accumulation 2), resumed from the step-3 checkpoint."""
    train = {"max_steps": 8, "save_every": 3, "keep_last": 5, "precision": precision}
    full = make_cfg(workdir, f"full-{precision}", train=train)
    train_mod.run_training(full)

    cut = make_cfg(workdir, f"cut-{precision}", train=train)
    # micro-batch calls: 1 eval pass (4 batches of 2 rows? no: eval uses its own loader) -> count
    # only training calls by crashing late enough: step 5's first micro-batch.
    crash = CrashAt(n=10**9, action=_boom)
    patch_loss(monkeypatch, crash)
    eval_calls = _eval_calls(cut)
    crash.n = eval_calls + 2 * 4 + 1  # eval before, then 4 steps x 2 micro-batches, then step 5
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_mod.run_training(cut)
    patch_loss(monkeypatch, crash.inner)
    assert sorted(p.name for p in (Path(cut.output_dir) / "checkpoints").iterdir()) == ["step-3"]
    train_mod.run_training(cut)  # resume=auto

    assert losses(full.output_dir) == losses(cut.output_dir)
    assert_same_tensors(adapter_tensors(full.output_dir), adapter_tensors(cut.output_dir))
    a = load_file(str(Path(full.output_dir) / "checkpoints/step-8/state.safetensors"))
    b = load_file(str(Path(cut.output_dir) / "checkpoints/step-8/state.safetensors"))
    assert_same_tensors({k: v for k, v in a.items() if "optimizer" in k},
                        {k: v for k, v in b.items() if "optimizer" in k})


def _eval_calls(cfg) -> int:
    from engine.data import load_dataset, make_loader
    from engine.model.build import load_tokenizer

    tok = load_tokenizer(cfg.model.path)
    ds = load_dataset(cfg.data.eval_path, tok, cfg.data)
    loader = make_loader(ds, max_seq_len=cfg.data.max_seq_len, micro_batch_size=cfg.eval.batch_size,
                         packing=cfg.data.packing, seed=0, pad_token_id=tok.pad_token_id, shuffle=False)
    return sum(1 for _ in loader.one_pass())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_checkpoints_and_resumes_exactly(workdir, monkeypatch, sig):
    """Ctrl-C, or SIGTERM (`kill`, `timeout`, a scheduler preempting the job): the run finishes the
    step, checkpoints it, stops with the signal's number (exit code 128 + it), resumes exactly."""
    full = make_cfg(workdir, f"full_c{sig}", train={"max_steps": 6})
    train_mod.run_training(full)
    cut = make_cfg(workdir, f"cut_c{sig}", train={"max_steps": 6})
    crash = CrashAt(n=_eval_calls(cut) + 2 * 2 + 1, action=lambda: os.kill(os.getpid(), sig))
    patch_loss(monkeypatch, crash)
    with pytest.raises(train_mod.Stopped) as stopped:
        train_mod.run_training(cut)  # the signal during step 3 -> checkpoint at the end of step 3
    assert stopped.value.signum == sig
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handlers are put back
    patch_loss(monkeypatch, crash.inner)
    assert (Path(cut.output_dir) / "checkpoints/step-3/manifest.json").exists()
    train_mod.run_training(cut)
    assert losses(full.output_dir) == losses(cut.output_dir)
    assert_same_tensors(adapter_tensors(full.output_dir), adapter_tensors(cut.output_dir))


def test_ctrl_c_delivered_twice_at_once_still_checkpoints(workdir, monkeypatch):
    """Under torchrun a Ctrl-C reaches each worker twice within milliseconds (from the terminal and
    forwarded by torchrun): that is one press, so the run still stops at the end of the step with
    a checkpoint instead of aborting."""
    cfg = make_cfg(workdir, "twice_c", train={"max_steps": 6})

    def press_once_delivered_twice():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    crash = CrashAt(n=_eval_calls(cfg) + 2 * 2 + 1, action=press_once_delivered_twice)
    patch_loss(monkeypatch, crash)
    with pytest.raises(KeyboardInterrupt):
        train_mod.run_training(cfg)
    assert (Path(cfg.output_dir) / "checkpoints/step-3/manifest.json").exists()


def test_a_second_ctrl_c_after_the_duplicate_window_aborts(monkeypatch):
    import time

    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    with train_mod.StopOnSignal() as stop:
        stop._handle(signal.SIGINT, None)
        clock[0] += 0.05
        stop._handle(signal.SIGINT, None)  # torchrun's copy of the same press
        assert stop.requested
        clock[0] += train_mod.StopOnSignal.DUPLICATE_S
        with pytest.raises(train_mod.Stopped):
            stop._handle(signal.SIGINT, None)  # a real second press


KILL_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    import engine.training.checkpoint as ck
    from engine import train
    from engine.config import from_dict
    import json
    cfg = from_dict(json.loads({cfg!r})).validate()
    real, calls = ck.save_file, [0]
    def save_file(*a, **k):
        calls[0] += 1
        if calls[0] == 3:  # second checkpoint (2 files each), half written
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    ck.save_file = save_file
    train.run_training(cfg)
""")


def test_sigkill_during_checkpoint_write_resumes_from_previous(workdir):
    from dataclasses import asdict

    full = make_cfg(workdir, "full_k", train={"max_steps": 6, "save_every": 2, "keep_last": 5})
    train_mod.run_training(full)
    cut = make_cfg(workdir, "cut_k", train={"max_steps": 6, "save_every": 2, "keep_last": 5})
    repo = str(Path(__file__).resolve().parents[2])
    script = KILL_DURING_SAVE.format(repo=repo, cfg=json.dumps(asdict(cut)))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckdir = Path(cut.output_dir) / "checkpoints"
    assert (ckdir / ".tmp-step-4").exists() and not (ckdir / "step-4").exists()
    train_mod.run_training(cut)  # resumes from step-2, ignoring the half-written step 4
    assert losses(full.output_dir) == losses(cut.output_dir)
    assert_same_tensors(adapter_tensors(full.output_dir), adapter_tensors(cut.output_dir))


SIGTERM_THROUGH_CLI = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    import engine.training.objective
    from engine import train
    from tests.e2e.test_train import CrashAt
    engine.training.objective.causal_lm_loss = CrashAt({at}, lambda: os.kill(os.getpid(), signal.SIGTERM))
    sys.argv = ["engine.train", *{overrides!r}]
    train._hydra_main()
""")


def test_sigterm_through_the_command_line_checkpoints_and_exits_143(workdir):
    root, model_dir, train_path, _ = workdir
    out = root / "sigterm_cli"
    overrides = [f"model.path={model_dir}", f"data.train_path={train_path}", "data.eval_path=null",
                 "data.max_seq_len=64", f"data.cache_dir={root / 'cache'}", f"output_dir={out}", "peft.r=4",
                 "train.max_steps=6", "train.device=cpu", "train.plots=false", "hydra.run.dir=" + str(out / "hydra")]
    repo = str(Path(__file__).resolve().parents[2])
    script = SIGTERM_THROUGH_CLI.format(repo=repo, at=3, overrides=overrides)  # no eval set: step 3's loss call
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert "SIGTERM: stopping after this step" in proc.stderr
    assert (out / "checkpoints" / "step-3" / "manifest.json").exists()


@pytest.mark.parametrize("native,precision,expected", [(True, "auto", "bf16"), (True, "fp32", "fp32"),
                                                       (False, "auto", "fp32")])
def test_auto_precision_trains_in_bf16_on_a_bf16_cpu_and_says_so(workdir, monkeypatch, capsys, native, precision,
                                                                 expected):
    monkeypatch.setattr(train_mod.amp, "cpu_has_native_bf16", lambda: native)
    summary = train_mod.run_training(make_cfg(workdir, f"auto_{native}_{precision}",
                                              train={"max_steps": 3, "precision": precision}))
    assert summary["precision"] == expected
    first = capsys.readouterr().err.splitlines()
    assert first[0].startswith(f"precision: {expected} (")
    assert ("native bf16" in first[0]) == (precision == "auto")
    assert first[1].startswith("speed: ")


def test_fp16_on_cpu_trains_with_loss_scaling(workdir):
    cfg = make_cfg(workdir, "fp16", train={"max_steps": 12, "precision": "fp16"})
    summary = train_mod.run_training(cfg)
    records = [json.loads(x) for x in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert summary["precision"] == "fp16" and steps[0]["loss_scale"] == 2.0**16
    assert steps[-1]["loss"] < steps[0]["loss"]


def test_injected_inf_gradient_is_skipped(workdir, monkeypatch):
    cfg = make_cfg(workdir, "inf", train={"max_steps": 4, "precision": "fp16", "save_every": 1, "keep_last": 10})
    poison_loss(monkeypatch, _eval_calls(cfg) + 2 * 2 + 1, math.inf)  # first micro-batch of step 3
    with pytest.warns(UserWarning, match="step 3: inf/NaN gradients"):
        summary = train_mod.run_training(cfg)
    assert summary["skipped_steps"] == 1
    records = {r["step"]: r for r in map(json.loads, (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines())
               if "loss" in r}
    assert records[3]["loss_scale"] == records[2]["loss_scale"] / 2
    ck = Path(cfg.output_dir) / "checkpoints"
    # the skipped step changed neither the weights nor the optimizer state
    assert_same_tensors(load_file(str(ck / "step-2/trainable.safetensors")),
                        load_file(str(ck / "step-3/trainable.safetensors")))
    s2, s3 = (load_file(str(ck / f"step-{k}/state.safetensors")) for k in (2, 3))
    assert_same_tensors({k: v for k, v in s2.items() if "optimizer" in k},
                        {k: v for k, v in s3.items() if "optimizer" in k})


def test_repeated_overflow_stops_with_diagnosis(workdir, monkeypatch):
    cfg = make_cfg(workdir, "overflow", train={"max_steps": 10, "precision": "fp16", "max_consecutive_skips": 3})
    inner = engine.training.loss.causal_lm_loss
    patch_loss(monkeypatch, lambda *a, **k: (lambda r: (r[0] * math.inf, r[1]))(inner(*a, **k)))
    with pytest.raises(Fp16Overflow, match=r"3 steps in a row overflowed.*lora_[AB]"):
        with pytest.warns(UserWarning):
            train_mod.run_training(cfg)


def test_a_nan_loss_in_fp32_stops_at_the_next_log_step(workdir, monkeypatch):
    """bf16 / fp32 skip nothing and check nothing per step; the log step reads the loss and the
    norm anyway, and a non-finite one stops the run there, naming the steps it happened in."""
    cfg = make_cfg(workdir, "nan", train={"max_steps": 8, "log_every": 4})
    poison_loss(monkeypatch, _eval_calls(cfg) + 2 * 4 + 1, math.nan)  # first micro-batch of step 5
    with pytest.raises(train_mod.TrainingDiverged, match=r"step 8: the loss is nan in fp32, in one of steps 5\.\.8"):
        train_mod.run_training(cfg)


def test_run_training_leaves_the_process_group_it_made_and_keeps_one_it_was_given(workdir, monkeypatch, tmp_path):
    """A gloo group alive at interpreter exit can abort a finished run (SIGABRT in teardown): the
    group run_training joins itself is destroyed before it returns; a caller's group is left alone."""
    import torch.distributed as dist

    from engine.parallel.distributed import DistContext

    def one_rank_group(device="auto"):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        return DistContext()

    monkeypatch.setattr(train_mod, "init_distributed", one_rank_group)
    train_mod.run_training(make_cfg(workdir, "own_group", train={"max_steps": 3}))
    assert not dist.is_initialized()

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store2'}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(train_mod, "init_distributed", lambda device="auto": DistContext())
        train_mod.run_training(make_cfg(workdir, "given_group", train={"max_steps": 3}))
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
