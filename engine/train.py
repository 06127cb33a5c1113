"""`python -m engine.train +experiment=NAME`: the Hydra entry point and the training loop.

Setup lives in small helpers (`build_everything`: precision, speed plan, model, data, optimizer,
objective); `run_training` holds the loop and reads top to bottom: fetch the step's micro-batches,
run the one training step (engine/training/step.py), log, evaluate, checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import time
import warnings
from dataclasses import asdict
from contextlib import nullcontext
from pathlib import Path

import torch

from engine import speed
from engine.config import CONF_DIR, ConfigError, RunConfig, from_dict, register_configs
from engine.data import read_chat_template
from engine.export.adapter import save_adapter
from engine.model.build import build_model, enable_activation_checkpointing
from engine.model.tiling import resolve_tile_tokens, tile_mlps, tile_norms
from engine.model.isolation import packing_for, probe_batches
from engine.model.neftune import add_neftune
from engine.parallel.distributed import (DistContext, all_reduce_sum_ints, all_reduce_sum_tensor, barrier,
                                         full_tensor, gather_to_main, init_distributed, shutdown)
from engine.parallel.fsdp import (apply_fsdp, ensure_process_group, full_lora_weights, full_trainable_state,
                                  load_full_trainable_state)
from engine.plot import plot_run
from engine.tracking import MetricsLog, Trackers, open_trackers
from engine.training import amp, checkpoint, fp16_guard
from engine.training.early_stopping import BEST_DIR, EarlyStopping, write_atomically
from engine.training.objective import RunSetup, build_objective
from engine.training.optim import build_optimizer, build_scheduler
from engine.training.step import StepResult, train_step


# ---------------------------------------------------------------- small helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
        np.random.seed(seed)
    except ImportError:
        pass


def peak_memory_bytes(device: torch.device) -> int:
    """GPU: max_memory_allocated. CPU: the process's peak RSS (ru_maxrss is KiB on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# ---------------------------------------------------------------- setup
def build_everything(cfg: RunConfig, ctx: DistContext):
    """Model, tokenizer, data, loader, optimizer, schedule, scaler, objective, fp16 guard and the speed
    plan's StepKernels (its forward_backward goes to train_step): what the loop needs.
    The run's first lines say which precision and which speed plan it took, and why. The objective
    (engine/training/objective.py: build_objective) brings its own data, loader and loss."""
    device = ctx.device
    precision, why = amp.choose_precision(cfg.train.precision, device)
    plan = speed.resolve(cfg.speed, device=device, precision=precision, fsdp=cfg.train.fsdp,
                         offload_activations=cfg.train.offload_activations, objective=cfg.objective.name)
    if ctx.is_main:
        print(f"precision: {precision} ({why})", file=sys.stderr)
        speed.announce(plan)
    speed.prepare(plan)  # process settings first: the model's own memory comes from the retained heap
    seed_everything(cfg.train.seed)  # same seed on every rank: identical LoRA init everywhere
    model, tokenizer = build_model(cfg.model, cfg.peft, device=device, compute_dtype=amp.DTYPES[precision])
    if cfg.data.chat_template:  # replaces the tokenizer's template; saved with the adapter
        tokenizer.chat_template = read_chat_template(cfg.data.chat_template)
    if cfg.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    for key, tile in (("mlp_tile_tokens", tile_mlps), ("norm_tile_tokens", tile_norms)):
        if getattr(cfg.train, key):  # memory tricks, device-neutral: token-wise modules run over tiles
            tokens = resolve_tile_tokens(getattr(cfg.train, key), model.config.hidden_size, f"train.{key}")
            tiled = tile(model, tokens)
            if ctx.is_main:
                print(f"train.{key}: {tiled} modules run over tiles of <= {tokens} tokens", file=sys.stderr)
    kernels = speed.apply(plan, model)
    if cfg.speed.self_check:  # each switch against the reference on a small input; failures off
        plan, kernels = speed.self_check.check_and_apply(plan, model, precision=precision, announce=ctx.is_main)
    # fp16: what overflows runs in fp32 (measured first on the packing probe's rows, so that probe and
    # the held-out loss before training do not meet the overflow; on a real micro-batch before step 1)
    guard = fp16_guard.guard_for_run(cfg.train.fp16_guard, model, precision=precision, device=device, fsdp=ctx.fsdp)
    guard.install(probe_batches(model))
    # before sharding: the probe's forwards are local (the same on every rank)
    packing = packing_for(model, cfg.data.packing, precision=precision, announce=ctx.is_main)
    if ctx.fsdp:  # shard before the optimizer is built: it must hold the sharded parameters
        apply_fsdp(model, ctx)
    if cfg.train.neftune_alpha:  # noisy input embeddings in training forwards (after FSDP's own hooks)
        add_neftune(model, cfg.train.neftune_alpha)
    if ctx.enabled:  # LoRA init above is the same everywhere; dropout masks should differ per rank
        seed_everything(cfg.train.seed + ctx.rank)

    objective = build_objective(RunSetup(cfg, model, tokenizer, packing, ctx, precision, kernels,
                                         planner_terms=guard.planner_terms()))
    optimizer = build_optimizer(model, cfg.optim, loraplus_ratio=cfg.peft.loraplus_ratio)
    if cfg.optim.name != "adamw" and device.type == "cuda" and ctx.is_main:
        print(f"note: optim.name={cfg.optim.name}: bitsandbytes' optimizers wait for the GPU after every "
              "parameter's update; optim.name=adamw (fused) does not, and LoRA's Adam state rarely needs paging",
              file=sys.stderr)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    scaler = amp.DynamicLossScaler(enabled=precision == "fp16", device=device)
    return (model, tokenizer, objective.train_set, objective.eval_set, objective.loader, optimizer, scheduler, scaler,
            precision, objective, guard, kernels)


