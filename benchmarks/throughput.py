"""Training throughput: this engine vs HF Trainer + PEFT vs the seed's recipe, measured in one run.

    python benchmarks/throughput.py                       # CPU, SmolLM2-135M, quickstart data (<= 10 min idle)
    python benchmarks/throughput.py --data seed           # the seed's own file
    python benchmarks/throughput.py --precision bf16      # every configuration in bf16 (CPUs with AVX512-BF16 / AMX)
    python benchmarks/throughput.py --model tiny --steps 2 --repeats 1
    python benchmarks/throughput.py --device cuda --t4 --model shape:llama-3.1-8b --method qlora \
        --data synthetic --seq-len 2048                   # GPU, "T4 mode" (fp16, 14.7 GiB cap)
    python benchmarks/throughput.py --device cuda --t4 --model shape:llama-3.1-8b --method qlora --probe \
        --mlp-tile-tokens auto --norm-tile-tokens auto    # longest sequence that trains, planned vs measured
    python benchmarks/throughput.py --probe --model shape:tiny-llama --probe-start 256 --probe-max 1024 \
        --mlp-tile-tokens auto --docs-per-row 2           # the same path on a CPU (a smoke run: no OOM there)

Configurations (`--configs`, run in this order, rotated every repeat so none always runs first
or last; each run is a fresh subprocess, so peak RSS is per configuration):
  engine          this engine's real step: build_model, the speed plan engine.train resolves,
                  engine.data (packed rows of --seq-len), engine.training.step.train_step
                  (chunked loss, fused LoRA, packed attention, loss scaler, clip, AdamW)
  engine_nofuse   the same with speed.disable=[fused_lora] (what that switch buys)
  engine_dense_attn  the same with speed.disable=[packed_attention] (SDPA over T x T with a mask)
  engine_sdpa_short  the same with speed.disable=[short_attention] (acts on a CPU under bf16 only:
                  SDPA's flash kernel for every document instead of the explicit short-document one)
  engine_doc_nodes    the same with speed.disable=[batch_short_documents] (one attention node per
                  short document, with its splits and concatenations, instead of one per layer)
  engine_eager_norms  the same with speed.disable=[compile_norms] (RMSNorm as transformers' eager
                  ops; by default a CPU compiles each norm into one kernel, paid in the warmup)
  engine_eager_loss   the same with speed.disable=[compile_loss] (the chunked loss's eager cross-entropy)
  engine_ungrouped    the same with speed.disable=[grouped_lora] (one A matmul per LoRA layer)
  engine_unfused_blocks  the same with speed.disable=[fused_blocks] (LoRALinear.forward, transformers'
                  RMSNorm and RoPE under autograd instead of the Functions with their own backward)
  engine_compiled the same with speed.compile=true (auto leaves them off on
                  a GPU, where they are not measured yet: scripts/gpu_check.sh measures this row)
  engine_malloc_default  the same with speed.disable=[retain_host_memory] (glibc's own malloc thresholds:
                  the step's large blocks go back to the kernel and are faulted in again)
  engine_ckpt     the same with activation checkpointing (+ offload with --offload)
  hf_padded       HF Trainer + PEFT LoRA, SDPA, the same tokenized documents and labels, one
                  document per row, padded to the longest in the batch (the common HF setup)
  hf_flat         HF Trainer + PEFT with DataCollatorWithFlattening (padding-free, position_ids
                  restart per document): the best HF configuration transformers supports
  seed            the seed's recipe: each JSONL line rendered with Python's str(), left-padded
                  to 512, loss on every token, batch 2 (HF Trainer + PEFT, same LoRA config)
  seed_ckpt       the same with gradient checkpointing always on, as the seed notebook trained
                  (the seed's notes): the recipe as its users ran it
  seed_retained   the seed recipe in a process that retains host memory as the engine does
                  (engine.speed.host_memory.retain before the model is built): what that setting alone
                  would give the seed's users
Every configuration uses the same model, LoRA config (r, alpha, targets, dropout 0), optimizer
(AdamW, lr 2e-4, clip 1.0), precision and checkpointing setting (seed_ckpt excepted). HF padded / flat take
round(seq_len / mean document length) documents per step so a step holds about as many tokens
as one engine row.

Reported per configuration (median over repeats): useful tokens/s (non-pad tokens), loss
tokens/s (tokens that carry loss), padded tokens/s (every position computed), peak memory
(CPU: the worker's peak RSS; GPU: torch.cuda.max_memory_allocated), attention kernel calls per
step (forward + backward, counted on one extra untimed step), and MFU:

    FLOPs = 4 P_lin N + 6 P_lora N + 4 P_head N_loss + 12 L d_attn S
      P_lin  frozen linear weights of the decoder blocks (4-bit ones counted as out x in)
      P_lora LoRA A and B weights; P_head = vocab x hidden (lm_head)
      N useful tokens, N_loss loss-carrying tokens, S = sum over documents of n(n+1)/2 (the
      causal query-key pairs), L layers, d_attn = heads x head_dim
    frozen weights: forward 2 P + backward 2 P (activation gradient only, no weight gradient);
    LoRA weights: 2 + 2 + 2 (forward, activation and weight gradients); the lm_head is needed
    only where a label is; attention: QK^T and PV are 2 x 2 d_attn FLOPs per pair forward, x3
    with backward. Recomputation (checkpointing) and padding are not counted: MFU is the needed
    work over time, divided by the machine's peak, which this script measures in the same run in
    the precision the configurations train in (2048^3 matmul loop on CPU with the same thread
    count: fp32, or bf16 with --precision bf16; 8192^3 fp16 / bf16 on a GPU).
Writes benchmarks/results/throughput_<tag>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # its two modules, when imported from elsewhere
from throughput_inputs import (ALL_CONFIGS, LABELS, RESULTS, ROOT, SEED_CONFIGS, _precision,  # noqa: E402
                               data_path, flops_per_useful_token, resolve_model)
from throughput_runs import run_worker  # noqa: E402
# ----------------------------------------------------------------------------- driver

def engine_switches(kind: str, args) -> dict:
    """The train and speed settings of each configuration (the real switches, nothing benchmark-only):
    the default speed plan for the device, minus the switch a row measures."""
    train = {"chunked_loss": True, "loss_chunk_size": args.loss_chunk_size,
             "activation_checkpointing": args.checkpointing or kind == "engine_ckpt",
             "offload_activations": args.offload}
    speed = {}
    off = {"engine_nofuse": "fused_lora", "engine_dense_attn": "packed_attention", "engine_sdpa_short": "short_attention",
           "engine_doc_nodes": "batch_short_documents", "engine_eager_norms": "compile_norms",
           "engine_eager_loss": "compile_loss", "engine_ungrouped": "grouped_lora",
           "engine_unfused_blocks": "fused_blocks", "engine_malloc_default": "retain_host_memory"}
    if kind in off:
        speed["disable"] = [off[kind]]
    if kind == "engine_compiled":
        speed["compile"] = True
    return {"train": train, "speed": speed}


def spawn(spec: dict, timeout: float) -> dict:
    """Run one configuration in a fresh interpreter (separate peak RSS, no warm caches)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"kind": spec["kind"], "error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            result["wall_seconds"] = time.perf_counter() - t0
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-12:]
    return {"kind": spec["kind"], "error": "\n".join(tail) or f"exit code {proc.returncode}"}


