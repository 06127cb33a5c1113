"""GRPO rollout generation: the engine's `generate_rollouts` vs transformers' `generate`, same run.

    python benchmarks/rollout_generation.py                         # CPU, SmolLM2-135M, 4 prompts x G=8, 128 + 128
    python benchmarks/rollout_generation.py --precision bf16        # CPUs with AVX512-BF16 / AMX
    python benchmarks/rollout_generation.py --model tiny --prompts 2 --generations 2 --prompt-len 16 \
        --completion-len 8 --repeats 1                              # a smoke run
    python benchmarks/rollout_generation.py --stop natural --configs engine,engine_nocompact,hf_generate
    python benchmarks/rollout_generation.py --device cuda --precision bf16 --method qlora   # scripts/gpu_check.sh

One model in one process (the base, LoRA r/alpha on every linear with B drawn nonzero so the
adapter changes the tokens), one batch: `--prompts` prompts of exactly `--prompt-len` tokens, each
sampled `--generations` times (temperature 1, top-p 1, top-k 0: GRPO's defaults), every row
`--completion-len` tokens long (no stop token can end a row early, so every configuration does the
same work). Configurations (`--configs`), their order rotated every repeat:
  engine          generate_rollouts with the decode-copy layout the speed plan picks (oneDNN's on a
                  CPU that has it): the prompts prefilled once and their KV repeated G times,
                  the preallocated KV cache, sampling on the device (one uniform per row), a stop
                  check every 8 tokens, stopped rows compacted away
  engine_noshare  the same with share_prefill=False (each prompt prefilled G times: what sharing buys)
  engine_nocompact  the same with compact_rows=False (stopped rows decoded to the end; acts with --stop natural)
  engine_multinomial  the same with sampler="multinomial" (torch.multinomial, as transformers draws)
  engine_nolean   the same with lean_decode=False: every decode step is transformers' forward (on the
                  merged decode copies) instead of the lean step (engine/model/lean_decode.py)
  engine_nomerge  the same with merge_lora=False (the LoRA branch in every decode step instead of the
                  rollout's merged decode copies W + s*B@A, engine/layers/decode_merge.py)
  engine_nodequant  (--method qlora) the same with dequantize_4bit=False: the 4-bit bases keep their LoRA
                  branch (the engine row gives them a merged 16-bit decode copy, as the CPU's speed plan does)
  engine_in_out   the same with merged_layout="in_out" ([in, out] decode copies for MKL's GEMMs: what
                  the CPU's default where oneDNN is there, its blocked layout, buys)
  engine_out_in   the same with merged_layout="out_in" (the decode copies stored as nn.Linear stores W,
                  not transposed: what the in_out layout, the CPU's default, buys)
  hf_generate     model.generate on the prompts repeated G times, left-padded, as TRL's GRPOTrainer
                  calls it (transformers' DynamicCache, its logits processors, min_new_tokens = max)
  hf_static       the same with cache_implementation="static" (transformers' StaticCache, not compiled)
With `--stop natural` the prompts are the quickstart task's held-out chats (data/quickstart/eval.jsonl,
rendered with the chat template) and every row stops at the template's end of turn, as in a GRPO
run: the configurations sample different completions, so the work is the same only on average
(the report gives each one's generated tokens).
Reported per configuration (median over repeats): ms per rollout batch (wall), generated tokens/s
(prompts x G x completion length / wall time), the speed-up over hf_generate, and the process's CPU
ms and CPU speed-up (on a shared CPU, with --threads 1, the steadier of the two).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
CONFIGS = ("engine", "engine_noshare", "engine_nocompact", "engine_multinomial", "engine_nolean", "engine_nomerge", "engine_nodequant",
           "engine_out_in", "engine_in_out", "hf_generate", "hf_static")
NO_STOP = -1  # a token id no model emits: every row runs the full completion length


def build(args):
    """(model, pad id, vocab size, tokenizer or None): the base at the precision's dtype (4-bit for
    qlora), LoRA injected."""
    import torch

    from engine.layers.inject import inject_lora
    from engine.layers.lora import lora_modules
    from engine.layers.quant import QuantSpec
    from engine.model.build import load_base_model, load_tokenizer
    from engine.training.amp import DTYPES
    from throughput_inputs import _model_config, random_base_model, resolve_model

    path = resolve_model(args.model)
    dtype = DTYPES[args.precision]
    if path.startswith("shape:"):  # a real architecture with random weights (no tokenizer: pad 0)
        model = random_base_model(_model_config(path), method=args.method, device=args.device, dtype=dtype)
        pad, tokenizer = 0, None
    else:
        quant = QuantSpec("nf4", True, dtype) if args.method == "qlora" else None
        model = load_base_model(path, dtype=dtype, device=args.device, quant=quant)
        tokenizer = load_tokenizer(path)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(0)
    inject_lora(model, "all-linear", r=args.r, alpha=args.alpha)
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.002)  # small, as a trained adapter: the replies stay sane
    return model.eval(), pad, model.config.vocab_size, tokenizer


def quickstart_prompts(tokenizer, n: int) -> list[list[int]]:
    """The first n held-out chats of the quickstart task, up to the assistant's turn, as token ids."""
    from engine.generate import encode_prompt

    with open(os.path.join(ROOT, "data", "quickstart", "eval.jsonl")) as f:
        chats = [json.loads(line)["messages"] for line in f if line.strip()][:n]
    return [encode_prompt(tokenizer, [m for m in chat if m["role"] != "assistant"]) for chat in chats]