def save_state(cfg: RunConfig, step: int, model, tokenizer, optimizer, scheduler, scaler,
               resume_point: dict, counters: dict, ctx: DistContext) -> Path | None:
    """Collective: every rank calls it, rank 0 writes (and gets the path; the others None).

    Every rank's RNG state is gathered (dropout draws differ per rank). The loader state is
    rank 0's: it is the same on every rank (epoch, index into each rank's own share). Under FSDP
    the sharded LoRA weights and Adam moments are gathered to full tensors first."""
    rng_ranks = gather_to_main(resume_point["rng"], ctx)
    weights = nullcontext()
    if ctx.fsdp:
        trainable, optim_state = full_trainable_state(model, optimizer)
        if ctx.is_main:
            weights = full_lora_weights(model, trainable)  # save_adapter reads the full tensors
    else:
        trainable, optim_state = {n: p for n, p in trainable_parameters(model)}, optimizer.state_dict()
    if not ctx.is_main:
        return None
    state = {"optimizer": optim_state, "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "rng": resume_point["rng"], "loader": resume_point["loader"],
             "counters": counters, "step": step}
    if ctx.enabled:
        state["rng_ranks"] = rng_ranks
    with weights:
        return checkpoint.save_checkpoint(
            Path(cfg.output_dir) / "checkpoints", step, state=state, trainable=trainable,
            write_adapter=lambda d: save_adapter(model, d, cfg.peft, base_model_name_or_path=cfg.model.path,
                                                 chat_template=adapter_template(cfg, tokenizer)),
            keep_last=cfg.train.keep_last)


def adapter_template(cfg: RunConfig, tokenizer) -> str | None:
    """The chat template saved with the adapter: data.chat_template's, when the run replaced the tokenizer's."""
    return tokenizer.chat_template if cfg.data.chat_template else None