def summarize(kind: str, runs: list[dict], peak: float | None, peak_cpu: float | None = None) -> dict:
    ok = [r for r in runs if "error" not in r]
    row = {"config": kind, "label": LABELS[kind], "repeats": len(ok)}
    if not ok:
        row["error"] = runs[-1].get("error", "no run") if runs else "not run"
        return row

    def rate(r, key):
        return sum(s[key] for s in r["steps"]) / sum(s["seconds"] for s in r["steps"])

    for key in ("useful", "loss", "padded"):
        row[f"{key}_tokens_per_s"] = statistics.median(rate(r, key) for r in ok)
    row["useful_tokens_per_s_all"] = [round(rate(r, "useful"), 2) for r in ok]
    # load-robust companion: useful tokens per CPU-second of the process (all its threads)
    row["useful_tokens_per_cpu_s"] = statistics.median(
        sum(s["useful"] for s in r["steps"]) / max(1e-9, sum(s.get("cpu_seconds", 0.0) for s in r["steps"])) for r in ok)
    row["step_seconds_median"] = statistics.median(s["seconds"] for r in ok for s in r["steps"])
    row["minor_faults_per_step"] = statistics.median(s.get("faults", 0) for r in ok for s in r["steps"])
    row["peak_memory_gib"] = statistics.median(r["peak_memory_bytes"] for r in ok) / 2**30
    row["flops_per_useful_token"] = flops_per_useful_token(ok[0]["flop_terms"], ok[0]["data"])
    row["achieved_flops"] = row["useful_tokens_per_s"] * row["flops_per_useful_token"]
    row["mfu"] = row["achieved_flops"] / peak if peak else None
    row["mfu_cpu"] = (row["useful_tokens_per_cpu_s"] * row["flops_per_useful_token"] / peak_cpu) if peak_cpu else None
    row["padding_share"] = 1 - row["useful_tokens_per_s"] / row["padded_tokens_per_s"]
    row["final_loss"] = ok[0]["losses"][-1]
    row["flop_terms"], row["data"] = ok[0]["flop_terms"], ok[0]["data"]
    if "batch_size" in ok[0]:
        row["batch_size"] = ok[0]["batch_size"]
    if "packing" in ok[0]:  # engine rows: packed unless the isolation probe turned it off
        row["packing"] = ok[0]["packing"]
    if "attention_calls" in ok[0]:  # counted on one extra, untimed step (engine.speed.measure)
        row["attention_calls"] = ok[0]["attention_calls"]
    return row


