"""Packed-row attention on a CPU in bf16: SDPA per document vs ShortCausalAttention, per layer.

    python benchmarks/attention_cpu.py                      # SmolLM2-135M shapes, 7 documents
    python benchmarks/attention_cpu.py --lengths 64,64,128,256,512 --heads 32 --kv-heads 8 --head-dim 128

Times one layer's attention forward + backward over one packed row (the documents' q, k, v as
transformers hands them to engine/model/attention.py: [1, H, T, D] views of a [1, T, H, D] tensor),
the way the speed switch `short_attention` switches it: PyTorch's causal SDPA per document (K/V heads
repeated, as transformers' SDPA path does) against `ShortCausalAttention`. Also reports each
one's relative error against an fp64 reference (output and the three gradients). Median of
--repeats timings of --iters calls each. Writes benchmarks/results/attention_cpu[_TAG].{json,md}.
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
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def row_inputs(lengths, heads, kv_heads, head_dim, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    # [1, T, H, D] storage seen as [1, H, T, D], the layout transformers passes to attention
    q, k, v = (torch.randn(1, T, h, head_dim, dtype=torch.float64, generator=g).transpose(1, 2)
               for h in (heads, kv_heads, kv_heads))
    grad = torch.randn(1, heads, T, head_dim, dtype=torch.float64, generator=g)
    return q, k, v, grad


def sdpa_row(q, k, v, lengths):
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = q.shape[1] // k.shape[1]
    outs = [torch.nn.functional.scaled_dot_product_attention(a, repeat_kv(b, groups), repeat_kv(c, groups),
                                                             is_causal=True)
            for a, b, c in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2))]
    return torch.cat(outs, 2)


def short_row(q, k, v, lengths):
    import torch

    from engine.speed.cpu_attention import ShortCausalAttention, causal_bias

    groups = q.shape[1] // k.shape[1]
    cache: dict = {}
    outs = [ShortCausalAttention.apply(a[0], b[0], c[0], q.shape[-1] ** -0.5,
                                       causal_bias(a.shape[2], groups, a.dtype, a.device, cache))[None]
            for a, b, c in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2))]
    return torch.cat(outs, 2)


def run(fn, inputs, grad, lengths, dtype):
    """(output, dq, dk, dv) of one forward + backward in `dtype`, as fp64."""
    import torch

    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    out = fn(*leaves, lengths)
    grads = torch.autograd.grad(out, leaves, grad.to(dtype))  # the kernel's own backward, nothing else
    return [out.detach().double()] + [g.double() for g in grads]


def time_it(fn, inputs, grad, lengths, iters, repeats) -> list[float]:
    import torch

    leaves = [t.detach().to(torch.bfloat16).requires_grad_() for t in inputs]
    g = grad.to(torch.bfloat16)
    for _ in range(3):
        torch.autograd.grad(fn(*leaves, lengths), leaves, g)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.autograd.grad(fn(*leaves, lengths), leaves, g)
        times.append((time.perf_counter() - t0) / iters)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="131,176,163,148,162,120,124",
                   help="document lengths of the packed row (default: a 1,024-token quickstart-like row)")
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tag", default=None)
    p.add_argument("--out-dir", default=RESULTS)
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.heads % args.kv_heads:
        p.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    inputs_and_grad = row_inputs(lengths, args.heads, args.kv_heads, args.head_dim)
    inputs, grad = inputs_and_grad[:3], inputs_and_grad[3]
    ref = run(sdpa_row, inputs, grad, lengths, torch.float64)
    rows = []
    for name, fn in (("SDPA per document (PyTorch's CPU flash kernel)", sdpa_row),
                     ("ShortCausalAttention (speed switch short_attention)", short_row)):
        times = time_it(fn, inputs, grad, lengths, args.iters, args.repeats)
        got = run(fn, inputs, grad, lengths, torch.bfloat16)
        errors = [((a - b).norm() / b.norm()).item() for a, b in zip(got, ref)]
        rows.append({"name": name, "ms": 1e3 * statistics.median(times), "ms_all": [1e3 * t for t in times],
                     "rel_err": dict(zip(("out", "dq", "dk", "dv"), errors))})
    speedup = rows[0]["ms"] / rows[1]["ms"]
    tag = "attention_cpu" + (f"_{args.tag}" if args.tag else "")
    meta = {"command": "python benchmarks/attention_cpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": f"{platform.machine()} {os.cpu_count()} logical CPUs", "torch": torch.__version__,
            "threads": torch.get_num_threads(), "lengths": lengths, "heads": args.heads,
            "kv_heads": args.kv_heads, "head_dim": args.head_dim, "rows": rows, "speedup": speedup}
    lines = [f"# Packed-row attention on a CPU, bf16, one layer forward + backward ({tag})", "",
             f"Command: `{meta['command']}`  ",
             f"Machine: {meta['machine']}; torch {meta['torch']}; threads {meta['threads']}  ",
             f"Row: documents of {lengths} tokens ({sum(lengths)} in all); {args.heads} query heads, "
             f"{args.kv_heads} K/V heads of {args.head_dim}. Median of {args.repeats} x {args.iters} calls.", "",
             "| attention | ms per layer | rel. error vs fp64: out | dq | dk | dv |", "|---|---|---|---|---|---|"]
    for r in rows:
        e = r["rel_err"]
        lines.append(f"| {r['name']} | {r['ms']:.2f} | {e['out']:.4f} | {e['dq']:.4f} | {e['dk']:.4f} | {e['dv']:.4f} |")
    lines += ["", f"ShortCausalAttention: {speedup:.2f}x faster per layer."]
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, tag + ".json"), "w") as f:
        json.dump(meta, f, indent=1)
    with open(os.path.join(args.out_dir, tag + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