def save_best_adapter(cfg: RunConfig, model, tokenizer, optimizer, ctx: DistContext) -> None:
    """Collective: output_dir/adapter_best/ (atomic), the adapter as it is now, written by rank 0
    (under FSDP the LoRA weights are gathered to full tensors first, as for a checkpoint)."""
    weights = nullcontext()
    if ctx.fsdp:
        trainable, _ = full_trainable_state(model, optimizer)
        if ctx.is_main:
            weights = full_lora_weights(model, trainable)
    if ctx.is_main:
        with weights:
            write_atomically(Path(cfg.output_dir) / BEST_DIR,
                             lambda d: save_adapter(model, d, cfg.peft, base_model_name_or_path=cfg.model.path,
                                                    chat_template=adapter_template(cfg, tokenizer)))


def maybe_resume(cfg: RunConfig, model, optimizer, scheduler, scaler, objective, ctx: DistContext) -> tuple[int, dict]:
    """Restore the newest complete checkpoint (train.resume=auto) or the one named; else step 0.
    Every rank reads the checkpoint itself (output_dir must be shared by all nodes)."""
    if cfg.train.resume == "never":
        return 0, {}
    path = (checkpoint.find_resume_checkpoint(Path(cfg.output_dir) / "checkpoints")
            if cfg.train.resume == "auto" else Path(cfg.train.resume))
    if path is None:
        return 0, {}
    state, trainable = checkpoint.load_checkpoint(path)
    params = dict(trainable_parameters(model))
    if set(params) != set(trainable):
        raise checkpoint.CheckpointError(
            f"checkpoint {path} does not match this model's trainable parameters "
            f"(missing: {sorted(set(params) - set(trainable))[:3]}, unexpected: {sorted(set(trainable) - set(params))[:3]})")
    if ctx.fsdp:  # every rank keeps its shard of the full tensors
        load_full_trainable_state(model, optimizer, trainable, state["optimizer"])
    else:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(trainable[name])
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    objective.load_state_dict(state["loader"])  # checks world_size; the position is the same on every rank
    rng_ranks = state.get("rng_ranks", [state["rng"]])
    if len(rng_ranks) != ctx.world_size:
        raise checkpoint.CheckpointError(f"checkpoint {path} holds RNG states of {len(rng_ranks)} rank(s), "
                                         f"this run has {ctx.world_size}: resume with the same number of processes")
    checkpoint.restore_rng(rng_ranks[ctx.rank])
    print(f"resumed from {path} at step {state['step']}", file=sys.stderr)
    return int(state["step"]), dict(state["counters"])


# ---------------------------------------------------------------- the loop
def run_training(cfg: RunConfig, ctx: DistContext | None = None) -> dict:
    """Train per `cfg`; return the summary (also written to output_dir/summary.json).

    Without `ctx` it joins the process group torchrun describes itself, and leaves a group it
    made (here or for FSDP) before returning or raising: a gloo group still alive at interpreter
    exit can abort the process ("terminate called without an active exception", SIGABRT) after a
    complete run, its worker threads dropping tensors once Python is gone (pytorch #179291)."""
    import torch.distributed as dist

    if ctx is not None:
        return _train_logged(cfg, ctx)
    had_group = dist.is_available() and dist.is_initialized()
    ctx = init_distributed(cfg.train.device)
    try:
        return _train_logged(cfg, ctx)
    finally:
        if not had_group:
            shutdown(ctx)


def _train_logged(cfg: RunConfig, ctx: DistContext) -> dict:
    """The run inside its loggers (engine/tracking/): a logger that cannot work stops it here,
    before the model is built; each logger's run is closed with the outcome."""
    with open_trackers(cfg, is_main=ctx.is_main) as trackers:
        return _train(cfg, ctx, trackers)


