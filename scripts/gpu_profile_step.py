"""Profile the engine's QLoRA training step on a shape: model (where does a step's time go?).

    python scripts/gpu_profile_step.py --model shape:phi-3-mini [--device cuda] [--seq-len 2048]

Times steps with each speed switch off in turn (same model, switches flipped in place), then one
torch.profiler step: the top operators by self CPU and by self device time. T4 mode on CUDA
(fp16 autocast, 14.7 GiB cap) as benchmarks/throughput.py --t4."""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import torch  # noqa: E402

from throughput import physical_cores  # noqa: E402
from throughput_inputs import _precision, _setup_torch, synthetic_docs  # noqa: E402
from throughput_runs import build_engine  # noqa: E402

from engine import speed  # noqa: E402
from engine.config import OptimConfig, SpeedConfig  # noqa: E402
from engine.data import make_loader  # noqa: E402
from engine.train import trainable_parameters  # noqa: E402
from engine.training import amp  # noqa: E402
from engine.training.objective import CausalLM  # noqa: E402
from engine.training.optim import build_optimizer  # noqa: E402
from engine.training.step import train_step  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--model", default="shape:phi-3-mini")
p.add_argument("--device", default="cuda")
p.add_argument("--seq-len", type=int, default=2048)
p.add_argument("--steps", type=int, default=2)
args = p.parse_args()
cuda = args.device.startswith("cuda")
spec = {"threads": physical_cores(), "device": args.device, "t4": cuda, "model": args.model, "method": "qlora",
        "r": 16, "alpha": 32.0, "targets": "all-linear",
        "engine": {"train": {"activation_checkpointing": True}, "speed": {}}}  # T4 mode on a GPU, as the benchmark
_, device = _setup_torch(spec)
precision = _precision(spec)
t0 = time.perf_counter()
model, _, _, kernels, _ = build_engine(spec, torch, device, precision)
print(f"built in {time.perf_counter() - t0:.1f} s", flush=True)
docs = synthetic_docs(model.config.vocab_size, args.seq_len)
loader = make_loader(docs, max_seq_len=args.seq_len, micro_batch_size=1, packing=True, seed=0, pad_token_id=0,
                     pin_memory=cuda)
batches = iter(loader)
optimizer = build_optimizer(model, OptimConfig(lr=2e-4))
scaler = amp.DynamicLossScaler(enabled=precision == "fp16", device=device)
params = trainable_parameters(model)
plan = speed.resolve(SpeedConfig(), device=device, precision=precision)
model.train()


def step(objective):
    train_step(model, [next(batches)], objective=objective, params=params, optimizer=optimizer, scheduler=None,
               scaler=scaler, precision=precision, device=device, max_grad_norm=1.0)
    if cuda:
        torch.cuda.synchronize()


def timed(label, chunk=1024, off=()):
    objective = CausalLM(chunk, speed.apply(plan.off(*off), model))
    step(objective)  # warm-up
    t = time.perf_counter()
    c = time.process_time()
    for _ in range(args.steps):
        step(objective)
    print(f"{label:<28} {(time.perf_counter() - t) / args.steps:.3f} s/step "
          f"(CPU {(time.process_time() - c) / args.steps:.3f} s)", flush=True)


timed("all switches on")
timed("packed_attention off", off=["packed_attention"])
timed("fused_lora off", off=["fused_lora"])
timed("chunked loss off", chunk=None)
objective = CausalLM(1024, speed.apply(plan, model))
from torch.profiler import ProfilerActivity, profile  # noqa: E402

acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
with profile(activities=acts) as prof:
    step(objective)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
if cuda:
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60))
