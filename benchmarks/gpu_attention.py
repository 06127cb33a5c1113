"""Packed attention kernels in the engine's real training step: calls per step, time, memory, loss.

    python benchmarks/gpu_attention.py                            # CUDA: Phi-3-mini's shape, random weights
    python benchmarks/gpu_attention.py --sliding-window 512       # a windowed model (documents longer than it)
    python benchmarks/gpu_attention.py --dry-run                  # a CPU smoke run: tiny shape, one step

Builds the model once (`shape:NAME`, random weights from the config: nothing downloaded) with LoRA
on every linear and the speed plan `engine.speed.resolve` makes for this device, then runs
`engine.training.step.train_step` on the same packed micro-batches (synthetic documents, several
per row, as benchmarks/throughput.py makes them) with each packed-attention kernel in turn:

    per_document   the core's reference: one SDPA per document   (speed.disable=[varlen_attention])
    nested_sdpa    SDPA on nested jagged tensors, one call per layer (the T4's kernel)
    flash_varlen   flash varlen over cu_seqlens, one call per layer (sm80+ in fp16 / bf16)
(a kernel the plan would not choose on this GPU is skipped). Per kernel: the loss of the first
micro-batch before any step (the kernels must agree to rounding), attention kernel calls in one
step (forward + backward, engine/speed/measure.py), the median step time over --steps after
--warmup, useful tokens/s and torch.cuda.max_memory_allocated. Writes
<out-dir>/gpu_attention_<tag>.{json,md}; scripts/gpu_check.sh calls it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput_inputs import RESULTS, _model_config, random_base_model, synthetic_docs  # noqa: E402

import torch  # noqa: E402

from engine import speed  # noqa: E402
from engine.config import OptimConfig, SpeedConfig  # noqa: E402
from engine.data import make_loader  # noqa: E402
from engine.layers.inject import inject_lora  # noqa: E402
from engine.layers.lora import mark_only_lora_trainable  # noqa: E402
from engine.model.build import enable_activation_checkpointing  # noqa: E402
from engine.speed import cuda_attention  # noqa: E402
from engine.speed.measure import AttentionCalls  # noqa: E402
from engine.train import trainable_parameters  # noqa: E402
from engine.training import amp  # noqa: E402
from engine.training.loss import causal_lm_loss  # noqa: E402
from engine.training.objective import CausalLM  # noqa: E402
from engine.training.optim import build_optimizer  # noqa: E402
from engine.training.step import to_device, train_step  # noqa: E402


def variants(plan, device: torch.device, precision: str) -> dict:
    """kernel name -> the plan with that packed-attention kernel (the ones this GPU can run)."""
    out = {"per_document": plan.off("varlen_attention")}
    capability = cuda_attention.cuda_capability(device)
    features = cuda_attention.torch_attention_features()
    chosen, _ = cuda_attention.choose_varlen_attention(capability, precision, features)
    if chosen and features.nested_sdpa:
        out["nested_sdpa"] = dataclasses.replace(plan, varlen_attention="nested_sdpa")
    if chosen == "flash_varlen":
        out["flash_varlen"] = dataclasses.replace(plan, varlen_attention="flash_varlen")
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shape:phi-3-mini", help="shape:NAME (random weights from its config)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="auto: bf16 on sm80+, fp16 on older GPUs, fp32 on a CPU")
    p.add_argument("--seq-len", type=int, default=4096, help="packed row length")
    p.add_argument("--micro-batch", type=int, default=2, help="rows per micro-batch")
    p.add_argument("--sliding-window", type=int, default=0, help="set the model's sliding window (0: its own)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing (a 16 GB GPU)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--tag", default=None)
    p.add_argument("--out-dir", default=None, help="default: benchmarks/results/gpu (dry run: /tmp/gpu_attention_dry_run)")
    p.add_argument("--dry-run", action="store_true", help="tiny shape on the CPU, one step: the script runs")
    args = p.parse_args(argv)
    if args.dry_run:
        args.model, args.device, args.seq_len, args.warmup, args.steps = "shape:tiny-phi3", "cpu", 256, 0, 1
    args.out_dir = args.out_dir or ("/tmp/gpu_attention_dry_run" if args.dry_run else os.path.join(RESULTS, "gpu"))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (use --dry-run for the CPU smoke run)")
    precision = args.precision
    if precision == "auto":
        capability = cuda_attention.cuda_capability(device)
        precision = "fp32" if capability is None else ("bf16" if capability[0] >= 8 else "fp16")

    config = _model_config(args.model)
    if args.sliding_window:
        config.sliding_window = args.sliding_window
    plan = speed.resolve(SpeedConfig(), device=device, precision=precision)
    speed.announce(plan)
    speed.prepare(plan)
    model = random_base_model(config, method="lora", device=device, dtype=amp.DTYPES[precision])
    inject_lora(model, "all-linear", args.r, 2.0 * args.r)
    mark_only_lora_trainable(model)
    if args.checkpointing:
        enable_activation_checkpointing(model)
    docs = synthetic_docs(config.vocab_size, args.seq_len)
    loader = make_loader(docs, max_seq_len=args.seq_len, micro_batch_size=args.micro_batch, packing=True, seed=0,
                         pad_token_id=0, pin_memory=device.type == "cuda")
    stream = iter(loader)
    batches = [next(stream) for _ in range(args.warmup + args.steps + 1)]  # the same ones for every kernel
    optimizer = build_optimizer(model, OptimConfig(lr=2e-4))
    scaler = amp.DynamicLossScaler(enabled=precision == "fp16")
    params = trainable_parameters(model)

    rows = []
    for name, variant in variants(plan, device, precision).items():
        kernels = speed.apply(variant, model)
        objective = CausalLM(1024, kernels)
        model.eval()  # the first batch's loss, before any step: the kernels agree to rounding
        with torch.no_grad(), amp.autocast(precision, device):
            first = to_device(batches[0], device)
            loss_sum, n = causal_lm_loss(model, first, chunk_size=1024, kernels=kernels)
            loss = float(loss_sum) / max(1, n)  # a sync: once per kernel, untimed
        model.train()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for i, batch in enumerate(batches[:-1]):
            sync(device)
            t0 = time.perf_counter()
            train_step(model, [batch], objective=objective, params=params, optimizer=optimizer, scheduler=None,
                       scaler=scaler, precision=precision, device=device, max_grad_norm=1.0)
            sync(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        with AttentionCalls() as calls:  # one more step, untimed: the dispatch mode slows every op
            train_step(model, [batches[-1]], objective=objective, params=params, optimizer=optimizer,
                       scheduler=None, scaler=scaler, precision=precision, device=device, max_grad_norm=1.0)
        step_s = statistics.median(times)
        useful = statistics.mean(b["num_tokens"] for b in batches[args.warmup:-1])
        row = {"kernel": name, "first_loss": loss, "calls_forward": calls.forward, "calls_backward": calls.backward,
               "ops": dict(calls.ops), "step_ms": 1e3 * step_s, "useful_tokens_per_s": useful / step_s,
               "max_memory_allocated_gib": (torch.cuda.max_memory_allocated(device) / 2**30
                                            if device.type == "cuda" else None),
               "documents_per_micro_batch": statistics.mean(len(r) for b in batches for r in b["packing"].doc_lengths)
               * args.micro_batch}
        rows.append(row)
        print(json.dumps(row), flush=True)

    machine = str(device)
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        machine = f"{torch.cuda.get_device_name(device)} (sm{cap[0]}{cap[1]})"
    tag = args.tag or f"{args.model.replace('shape:', '')}_{args.seq_len}x{args.micro_batch}_{precision}"
    meta = {"tag": tag, "date": datetime.date.today().isoformat(), "machine": machine, "torch": torch.__version__,
            "command": "python benchmarks/gpu_attention.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "model": args.model, "layers": config.num_hidden_layers, "seq_len": args.seq_len,
            "micro_batch": args.micro_batch, "precision": precision, "plan": plan.describe(),
            "sliding_window": getattr(config, "sliding_window", None), "checkpointing": args.checkpointing}
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"gpu_attention_{tag}")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    lines = [f"# Packed attention kernels in the training step ({tag})", "", f"Date: {meta['date']}  ",
             f"Command: `{meta['command']}`  ", f"Machine: {machine}; torch {meta['torch']}  ",
             f"Model `{args.model}` (random weights, {meta['layers']} layers, sliding window "
             f"{meta['sliding_window']}), LoRA r={args.r} on every linear, {precision}, micro-batch "
             f"{args.micro_batch} x {args.seq_len} tokens, checkpointing {args.checkpointing}; {meta['plan']}", "",
             "| kernel | documents / micro-batch | attention calls / step (fwd + bwd) | step ms | useful tok/s | "
             "max allocated GiB | first loss |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        mem = f"{r['max_memory_allocated_gib']:.2f}" if r["max_memory_allocated_gib"] is not None else "-"
        lines.append(f"| {r['kernel']} | {r['documents_per_micro_batch']:.1f} | {r['calls_forward']} + "
                     f"{r['calls_backward']} | {r['step_ms']:.1f} | {r['useful_tokens_per_s']:.0f} | {mem} | "
                     f"{r['first_loss']:.5f} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    losses = [r["first_loss"] for r in rows]
    return 0 if max(losses) - min(losses) <= 0.02 * abs(losses[0]) + 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