def _train(cfg: RunConfig, ctx: DistContext, trackers: Trackers) -> dict:
    from tqdm import tqdm

    if cfg.train.fsdp:
        ctx = ensure_process_group(ctx)
    out = Path(cfg.output_dir)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_config(cfg, out / "config.yaml")
    (model, tokenizer, _, _, _, optimizer, scheduler, scaler,
     precision, objective, guard, kernels) = build_everything(cfg, ctx)
    device, tc = ctx.device, cfg.train
    params = trainable_parameters(model)
    start_step, counters = maybe_resume(cfg, model, optimizer, scheduler, scaler, objective, ctx)
    counters = {"tokens": 0, "loss_tokens": 0, "train_seconds": 0.0, "skipped_steps": 0,
                "eval_loss_before": None, "eval_before": None, **counters}
    metrics = MetricsLog(out / "metrics.jsonl", start_step, enabled=ctx.is_main, trackers=trackers)
    plotter = make_plotter(cfg, out, ctx)
    stopper = EarlyStopping(tc.early_stopping_patience, tc.early_stopping_metric, tc.early_stopping_mode,
                            tc.early_stopping_threshold)
    stopper.load_state_dict(counters.get("early_stopping"))
    # a stopping metric the objective's evaluation does not report: its generation scores (SFT: exact match, ...)
    generate_scores = (stopper.enabled and stopper.metric not in ("eval_loss", "eval_ppl")
                       and hasattr(objective, "generation_scores"))

    last_eval: dict = {}  # the latest evaluation (the summary's "after")
    evaluated: dict[int, float | None] = {}  # step -> held-out loss: an early stop's last step is evaluated once

    def evaluate(step: int) -> float | None:
        if step in evaluated:
            return evaluated[step]
        result = objective.evaluate(step)
        if result is None:
            return None
        last_eval.clear()
        last_eval.update(result)
        record = {"step": step, **{f"eval_{k}": v for k, v in result.items()}}
        if generate_scores and step > 0:  # the stopping metric is a generation score (exact match, ...)
            record.update({f"eval_{k}": v for k, v in objective.generation_scores().items()})
        metrics.write(record)
        if stopper.observe(step, record):  # the new best: adapter_best/ now, as the checkpoint would hold it
            save_best_adapter(cfg, model, tokenizer, optimizer, ctx)
        if stopper.enabled:
            counters["early_stopping"] = stopper.state_dict()
        evaluated[step] = result.get("loss")
        return evaluated[step]

    objective.before_training()
    batches = objective.batches(tc.grad_accum)
    resume_point = {"loader": objective.state_dict(), "rng": checkpoint.capture_rng()}
    if guard.enabled:  # fp16: the guard's probe on the first real micro-batch (widens its fp32 set if need be)
        line = guard.install(batches.peek()[:1])
        if ctx.is_main:
            print(f"precision: fp16 ({line})", file=sys.stderr)
    if start_step == 0 and counters["eval_loss_before"] is None:
        counters["eval_loss_before"] = evaluate(0)
        counters["eval_before"] = dict(last_eval) or None
    skipped_at_start = counters["skipped_steps"]
    bar = tqdm(total=tc.max_steps, initial=start_step, disable=not ctx.is_main, dynamic_ncols=True)
    step, last_loss, window = start_step, None, {"tokens": 0, "seconds": 0.0, "since": start_step}
    model.train()
    last_step = start_step if stopper.should_stop else tc.max_steps  # rerun after an early stop: nothing left
    with StopOnSignal() as stop:
        for step in range(start_step + 1, last_step + 1):
            t0 = time.perf_counter()
            # 1. The step: forward/backward over grad_accum micro-batches, each token loss divided
            #    by the step's global count of loss tokens, then unscale, clip, step, schedule
            #    (engine/training/step.py). Nothing here waits on the device: the GPU runs while
            #    the host prepares the next step's batches (and their copies) below.
            micro = batches.take()
            result = train_step(model, micro, objective=objective.loss, params=params, optimizer=optimizer,
                                scheduler=scheduler, scaler=scaler, precision=precision, device=device,
                                max_grad_norm=cfg.optim.max_grad_norm, ctx=ctx,
                                forward_backward_fn=kernels.forward_backward)
            guard.watch(step, micro, result.loss_sum)  # host bookkeeping: no device op
            resume_point = {"loader": objective.state_dict(), "rng": checkpoint.capture_rng()}
            if step < tc.max_steps:
                batches.prepare()

            # 2. Book-keeping, from host numbers. The Ctrl-C flag rides along so every rank stops
            #    (and checkpoints) at the same step.
            counts = objective.step_counts(micro, result.count)  # host ints: tokens, loss_tokens, ...
            stops, count, *sums = all_reduce_sum_ints([int(stop.requested), result.count, *counts.values()], ctx)
            stop_now = stops > 0
            counts = dict(zip(counts, sums))  # summed over ranks
            for key, value in counts.items():
                counters[key] = counters.get(key, 0) + value
            window["tokens"] += counts["tokens"]
            bar.update(1)
            log_now = step % tc.log_every == 0 or step == tc.max_steps or stop_now
            if log_now:
                # 3. The one place the device is waited on: the loss, the norm and the fp16 scaler's
                #    counters, read together on log steps. First the fp16 guard: a forward that
                #    overflowed since the last log step widens its fp32 set (it was no gradient overflow)
                healed = guard.at_log_step(scaler)
                if healed and ctx.is_main:
                    print(f"\nstep {step}: {healed}", file=sys.stderr)
                record = log_record(step, result, count, scaler, scheduler, ctx, precision=precision,
                                    since=window["since"], skipped_before=counters["skipped_steps"],
                                    max_skips=tc.max_consecutive_skips)
                last_loss = record["loss"]
                counters["skipped_steps"] = record["skipped_steps"]  # kept in the record: the loggers show it
            elapsed = time.perf_counter() - t0  # on log steps: the wait for the device included
            counters["train_seconds"] += elapsed
            window["seconds"] += elapsed
            if log_now:
                record.update(objective.log_metrics())
                record.update(tokens=counters["tokens"], peak_mem_gib=peak_memory_bytes(device) / 2**30,
                              tokens_per_s=window["tokens"] / max(window["seconds"], 1e-9))
                metrics.write(record)
                bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{record['lr']:.2e}",
                                tok_s=f"{record['tokens_per_s']:.0f}", mem=f"{record['peak_mem_gib']:.2f}G")
                window = {"tokens": 0, "seconds": 0.0, "since": step}
            if step == tc.max_steps:
                break
            if tc.eval_every and step % tc.eval_every == 0:
                evaluate(step)
                plotter()
                if stopper.should_stop:  # the same on every rank (evaluation results are global)
                    if ctx.is_main:
                        print(f"\n{stopper.message(step, out / BEST_DIR)}", file=sys.stderr)
                    break
            if (tc.save_every and step % tc.save_every == 0) or stop_now:
                path = save_state(cfg, step, model, tokenizer, optimizer, scheduler, scaler, resume_point, counters, ctx)
                barrier(ctx)
                if stop_now:
                    bar.close()
                    if ctx.is_main:
                        print(f"\ninterrupted at step {step}: checkpoint written to {path}; "
                              "rerun the same command to resume", file=sys.stderr)
                    raise Stopped(stop.signum or signal.SIGINT)
    bar.close()
    if kernels.forward_backward is not None and ctx.is_main:  # speed.cuda_graphs: captures, replays, eager
        print(kernels.forward_backward.describe(), file=sys.stderr)

    eval_loss_after = evaluate(step)  # step: max_steps, or where early stopping ended the run
    amp.refuse_untrained(step - start_step, counters["skipped_steps"] - skipped_at_start, eval_loss_after,
                         precision=precision)  # raises before the final checkpoint: the last good one stays
    path = save_state(cfg, step, model, tokenizer, optimizer, scheduler, scaler, resume_point, counters, ctx)
    if ctx.is_main:  # the final adapter is the last checkpoint's (already gathered under FSDP)
        shutil.copytree(path / "adapter", out / "adapter", dirs_exist_ok=True)
    summary = {
        "steps": step, "tokens": counters["tokens"], "loss_tokens": counters["loss_tokens"],
        "useful_tokens_per_s": counters["tokens"] / max(counters["train_seconds"], 1e-9),
        "final_train_loss": last_loss, "eval_loss_before": counters["eval_loss_before"],
        "eval_loss_after": eval_loss_after, "skipped_steps": counters["skipped_steps"],  # as of the last (log) step
        "peak_memory_gib": peak_memory_bytes(device) / 2**30, "train_seconds": counters["train_seconds"],
        "precision": precision, "world_size": ctx.world_size,
    }
    summary.update(objective.summary(counters["eval_before"], dict(last_eval) or None, counters))
    if stopper.enabled:
        summary.update(stopper.summary(stopped_at=step if step < tc.max_steps else None))
    if ctx.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        plotter()
        print_summary(summary, objective.summary_rows(summary))
        trackers.log_summary(summary, out)
    return summary