def run_once(kind: str, model, prompts, args, pad: int, stops: list[int] | None = None) -> tuple[float, float, int]:
    """(wall seconds, this process's CPU seconds, tokens generated) for one rollout batch of `kind`.
    Without `stops` every row must have the full completion length (checked). On a shared CPU the
    CPU seconds (with --threads 1) are the steadier measure: other processes' load stretches the
    wall time, not them."""
    import torch

    from engine import speed
    from engine.config import SpeedConfig
    from engine.generate import left_pad
    from engine.grpo.rollout import generate_rollouts

    G, L = args.generations, args.completion_len
    # the layout a training run's speed plan gives its rollouts (on a CPU with oneDNN: its blocked copies)
    plan_layout = speed.resolve(SpeedConfig(), device=torch.device(args.device), precision=args.precision).rollout_merge
    autocast = (torch.autocast(device_type=args.device, dtype=getattr(torch, {"bf16": "bfloat16",
                                                                              "fp16": "float16"}[args.precision]))
                if args.precision != "fp32" else torch.autocast(device_type=args.device, enabled=False))
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    sync()
    start, cpu_start = time.perf_counter(), time.process_time()
    if kind.startswith("engine"):
        with autocast:
            r = generate_rollouts(model, prompts, num_generations=G, max_new_tokens=L, temperature=args.temperature,
                                  stop_token_ids=stops or [NO_STOP], pad_token_id=pad,
                                  generator=torch.Generator(device=args.device).manual_seed(0),
                                  share_prefill=kind != "engine_noshare", compact_rows=kind != "engine_nocompact",
                                  sampler="multinomial" if kind == "engine_multinomial" else "inverse_cdf",
                                  merge_lora=kind != "engine_nomerge", lean_decode=kind != "engine_nolean",
                                  merged_layout={"engine_out_in": "out_in", "engine_in_out": "in_out"}.get(kind, plan_layout),
                                  dequantize_4bit=args.device == "cpu" and kind != "engine_nodequant")
        lengths = [len(c) for c in r.completion_ids]
    else:
        ids, mask = left_pad([p for p in prompts for _ in range(G)], pad)
        extra = {"cache_implementation": "static"} if kind == "hf_static" else {}
        with autocast, torch.no_grad():
            length = {"eos_token_id": stops} if stops else {"min_new_tokens": L}
            out = model.generate(input_ids=ids.to(args.device), attention_mask=mask.to(args.device), do_sample=True,
                                 temperature=args.temperature, top_p=1.0, top_k=0, max_new_tokens=L, pad_token_id=pad,
                                 **length, **extra)
        new = out[:, ids.shape[1]:].tolist()
        lengths = [next((i + 1 for i, t in enumerate(row) if t in stops), len(row)) for row in new] if stops \
            else [len(row) for row in new]
    sync()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    if not stops and lengths != [L] * (len(prompts) * G):
        raise RuntimeError(f"{kind}: completions of {sorted(set(lengths))} tokens, expected all {L}")
    return seconds, cpu_seconds, sum(lengths)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/rollout_generation.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2 | tiny | shape:NAME (random weights) | an HF model dir")
    p.add_argument("--method", default="lora", choices=("lora", "qlora"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--generations", type=int, default=8, help="G, completions per prompt")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--completion-len", type=int, default=128)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0)")
    p.add_argument("--stop", default="none", choices=("none", "natural"),
                   help="none: every row runs --completion-len tokens; natural: quickstart prompts, end-of-turn stops")
    p.add_argument("--configs", default="engine,engine_noshare,hf_generate,hf_static")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--tag", default=None, help="results file suffix (default: device_model_precision)")
    p.add_argument("--out-dir", default=RESULTS)
    p.add_argument("--load-note", default=None, help="say in the results how loaded the machine was")
    args = p.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        p.error(f"--configs: unknown {unknown}; one of {list(CONFIGS)}")
    if args.device == "cpu" and args.precision == "fp16":
        p.error("--precision fp16 on a CPU: there are no fast fp16 matmul kernels there")
    if not args.temperature > 0:
        p.error("--temperature must be > 0 (the rollouts are sampled)")
    if args.stop == "natural" and args.model.startswith("shape:"):
        p.error("--stop natural needs a real model and its tokenizer (smollm2, tiny or an HF directory)")
    if min(args.prompts, args.generations, args.prompt_len, args.completion_len, args.repeats) < 1:
        p.error("--prompts, --generations, --prompt-len, --completion-len and --repeats must be >= 1")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model, pad, vocab, tokenizer = build(args)
    stops = None
    if args.stop == "natural":
        from engine.generate import stop_token_ids

        prompts, stops = quickstart_prompts(tokenizer, args.prompts), stop_token_ids(tokenizer)
    else:
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(min(100, vocab // 2), vocab, (args.prompt_len,), generator=g).tolist()
                   for _ in range(args.prompts)]
    run_once(configs[0], model, prompts[:1], argparse.Namespace(**{**vars(args), "generations": 1,
                                                                   "completion_len": 2}), pad)  # warm up
    times: dict[str, list[float]] = {c: [] for c in configs}
    cpu: dict[str, list[float]] = {c: [] for c in configs}
    generated: dict[str, list[int]] = {c: [] for c in configs}
    for rep in range(args.repeats):
        order = configs[rep % len(configs):] + configs[:rep % len(configs)]
        for kind in order:
            wall, cpu_seconds, tokens = run_once(kind, model, prompts, args, pad, stops)
            times[kind].append(wall)
            cpu[kind].append(cpu_seconds)
            generated[kind].append(tokens)
            print(f"repeat {rep}: {kind:15s} {wall * 1000:9.0f} ms wall {cpu_seconds * 1000:9.0f} ms CPU "
                  f"{tokens} tokens", file=sys.stderr, flush=True)
    base = statistics.median(times["hf_generate"]) if "hf_generate" in times else None
    base_cpu = statistics.median(cpu["hf_generate"]) if "hf_generate" in cpu else None
    rows = []
    for kind in configs:
        t, c = statistics.median(times[kind]), statistics.median(cpu[kind])
        made = statistics.median(generated[kind])
        rows.append({"config": kind, "ms": round(t * 1000, 1), "tokens_per_s": round(made / t, 1),
                     "generated_tokens": made,
                     "speedup_vs_hf_generate": round(base / t, 2) if base else None,
                     "cpu_ms": round(c * 1000, 1),
                     "cpu_speedup_vs_hf_generate": round(base_cpu / c, 2) if base_cpu else None,
                     "runs_ms": [round(x * 1000, 1) for x in times[kind]]})
    meta = {"command": "python benchmarks/rollout_generation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "model": args.model, "method": args.method, "device": args.device, "precision": args.precision,
            "prompts": args.prompts, "generations": args.generations, "stop": args.stop,
            "temperature": args.temperature,
            "prompt_len": args.prompt_len if args.stop == "none" else max(len(p) for p in prompts),
            "completion_len": args.completion_len, "r": args.r, "alpha": args.alpha, "repeats": args.repeats,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "cpu": platform.processor() or platform.machine(),
            "load_average_at_end": os.getloadavg(), "load_note": args.load_note,
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}
    model_name = "dir" if os.path.isdir(args.model) else args.model.replace("shape:", "")
    tag = args.tag or (f"{args.device}_{model_name}_{args.method}_{args.precision}"
                       + ("_natural" if args.stop == "natural" else ""))
    os.makedirs(args.out_dir, exist_ok=True)
    result = {"meta": meta, "rows": rows}
    with open(os.path.join(args.out_dir, f"rollout_generation_{tag}.json"), "w") as f:
        json.dump(result, f, indent=1)
    write_markdown(os.path.join(args.out_dir, f"rollout_generation_{tag}.md"), result)
    print(open(os.path.join(args.out_dir, f"rollout_generation_{tag}.md")).read())
    return 0


def write_markdown(path: str, result: dict) -> None:
    m = result["meta"]
    lines = [f"# Rollout generation: engine vs transformers' generate ({m['device']}, {m['model']}, {m['method']}, "
             f"{m['precision']})", "",
             f"`{m['command']}`", "",
             f"{m['prompts']} prompts x G={m['generations']} = {m['prompts'] * m['generations']} rows, "
             + (f"{m['prompt_len']} prompt + {m['completion_len']} completion tokens each" if m["stop"] == "none" else
                f"the quickstart's held-out prompts (up to {m['prompt_len']} tokens), completions up to "
                f"{m['completion_len']} tokens ending at the end of turn")
             + f", sampled (temperature {m['temperature']}, top-p 1, top-k 0), "
             f"LoRA r={m['r']} alpha={m['alpha']} on every linear (B ~ N(0, 0.002)), median of {m['repeats']} repeats, "
             f"{m['threads']} threads; torch {m['torch']}, transformers {m['transformers']}"
             + (f", {m['gpu']}" if m["gpu"] else "") + ".",
             f"Load average at the end: {', '.join(f'{x:.1f}' for x in m['load_average_at_end'])}"
             + (f" ({m['load_note']})" if m["load_note"] else "") + ".", "",
             "| config | ms per batch (wall) | generated tokens | generated tokens/s | vs hf_generate (wall) | "
             "CPU ms | vs hf_generate (CPU) | wall runs (ms) |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        speedup = f"{r['speedup_vs_hf_generate']:.2f}x" if r["speedup_vs_hf_generate"] else "-"
        cpu_speedup = f"{r['cpu_speedup_vs_hf_generate']:.2f}x" if r["cpu_speedup_vs_hf_generate"] else "-"
        lines.append(f"| {r['config']} | {r['ms']:.0f} | {r['generated_tokens']:.0f} | {r['tokens_per_s']:.1f} | "
                     f"{speedup} | {r['cpu_ms']:.0f} | "
                     f"{cpu_speedup} | {', '.join(f'{x:.0f}' for x in r['runs_ms'])} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