def write_markdown(path: str, result: dict) -> None:
    rows, meta = result["rows"], result["meta"]
    peak = meta.get("peak_flops")
    lines = [f"# Training throughput: {meta['tag']}", "",
             f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}; torch {meta['torch']}, "
             f"transformers {meta['transformers']}, peft {meta['peft']}; threads {meta['threads']}  ",
             f"Model `{meta['model']}`, data `{meta['data']}`, seq_len {meta['seq_len']}, LoRA r={meta['r']} "
             f"alpha={meta['alpha']} targets={meta['targets']} ({meta['method']}), precision {meta['precision']}, "
             f"activation checkpointing {meta['checkpointing']}  ",
             f"{meta['repeats']} repeats x ({meta['warmup']} warmup + {meta['steps']} timed steps), configurations "
             f"interleaved (rotated each repeat), each in a fresh process; medians.  ",
             (f"Measured matmul peak: {peak / 1e9:.1f} GFLOP/s ({meta['peak_matmul']}, best of a loop, median over "
              f"repeats)" if peak else "Measured matmul peak: n/a")
             + (f"; per CPU-second: {meta['peak_flops_per_cpu_s'] / 1e9:.1f} GFLOP (best over repeats; the MFU (CPU-s) "
                "column divides achieved FLOPs per CPU-second by it)" if meta.get("peak_flops_per_cpu_s") else ""), ""]
    if meta.get("load_note"):
        lines += [f"**Load:** {meta['load_note']}", ""]
    lines += ["| configuration | useful tok/s | loss tok/s | padded tok/s | padding | peak mem GiB | "
              "GFLOP/s | MFU | vs engine | useful tok per CPU-s | vs engine (CPU-s) | MFU (CPU-s) | "
              "attention kernel calls / step (fwd + bwd) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    engine = next((r for r in rows if r["config"] == "engine" and "error" not in r), None)
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | error: {r['error'].splitlines()[-1][:80]} | | | | | | | | | | | |")
            continue
        vs = f"{engine['useful_tokens_per_s'] / r['useful_tokens_per_s']:.2f}x" if engine else "-"
        vs_cpu = f"{engine['useful_tokens_per_cpu_s'] / r['useful_tokens_per_cpu_s']:.2f}x" if engine else "-"
        mfu = f"{100 * r['mfu']:.0f}%" if r.get("mfu") else "-"
        mfu_cpu = f"{100 * r['mfu_cpu']:.0f}%" if r.get("mfu_cpu") else "-"
        lines.append(f"| {r['label']} | {r['useful_tokens_per_s']:.1f} | {r['loss_tokens_per_s']:.1f} | "
                     f"{r['padded_tokens_per_s']:.1f} | {100 * r['padding_share']:.0f}% | {r['peak_memory_gib']:.2f} | "
                     f"{r['achieved_flops'] / 1e9:.1f} | {mfu} | {vs} | {r['useful_tokens_per_cpu_s']:.1f} | {vs_cpu} | "
                     f"{mfu_cpu} | {_calls(r.get('attention_calls'))} |")
    if result.get("best_hf"):
        lines += ["", f"**Engine vs the best HF configuration ({result['best_hf']}): "
                  f"{result['ratios']['engine_vs_best_hf']:.2f}x** useful tokens/s."]
    lines += ["", "Attention kernel calls: the attention kernels (SDPA's fused kernels, flash / memory-efficient / "
              "varlen attention) one extra, untimed training step launches, forward + backward, counted by a "
              "dispatch mode (engine/speed/measure.py); the CPU's short-document kernel is explicit matmuls and "
              "launches none for the documents it takes.",
              "", "\"vs engine\" = engine useful tokens/s / this row's useful tokens/s. \"per CPU-s\" divides by the "
              "process's CPU time (time.process_time, all threads) instead of wall time: less sensitive to other "
              "processes on the machine (with several threads it also counts their spin-waits).", "",
              "FLOPs per useful token = (4 P_lin N + 6 P_lora N + 4 P_head N_loss + 12 L d_attn S) / N "
              "(see benchmarks/throughput.py); per configuration:", ""]
    for r in rows:
        if "error" not in r:
            t, d = r["flop_terms"], r["data"]
            lines.append(f"- {r['config']}: P_lin={t['P_lin']:,} P_lora={t['P_lora']:,} P_head={t['P_head']:,} "
                         f"L={t['layers']} d_attn={t['d_attn']}; N={d['tokens']:,} N_loss={d['loss_tokens']:,} "
                         f"S={d['causal_pairs']:,} -> {r['flops_per_useful_token'] / 1e6:.1f} MFLOP/token; "
                         f"useful tok/s per repeat {r['useful_tokens_per_s_all']}"
                         + (f"; batch {r['batch_size']}" if "batch_size" in r else "")
                         + f"; minor page faults per step {r['minor_faults_per_step']:,.0f}"
                         + ("; PADDED rows (the isolation probe found packed documents leaking)"
                            if r.get("packing") is False else ""))
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _calls(calls: dict | None) -> str:
    return f"{calls['forward']} + {calls['backward']}" if calls else "-"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2 | tiny | shape:NAME | HF model dir")
    p.add_argument("--data", default="quickstart", help="quickstart | seed | synthetic | JSONL path")
    p.add_argument("--seq-len", type=int, default=1024, help="engine packed row length (data.max_seq_len)")
    p.add_argument("--micro-batch", type=int, default=1, help="engine rows per step")
    p.add_argument("--hf-batch", type=int, default=0, help="HF documents per step (0: seq_len / mean length)")
    p.add_argument("--method", default="lora", choices=("lora", "qlora"))
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--targets", default="all-linear")
    p.add_argument("--loss-chunk-size", type=int, default=1024)
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing for every configuration")
    p.add_argument("--offload", action="store_true", help="with checkpointing: offload the checkpoints (engine)")
    p.add_argument("--configs", default="engine,engine_nofuse,engine_dense_attn,hf_padded,hf_flat,seed,seed_ckpt")
    p.add_argument("--device", default="cpu")
    p.add_argument("--t4", action="store_true", help="GPU: fp16 autocast and a 14.7 GiB memory cap")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="every configuration's precision (auto: fp16 with --t4, fp32 on CPU, bf16 on a GPU)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: the physical cores)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900, help="seconds per configuration run")
    p.add_argument("--tag", default=None, help="results file suffix (default: device_model_data)")
    p.add_argument("--out-dir", default=RESULTS)
    p.add_argument("--load-note", default=None, help="say in the results how loaded the machine was")
    p.add_argument("--probe", action="store_true", help="instead: longest sequence that fits (shape: models), "
                   "with every memory switch on, planner vs measured")
    p.add_argument("--probe-start", type=int, default=2048)
    p.add_argument("--probe-max", type=int, default=131072)
    p.add_argument("--memory-cap-gib", type=float, default=None,
                   help="GPU: cap the process at this many GiB (default with --t4: 14.7)")
    p.add_argument("--mlp-tile-tokens", default="0", help="--probe: train.mlp_tile_tokens (0, N or auto)")
    p.add_argument("--norm-tile-tokens", default="0", help="--probe: train.norm_tile_tokens (0, N or auto)")
    p.add_argument("--docs-per-row", type=int, default=1, help="--probe: documents of equal length packed in the row")
    p.add_argument("--no-offload", action="store_true", help="--probe: keep the block checkpoints on the device")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print("RESULT " + json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return 0

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in configs:
        if c not in ALL_CONFIGS:
            p.error(f"--configs: unknown configuration {c!r} (known: {', '.join(ALL_CONFIGS)})")
    if args.t4 and args.precision not in ("auto", "fp16"):
        p.error(f"--t4 is fp16 (a T4 has no bf16); drop --precision {args.precision}")
    if args.precision == "fp16" and not args.device.startswith("cuda"):
        p.error("--precision fp16 on a CPU: there are no fast fp16 matmul kernels there (use bf16)")
    if args.offload and not args.checkpointing and "engine_ckpt" not in configs:
        p.error("--offload needs --checkpointing (or the engine_ckpt configuration)")
    threads = args.threads or physical_cores()
    model = resolve_model(args.model)
    data_path(args.data)
    if args.data == "synthetic":  # the seed recipe tokenizes a JSONL file
        configs = [c for c in configs if c not in SEED_CONFIGS]
    targets = args.targets.split(",") if "," in args.targets else args.targets
    base = {"model": model, "data": args.data, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
            "hf_batch": args.hf_batch, "method": args.method, "r": args.r, "alpha": args.alpha, "targets": targets,
            "device": args.device, "t4": args.t4, "precision": args.precision, "threads": threads, "warmup": args.warmup, "steps": args.steps}
    if args.memory_cap_gib is not None:
        if not args.device.startswith("cuda"):
            p.error("--memory-cap-gib caps GPU memory: it needs --device cuda")
        base["cap_bytes"] = int(args.memory_cap_gib * 2**30)
    if args.probe:
        if args.docs_per_row < 1:
            p.error(f"--docs-per-row must be >= 1, got {args.docs_per_row}")
        return probe_main(args, base)
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    peaks = []
    load = [os.getloadavg()[0]]
    t_start = time.perf_counter()
    for rep in range(args.repeats):
        order = configs[rep % len(configs):] + configs[:rep % len(configs)]
        peak = spawn({**base, "kind": "peak"}, args.timeout)
        if "error" not in peak:
            peaks.append(peak)
        for kind in order:
            result = spawn({**base, "kind": kind, "engine": engine_switches(kind, args)}, args.timeout)
            runs[kind].append(result)
            load.append(os.getloadavg()[0])
            status = result.get("error", "").splitlines()[-1:] if "error" in result else \
                f"{sum(s['useful'] for s in result['steps']) / sum(s['seconds'] for s in result['steps']):.1f} useful tok/s"
            print(f"[repeat {rep + 1}/{args.repeats}] {kind}: {status}", flush=True)
    peak_flops = statistics.median(pk["peak_flops"] for pk in peaks) if peaks else None
    cpu_peaks = [pk["peak_flops_per_cpu_s"] for pk in peaks if pk.get("peak_flops_per_cpu_s")]
    peak_cpu = max(cpu_peaks) if cpu_peaks else None
    rows = [summarize(kind, runs[kind], peak_flops, peak_cpu) for kind in configs]

    import torch
    import transformers
    try:
        import peft
        peft_version = peft.__version__
    except ImportError:
        peft_version = "not installed"
    tag = args.tag or f"{'gpu' if args.device.startswith('cuda') else 'cpu'}_{args.model.replace('shape:', '')}_{args.data}"
    tag = tag.replace("/", "_")
    machine = f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} logical CPUs".strip()
    if args.device.startswith("cuda"):
        machine += f", {torch.cuda.get_device_name(0)}" + (" (T4 mode: fp16, 14.7 GiB cap)" if args.t4 else "")
    load_note = args.load_note
    if load_note is None and max(load) > 1.5 * threads:
        load_note = (f"measured under load: 1-minute load average {min(load):.1f}-{max(load):.1f} on {os.cpu_count()} "
                     "CPUs (other processes were running); absolute numbers are low and noisy, ratios less so")
    meta = {"tag": tag, "command": "python benchmarks/throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": machine, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft_version, "threads": threads, "model": args.model, "data": args.data, "seq_len": args.seq_len,
            "r": args.r, "alpha": args.alpha, "targets": args.targets, "method": args.method,
            "precision": _precision(base), "checkpointing": args.checkpointing, "repeats": args.repeats,
            "warmup": args.warmup, "steps": args.steps, "peak_flops": peak_flops, "peak_flops_per_cpu_s": peak_cpu,
            "peak_matmul": peaks[0]["matmul"] if peaks else None, "load_average": load, "load_note": load_note,
            "wall_seconds": time.perf_counter() - t_start}
    result = {"meta": meta, "rows": rows, "peaks": peaks}
    engine = next((r for r in rows if r["config"] == "engine" and "error" not in r), None)
    if engine:
        result["ratios"] = {f"engine_vs_{r['config']}": engine["useful_tokens_per_s"] / r["useful_tokens_per_s"]
                            for r in rows if r["config"] != "engine" and "error" not in r}
        hf = [r for r in rows if r["config"] in ("hf_padded", "hf_flat") and "error" not in r]
        if hf:  # the target: against whichever HF configuration is faster on this machine
            best = max(hf, key=lambda r: r["useful_tokens_per_s"])
            result["ratios"]["engine_vs_best_hf"] = engine["useful_tokens_per_s"] / best["useful_tokens_per_s"]
            result["best_hf"] = best["config"]
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"throughput_{tag}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    write_markdown(stem + ".md", result)
    try:
        from engine.plot import bar_chart
        drawable = [r for r in rows if "error" not in r]
        if drawable:
            bar_chart([{"configuration": r["label"], "useful tokens/s": r["useful_tokens_per_s"]} for r in drawable],
                      "useful tokens/s", stem + ".png", f"Training throughput, {tag}", "useful (non-pad) tokens/s")
    except ImportError:
        pass
    print(open(stem + ".md").read())
    return 0 if all("error" not in r for r in rows) else 1


def _tile_setting(text: str):
    return text if text == "auto" else int(text)


def planned_longest(args, base: dict) -> int | None:
    """The planner's longest sequence for the probe's settings in the probe's cap (None off a GPU)."""
    if not args.device.startswith("cuda"):
        return None
    from engine.plan import max_seq_len
    from throughput_inputs import T4_BYTES, _model_config, _precision

    cap = base.get("cap_bytes") or T4_BYTES
    targets = base["targets"]
    return max_seq_len(_model_config(args.model), 1, int(cap), method=args.method, r=args.r, targets=targets,
                       precision=_precision(base), activation_checkpointing=True,
                       offload_activations=not args.no_offload, chunked_loss=True, loss_chunk_size=1024, masked=False,
                       mlp_tile_tokens=_tile_setting(args.mlp_tile_tokens),
                       norm_tile_tokens=_tile_setting(args.norm_tile_tokens), step=512)


def probe_main(args, base: dict) -> int:
    if not args.model.startswith("shape:"):
        raise SystemExit("--probe needs --model shape:NAME (a random-initialised real architecture)")
    result = spawn({**base, "kind": "probe", "probe_start": args.probe_start, "probe_max": args.probe_max,
                    "probe_budget_s": 0.6 * args.timeout, "offload": not args.no_offload,
                    "docs_per_row": args.docs_per_row, "mlp_tile_tokens": _tile_setting(args.mlp_tile_tokens),
                    "norm_tile_tokens": _tile_setting(args.norm_tile_tokens)}, args.timeout)
    tag = args.tag or f"{'gpu' if args.device.startswith('cuda') else 'cpu'}_{args.model.replace('shape:', '')}_probe"
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"throughput_{tag}.json")
    result["command"] = "python benchmarks/throughput.py " + " ".join(sys.argv[1:])
    if "error" not in result:
        result["planned_max_seq_len"] = planned_longest(args, base)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    if "error" in result:
        print(f"probe failed: {result['error']}")
        return 1
    cuda = args.device.startswith("cuda")
    print(f"longest sequence that fits: {result['max_fitting_seq_len']} (first failing: {result['first_failing_seq_len']}); "
          f"planned: {result['planned_max_seq_len'] if result['planned_max_seq_len'] is not None else '- (no GPU)'}")
    for t in result["tries"]:
        meas = f"{t['measured_bytes'] / 2**30:.2f} GiB" if t["measured_bytes"] else "OOM"
        pred = f"{t['predicted_bytes'] / 2**30:.2f} GiB" if t["predicted_bytes"] else "-"
        ratio = (f" ({t['predicted_bytes'] / t['measured_bytes'] - 1:+.0%})" if t["measured_bytes"] and cuda
                 else "")  # on a CPU "measured" is the process's peak RSS: not comparable
        print(f"  seq {t['seq_len']:>6}: measured {meas}, planned {pred}{ratio}, {t['seconds']:.1f} s, "
              f"offloaded {t['offloaded_bytes'] / 2**20:.0f} MiB; planner's largest term: {t['predicted_dominant']}")
    print(f"wrote {path}")
    return 0


def physical_cores() -> int:
    """Physical cores available to this process (torch's default thread count on Linux)."""
    try:
        import torch
        return torch.get_num_threads()
    except ImportError:
        return os.cpu_count() or 1


if __name__ == "__main__":
    sys.exit(main())