class Stopped(KeyboardInterrupt):
    """The run stopped on a signal after writing a checkpoint (or at once on a second signal).
    A KeyboardInterrupt, so Ctrl-C handling anywhere still applies; `signum` sets the exit code."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopOnSignal:
    """SIGINT (Ctrl-C) or SIGTERM (`kill`, `timeout`, a scheduler preempting the job) asks the loop
    to stop at the end of the current step, which then writes a checkpoint; a second signal stops
    at once, without one.

    Under torchrun one keypress can arrive twice: where the workers share the terminal's process
    group they get its SIGINT, and torchrun forwards the signal it got to each worker a moment
    later. A signal within DUPLICATE_S of the first is that copy, not a second request."""

    DUPLICATE_S = 1.0

    def __enter__(self):
        self.requested, self.signum, self._first_at = False, None, None
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave the signals as they are
                pass
        return self

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.requested:
            if now - self._first_at < self.DUPLICATE_S:
                return  # the same request, forwarded by torchrun
            raise Stopped(signum)
        self.requested, self.signum, self._first_at = True, signum, now
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{name}: stopping after this step (again to stop at once, without a checkpoint)", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():  # None: a handler not set from Python
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        return False


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became inf/NaN in bf16 / fp32 (where no step is skipped)."""


def log_record(step: int, result: StepResult, count: int, scaler: amp.DynamicLossScaler, scheduler,
               ctx: DistContext, *, precision: str, since: int, skipped_before: int, max_skips: int) -> dict:
    """A log step's record (loss and metrics per unit, lr, grad norm, fp16 scale and skipped steps):
    what the device holds, summed over ranks and read in one copy. The only sync of a run's steps.

    fp16: warns about steps skipped since the last log step (`since`; `skipped_before` of them had
    been skipped then) and stops with a diagnosis
    after `max_skips` in a row (noticed on the log step after they happen: the skipped steps in
    between change nothing but the scale). bf16 / fp32 skip nothing: a non-finite loss or norm
    stops the run here, saying in which steps it happened."""
    keys = sorted(result.metrics)
    sums = torch.stack([result.loss_sum.float()] + [result.metrics[k].float() for k in keys])
    values = torch.cat([all_reduce_sum_tensor(sums, ctx), full_tensor(result.grad_norm).float().reshape(1)])
    loss, *metric_sums, grad_norm = values.tolist()  # sync
    record = {"step": step, "loss": loss / count, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
              **{k: v / count for k, v in zip(keys, metric_sums)}, "loss_scale": 1.0, "skipped_steps": 0}
    if scaler.enabled:
        state = scaler.read()
        record.update(loss_scale=state["scale"], skipped_steps=state["skipped_steps"])
        check_overflow(step, since, state, max_skips, previously=skipped_before)
    elif not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise TrainingDiverged(
            f"step {step}: the {'loss' if not math.isfinite(loss) else 'gradient norm'} is "
            f"{loss if not math.isfinite(loss) else grad_norm} in {precision}, in one of steps {since + 1}..{step} "
            "(nothing is skipped in bf16/fp32). Try a lower optim.lr, optim.max_grad_norm > 0, or look for "
            "degenerate samples in the data (python -m engine.data FILE).")
    return record


