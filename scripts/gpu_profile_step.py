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

import torch  # noqa: E402

from benchmarks.throughput import (_model_config, _precision, _setup_torch, engine_step, physical_cores,  # noqa: E402
                                   random_base_model, synthetic_docs)
from engine import amp  # noqa: E402
from engine.config import OptimConfig, TrainConfig  # noqa: E402
from engine.data import make_loader  # noqa: E402
from engine.layers.lora import mark_only_lora_trainable  # noqa: E402
from engine.layers.inject import inject_lora
from engine.model.build import apply_speed_switches, enable_activation_checkpointing  # noqa: E402
from engine.training.optim import build_optimizer  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--model", default="shape:phi-3-mini")
p.add_argument("--device", default="cuda")
p.add_argument("--seq-len", type=int, default=2048)
p.add_argument("--steps", type=int, default=2)
args = p.parse_args()
cuda = args.device.startswith("cuda")
spec = {"threads": physical_cores(), "device": args.device, "t4": cuda}  # T4 mode on a GPU, as the benchmark
_, device = _setup_torch(spec)
precision = _precision(spec)
dtype = amp.DTYPES[precision]
torch.manual_seed(0)
config = _model_config(args.model)
t0 = time.perf_counter()
model = random_base_model(config, method="qlora", device=device, dtype=dtype)
inject_lora(model, "all-linear", 16, 32.0)
mark_only_lora_trainable(model)
enable_activation_checkpointing(model)
print(f"built in {time.perf_counter() - t0:.1f} s", flush=True)
docs = synthetic_docs(config.vocab_size, args.seq_len)
loader = make_loader(docs, max_seq_len=args.seq_len, micro_batch_size=1, packing=True, seed=0, pad_token_id=0)
batches = iter(loader)
optimizer = build_optimizer(model, OptimConfig(lr=2e-4))
scaler = amp.DynamicLossScaler(enabled=precision == "fp16")
model.train()


def step(chunk):
    engine_step(model, [next(batches)], optimizer, scaler, precision=precision, device=device, chunk_size=chunk)
    if cuda:
        torch.cuda.synchronize()


def timed(label, chunk=1024, **switches):
    apply_speed_switches(model, TrainConfig(**switches))
    step(chunk)  # warm-up
    t = time.perf_counter()
    c = time.process_time()
    for _ in range(args.steps):
        step(chunk)
    print(f"{label:<28} {(time.perf_counter() - t) / args.steps:.3f} s/step "
          f"(CPU {(time.process_time() - c) / args.steps:.3f} s)", flush=True)


timed("all switches on")
timed("packed_attention off", packed_attention=False)
timed("fused_lora off", fused_lora=False)
timed("chunked loss off", chunk=None)
apply_speed_switches(model, TrainConfig())
from torch.profiler import ProfilerActivity, profile  # noqa: E402

acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
with profile(activities=acts) as prof:
    step(1024)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
if cuda:
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60))
