"""What each memory technique buys: chunked loss, activation checkpointing, activation offload.

    python benchmarks/memory_techniques.py [--seq-len 2048] [--out-dir benchmarks/results]

Every row is one training step (engine.training.step.forward_backward of the SFT objective, LoRA r=16 on
all linears, fp32, CPU) of a random model, run in a fresh subprocess and measured two ways:
  - peak RSS growth: the process's peak resident memory (ru_maxrss) minus its resident memory
    just before the step (model built, batch made); includes allocator effects;
  - torch peak live bytes: the peak of tensor storages created during the step and still alive
    (engine.plan.LiveBytes, a TorchDispatchMode; parameters and inputs excluded).
Rows:
  chunked loss vs full logits: hidden 256, 2 layers, vocab 128,256 (Llama-3's), one row of
    --seq-len tokens, labels on every token and on the last 30% only (assistant-style);
  activation checkpointing off / on / on + offload: hidden 1024, 8 layers, vocab 32,000.
On a CPU the offloaded checkpoints stay in the same (host) memory, so offload cannot lower these
numbers; the row shows its cost and that its hooks ran (tensors moved), and the predicted
device memory of the same step on a GPU (engine.plan.predict) shows what it buys there.
Writes benchmarks/results/memory_techniques.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # workers.py beside it
import workers  # noqa: E402
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build(shape: dict):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.layers.lora import mark_only_lora_trainable
    from engine.layers.inject import inject_lora

    config = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["hidden"] * 3,
                         num_hidden_layers=shape["layers"], num_attention_heads=max(1, shape["hidden"] // 64),
                         num_key_value_heads=max(1, shape["hidden"] // 256), max_position_embeddings=8192,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.config.use_cache = False
    inject_lora(model, "all-linear", 16, 32.0)
    mark_only_lora_trainable(model)
    return model.train()


def worker(spec: dict) -> dict:
    import torch

    from engine.model.build import enable_activation_checkpointing
    from engine.plan import LiveBytes, batch_tensors
    from engine.model.packing import packing_context
    from engine.speed.offload import install_offload
    from engine.training.objective import CausalLM
    from engine.training.step import forward_backward

    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    model = build(spec["shape"])
    offloader = None
    if spec.get("checkpointing"):
        enable_activation_checkpointing(model)
        if spec.get("offload", False):
            offloader = install_offload(model, use_reentrant=False)
    T = spec["seq_len"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec["shape"]["vocab"], (1, T), generator=g)
    labels = torch.roll(ids, -1, 1)
    labels[0, -1] = -100
    if spec["loss_share"] < 1.0:
        labels[0, : int(T * (1 - spec["loss_share"]))] = -100
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(T)[None],
             "packing": packing_context(labels, [[T]], num_tokens=T)}
    params = list(model.parameters()) + list(model.buffers())
    rss_before = current_rss()
    tracker = LiveBytes()
    tracker.exclude(params + list(batch_tensors(batch)))
    t0 = time.perf_counter()
    with tracker:  # the engine's forward/backward of one micro-batch
        loss, _ = forward_backward(model, [batch], objective=CausalLM(spec["chunk_size"]), count=1, scale=1.0,
                                   precision="fp32", device=torch.device("cpu"))
    seconds = time.perf_counter() - t0
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"peak_rss_growth": max(0, peak_rss - rss_before), "live_peak": tracker.peak, "seconds": seconds,
           "loss": float(loss)}
    if offloader is not None:
        out["offload_stats"] = dict(offloader.stats)
    return out


def spawn(spec: dict) -> dict:
    return workers.spawn(__file__, spec, name=spec["name"])


def predicted_gpu(shape_name: str, seq_len: int, checkpointing: bool, offload: bool, chunked: bool) -> float | None:
    try:
        from engine.plan import known_config, predict
    except ImportError:
        return None
    b = predict(known_config(shape_name), seq_len=seq_len, micro_batch=1, method="qlora", precision="fp16",
                activation_checkpointing=checkpointing, offload_activations=offload, chunked_loss=chunked)
    return b.total / 2**30


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--out-dir", default=RESULTS)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0

    T = args.seq_len
    vocab_shape = {"vocab": 128256, "hidden": 256, "layers": 2}
    deep_shape = {"vocab": 32000, "hidden": 1024, "layers": 8}
    specs = [
        ("loss", "full logits, loss on every token", vocab_shape, dict(chunk_size=None, loss_share=1.0), ("llama-3.1-8b", False, False, False)),
        ("loss", "chunked loss (1024), loss on every token", vocab_shape, dict(chunk_size=1024, loss_share=1.0), ("llama-3.1-8b", False, False, True)),
        ("loss", "full logits, loss on last 30%", vocab_shape, dict(chunk_size=None, loss_share=0.3), None),
        ("loss", "chunked loss (1024), loss on last 30%", vocab_shape, dict(chunk_size=1024, loss_share=0.3), None),
        ("activations", "no checkpointing", deep_shape, dict(chunk_size=1024, loss_share=0.3), ("llama-3.1-8b", False, False, True)),
        ("activations", "activation checkpointing", deep_shape, dict(chunk_size=1024, loss_share=0.3, checkpointing=True), ("llama-3.1-8b", True, False, True)),
        ("activations", "checkpointing + offload", deep_shape, dict(chunk_size=1024, loss_share=0.3, checkpointing=True, offload=True), ("llama-3.1-8b", True, True, True)),
    ]
    rows = []
    for group, name, shape, opts, plan in specs:
        spec = {"name": name, "shape": shape, "seq_len": T, **opts}
        result = spawn(spec)
        row = {"group": group, "technique": name, "shape": shape, "seq_len": T, **opts, **result}
        if plan is not None:
            row["predicted_gpu_gib"] = predicted_gpu(plan[0], 8192, *plan[1:])
        rows.append(row)
        print(f"{name}: peak RSS growth {result['peak_rss_growth'] / 2**20:.0f} MiB, torch live peak "
              f"{result['live_peak'] / 2**20:.0f} MiB, {result['seconds']:.1f} s", flush=True)

    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, "memory_techniques")
    with open(stem + ".json", "w") as f:
        json.dump({"command": "python benchmarks/memory_techniques.py " + " ".join(argv or sys.argv[1:]),
                   "rows": rows, "load_average": os.getloadavg()}, f, indent=2)
    lines = ["# Memory techniques (one training step, CPU, fp32, LoRA r=16 all-linear)", "",
             f"Command: `python benchmarks/memory_techniques.py --seq-len {T}`; one row of {T} tokens per step; "
             "each row in a fresh process.", "",
             "| technique | model | peak RSS growth MiB | torch peak live MiB | step s | predicted GPU GiB (Llama-3.1-8B QLoRA fp16, 8k) | note |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["shape"]
        note = ""
        if "offload_stats" in r:
            st = r["offload_stats"]
            note = (f"hooks: {st['offloaded']} checkpoints copied ({st['offloaded_bytes'] / 2**20:.0f} MiB), "
                    f"{st['unpacked']} restored" if st["offloaded"] else f"hooks saw {st['packed']} tensors (kept: CPU)")
        pred = f"{r['predicted_gpu_gib']:.2f}" if r.get("predicted_gpu_gib") else "-"
        lines.append(f"| {r['technique']} | h{s['hidden']} x{s['layers']} V{s['vocab']:,} | "
                     f"{r['peak_rss_growth'] / 2**20:.0f} | {r['live_peak'] / 2**20:.0f} | {r['seconds']:.1f} | {pred} | {note} |")
    lines += ["", "The predicted column is engine.plan.predict for the technique on the GPU it is meant for "
              "(the CPU rows cannot show device memory); on a CPU the offloaded checkpoints stay in host memory."]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        from engine.plot import bar_chart
        bar_chart([{"technique": f"{r['technique']} (V{r['shape']['vocab'] // 1000}k h{r['shape']['hidden']})",
                    "MiB": r["live_peak"] / 2**20} for r in rows], "MiB", stem + ".png",
                  f"Peak torch memory of one step ({T} tokens, CPU)", "peak live tensor MiB (engine.plan.LiveBytes)")
    except ImportError:
        pass
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