def check_overflow(step: int, since: int, state: dict, max_skips: int, *, previously: int) -> None:
    """fp16, on a log step: warn about steps skipped since step `since`; after `max_skips` in a row,
    stop with a diagnosis naming the parameters whose gradients overflowed."""
    new = state["skipped_steps"] - previously
    if new > 0:
        warnings.warn(f"step {step}: inf/NaN gradients in {new} of steps {since + 1}..{step}, "
                      f"skipped; loss scale now {state['scale']:g}")
    if state["consecutive_skips"] >= max_skips:
        overflowed = state["overflowed"]
        raise amp.Fp16Overflow(
            f"{state['consecutive_skips']} steps in a row overflowed (loss scale now {state['scale']:g}). "
            f"Parameters with inf/NaN gradients: {', '.join(overflowed[:8])}{' ...' if len(overflowed) > 8 else ''}. "
            "Try train.precision=bf16 (if the GPU has it) or fp32, a lower optim.lr, or look for "
            "degenerate samples in the data (python -m engine.data FILE).")


# ---------------------------------------------------------------- output
def write_config(cfg: RunConfig, path: Path) -> None:
    from omegaconf import OmegaConf
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(asdict(cfg))))


def make_plotter(cfg: RunConfig, out: Path, ctx: DistContext):
    """A callable that redraws loss.png (a no-op without matplotlib or when plots are off)."""
    if not (cfg.train.plots and ctx.is_main):
        return lambda: None
    if importlib.util.find_spec("matplotlib") is None:
        print("plots are off: matplotlib is not installed (pip install 'engine[plot]')", file=sys.stderr)
        return lambda: None

    def redraw() -> None:  # a picture must never stop a training run
        try:
            plot_run(out)
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"could not draw {out / 'loss.png'}: {e}")
    return redraw


