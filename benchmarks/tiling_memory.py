"""What sequence tiling buys: train.mlp_tile_tokens and train.norm_tile_tokens (engine/model/tiling.py).

    python benchmarks/tiling_memory.py [--seq-lens 1024,2048,4096] [--out-dir benchmarks/results]

Every row is one training step (engine.training.step.forward_backward of the SFT objective) of a
random Llama-shaped model (hidden 512, intermediate 1792: Llama-3.1-8B's 3.5x, 4 layers, 8 heads /
2 KV heads, vocab 8192), LoRA r=16 on all linears, bf16 autocast over a bf16 base (the 16-bit path
a GPU takes), activation checkpointing and the chunked loss on, one document per row, in a fresh
process. Measured: the peak of tensor storages created in the step and still alive (engine.plan.
LiveBytes, parameters and inputs excluded) and the seconds of a step after one warmup step (on a
shared machine: a rough cost, the memory is the point); beside it the planner's
prediction for the same step on a CPU (engine.plan.predict, cuda=False: no context, no slack).
Configurations per sequence length: untiled; tiled MLP; tiled MLP + tiled norms (tiles: auto,
hidden_size tokens). Then the planner's answer for Llama-3.1-8B QLoRA at 48k tokens on a 14.7 GiB
GPU (fp16, checkpointing + offload + chunked loss, one document per row): predicted, not measured.
Writes benchmarks/results/tiling_memory_<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # workers.py beside it
import workers  # noqa: E402
RESULTS = os.path.join(ROOT, "benchmarks", "results")
MiB, GiB = 2**20, 2**30
CONFIGS = (("untiled", 0, 0), ("tiled MLP", "auto", 0), ("tiled MLP + norms", "auto", "auto"))


def small_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1792, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=65536,
                       tie_word_embeddings=False, pad_token_id=None, bos_token_id=None, eos_token_id=None)


def worker(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from engine.layers.inject import inject_lora
    from engine.layers.lora import mark_only_lora_trainable
    from engine.model.build import enable_activation_checkpointing
    from engine.model.packing import packing_context
    from engine.model.tiling import resolve_tile_tokens, tile_mlps, tile_norms
    from engine.plan import LiveBytes, batch_tensors
    from engine.training.objective import CausalLM
    from engine.training.step import forward_backward

    config = small_config()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(torch.bfloat16)
    inject_lora(model, "all-linear", 16, 32.0)
    mark_only_lora_trainable(model)
    enable_activation_checkpointing(model)
    tile_mlps(model, resolve_tile_tokens(spec["mlp_tile_tokens"], config.hidden_size))
    tile_norms(model, resolve_tile_tokens(spec["norm_tile_tokens"], config.hidden_size))
    model.train()
    T = spec["seq_len"]
    ids = torch.randint(0, config.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(ids, -1, 1)
    labels[0, -1] = -100
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(T)[None],
             "packing": packing_context(labels, [[T]], num_tokens=T)}

    def step():
        model.zero_grad(set_to_none=True)
        return forward_backward(model, [batch], objective=CausalLM(1024), count=T - 1, scale=1.0, precision="bf16",
                                device=torch.device("cpu"))[0]

    step()                                     # warmup: first-call costs stay out of the timing
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0         # timed without the tracker (it costs Python per op)
    tracker = LiveBytes()
    tracker.exclude(list(model.parameters()) + list(model.buffers()) + list(batch_tensors(batch)))
    model.zero_grad(set_to_none=True)
    with tracker:
        loss, _ = forward_backward(model, [batch], objective=CausalLM(1024), count=T - 1, scale=1.0,
                                   precision="bf16", device=torch.device("cpu"))
    return {"live_peak": tracker.peak, "seconds": seconds, "loss": float(loss)}


def spawn(spec: dict) -> dict:
    return workers.spawn(__file__, spec)


def predicted_cpu(seq_len: int, mlp_tiles, norm_tiles) -> tuple[int, str]:
    from engine.plan import predict

    b = predict(small_config(), seq_len=seq_len, micro_batch=1, method="lora", r=16, precision="bf16",
                activation_checkpointing=True, chunked_loss=True, loss_chunk_size=1024, masked=False,
                mlp_tile_tokens=mlp_tiles, norm_tile_tokens=norm_tiles, cuda=False)
    return b.dynamic + b.lora_grads, b.dominant  # the step creates the LoRA grads too


def llama_8b_answers(budget_gib: float = 14.7) -> list[dict]:
    from engine.plan import known_config, max_seq_len, predict_for

    config, budget = known_config("llama-3.1-8b"), int(budget_gib * GiB)
    base = dict(method="qlora", r=16, targets="all-linear", precision="fp16", base_dtype="fp16",
                optimizer="paged_adamw_32bit", activation_checkpointing=True, chunked_loss=True, loss_chunk_size=1024,
                offload_activations=True, packing=False, cuda=True)
    rows = []
    for name, mlp_tiles, norm_tiles in CONFIGS:
        s = {**base, "mlp_tile_tokens": mlp_tiles, "norm_tile_tokens": norm_tiles}
        b = predict_for(config, 49152, 1, **s)
        rows.append({"config": name, "total_gib": b.total / GiB, "fits": b.total <= budget, "dominant": b.dominant,
                     "dominant_gib": b.terms.get(b.dominant, 0) / GiB,
                     "longest": max_seq_len(config, 1, budget, **s)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-lens", default="1024,2048,4096")
    p.add_argument("--out-dir", default=RESULTS)
    p.add_argument("--tag", default=None, help="results file suffix (default: today's date)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    rows, load = [], [os.getloadavg()[0]]
    for T in (int(t) for t in args.seq_lens.split(",")):
        for name, mlp_tiles, norm_tiles in CONFIGS:
            measured = spawn({"seq_len": T, "mlp_tile_tokens": mlp_tiles, "norm_tile_tokens": norm_tiles})
            predicted, dominant = predicted_cpu(T, mlp_tiles, norm_tiles)
            rows.append({"seq_len": T, "config": name, **measured, "predicted": predicted, "dominant": dominant})
            load.append(os.getloadavg()[0])
            print(f"{T:>6} {name:<18} live peak {measured['live_peak'] / MiB:8.1f} MiB, predicted {predicted / MiB:8.1f} "
                  f"MiB, {measured['seconds']:.1f} s", flush=True)
    answers = llama_8b_answers()
    tag = args.tag or datetime.date.today().isoformat()
    command = "python benchmarks/tiling_memory.py " + " ".join(sys.argv[1:] if argv is None else argv)
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"tiling_memory_{tag}")
    with open(stem + ".json", "w") as f:
        json.dump({"command": command, "rows": rows, "llama_8b_48k": answers, "load_average": load}, f, indent=2)
    lines = [f"# Sequence tiling: memory of one training step ({tag})", "", f"Command: `{command}`  ",
             "Model: random Llama shape, hidden 512, intermediate 1792, 4 layers, 8 / 2 heads, vocab 8192; LoRA r=16 "
             "all-linear; bf16 autocast, bf16 base; activation checkpointing, chunked loss (1024); one document "
             f"per row; CPU ({os.cpu_count()} logical CPUs, 1-minute load average {min(load):.1f}-{max(load):.1f}), "
             "each row in a fresh process. Tiles: auto (512 tokens).", "",
             "| tokens | configuration | torch peak live MiB | vs untiled | predicted MiB (CPU) | pred / meas | step s | "
             "largest term (planner) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = next(x for x in rows if x["seq_len"] == r["seq_len"] and x["config"] == "untiled")
        lines.append(f"| {r['seq_len']} | {r['config']} | {r['live_peak'] / MiB:.1f} | "
                     f"{r['live_peak'] / base['live_peak']:.2f}x | {r['predicted'] / MiB:.1f} | "
                     f"{r['predicted'] / r['live_peak']:.3f} | {r['seconds']:.1f} | {r['dominant']} |")
    lines += ["", "## Llama-3.1-8B QLoRA at 48k tokens on a 14.7 GiB GPU: the planner's answer (predicted, not measured)",
              "", "r16 all-linear, fp16, paged AdamW 32-bit, activation checkpointing + offload + chunked loss, one "
              "document per row, micro-batch 1.", "",
              "| configuration | predicted peak GiB at 49,152 tokens | fits | largest term (GiB) | longest that fits |",
              "|---|---|---|---|---|"]
    for r in answers:
        lines.append(f"| {r['config']} | {r['total_gib']:.2f} | {'yes' if r['fits'] else 'no'} | {r['dominant']} "
                     f"({r['dominant_gib']:.2f}) | {r['longest']} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