def fmt(x) -> str:
    return "-" if x is None else (f"{x:.4f}" if isinstance(x, float) else str(x))


def print_summary(summary: dict, rows: list[tuple]) -> None:
    """The before / after table: the held-out loss, then the objective's rows (metric, before, after)."""
    print("\n| metric | before | after |\n|---|---|---|")
    before, after = summary["eval_loss_before"], summary["eval_loss_after"]
    if before is not None or after is not None or not rows:  # GRPO has no held-out loss: its rows say reward
        print(f"| held-out loss | {fmt(before)} | {fmt(after)} |")
    for name, before, after in rows:
        print(f"| {name} | {fmt(before)} | {fmt(after)} |")
    print(f"\n{summary['steps']} steps, {summary['tokens']:,} tokens, "
          f"{summary['useful_tokens_per_s']:.0f} useful tokens/s, peak memory {summary['peak_memory_gib']:.2f} GiB, "
          f"train time {summary['train_seconds']:.0f} s")


# ---------------------------------------------------------------- entry point
def _hydra_main():
    import hydra
    from omegaconf import OmegaConf


    register_configs()

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR),
                config_name="config")
    def main(dcfg) -> None:
        try:
            cfg = from_dict(OmegaConf.to_container(dcfg, resolve=True)).validate()
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        ctx = init_distributed(cfg.train.device)
        code = 0
        try:
            run_training(cfg, ctx)
        except KeyboardInterrupt as e:  # Stopped: 130 after Ctrl-C, 143 after SIGTERM
            code = 128 + getattr(e, "signum", signal.SIGINT)
        except Exception as e:
            prefix = f"rank {ctx.rank}: " if ctx.enabled else ""
            print(f"error: {prefix}{type(e).__name__}: {e}", file=sys.stderr)
            if os.environ.get("ENGINE_TRACEBACK"):
                raise
            code = 1
        finally:
            shutdown(ctx)
        if ctx.enabled:
            exit_now(code)
        if code:
            sys.exit(code)

    main()


def exit_now(code: int) -> None:
    """End a torchrun worker without interpreter teardown, once every file is written and closed.
    A gloo worker sometimes aborts *after* a complete run and destroy_process_group: a gloo
    thread still alive at interpreter finalization drops a tensor, needs the GIL, is killed, and
    the process dies with "terminate called without an active exception" (SIGABRT), so torchrun
    reports a finished job as failed (seen in this repository's CI; pytorch #179291). os._exit
    skips finalization; stdout and stderr are flushed first."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _hydra_main()
