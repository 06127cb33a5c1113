"""Packed attention, one layer: the memory each kernel adds over the bare q, k, v and output, and its calls.

    python benchmarks/attention_memory.py                                  # CPU: 4k / 16k / 32k tokens
    python benchmarks/attention_memory.py --device cuda --heads 32 --kv-heads 32 --head-dim 96  # Phi-3-mini's

One packed row of T tokens (documents of seeded random lengths in [--min-doc, --max-doc], the last
one cut to fill the row), q, k, v as transformers hands them to attention ([1, H, T, D] views of
[1, T, H, D] storage), run through `engine.model.attention.packed_attention` with each kernel the
speed plan can choose on this device, forward and backward:

    bare  = bytes of out + dq + dk + dv      what any attention of this layer must produce
    peak  = most bytes allocated inside forward + backward and alive at once
            (CPU: a dispatch-mode tally of tensor storage, engine/speed/measure.py::AllocatedBytes;
             CUDA: torch.cuda.max_memory_allocated over what was allocated before)
    extra = peak - bare                      what the packed path adds: per-document copies, repeated
                                             K/V heads, a token-major layout, softmax statistics, ...
and the attention kernels it launches (forward + backward, engine/speed/measure.py::AttentionCalls),
and the median wall time of forward + backward over --iters runs (on a CPU with host memory retained,
as the engine's CPU training runs: engine/speed/host_memory.py). Kernels: `per_document` (the
core's reference, one SDPA per document), `short` (CPU bf16: short documents as explicit matmuls),
`nested_sdpa` and `flash_varlen` (CUDA, where the plan would choose them), and `dense` for contrast
(transformers' SDPA over the whole row with a [1, 1, T, T] block-diagonal mask, what a padding-free
HF run does; the mask is built outside the measurement, its bytes are a column of their own; rows
up to --dense-max tokens). Writes benchmarks/results/attention_memory_<tag>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, "benchmarks", "results")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from engine.model.attention import packed_attention, sdpa_per_document  # noqa: E402
from engine.model.packing import PackingContext  # noqa: E402
from engine.speed import cuda_attention, host_memory  # noqa: E402
from engine.speed.cpu_attention import short_document_kernel  # noqa: E402
from engine.speed.measure import AllocatedBytes, AttentionCalls  # noqa: E402
from engine.speed.plan import SHORT_ATTENTION_MAX_LEN  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Layer(nn.Module):
    """The attributes transformers' attention functions read from a layer."""

    def __init__(self, heads: int, kv_heads: int):
        super().__init__()
        self.num_key_value_groups, self.is_causal = heads // kv_heads, True


def doc_lengths(tokens: int, low: int, high: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    lengths, total = [], 0
    while total < tokens:
        n = min(int(torch.randint(low, high + 1, (1,), generator=g)), tokens - total)
        lengths.append(n)
        total += n
    return lengths


def kernels_for(device: torch.device, precision: str) -> dict:
    """name -> kernel for packed_attention (None: the dense masked path)."""
    kernels = {"per_document": sdpa_per_document}
    if device.type == "cpu" and precision == "bf16":
        kernels["short"] = short_document_kernel(SHORT_ATTENTION_MAX_LEN, batched=True)
    capability = cuda_attention.cuda_capability(device)
    if capability is not None:
        features = cuda_attention.torch_attention_features()
        chosen, _ = cuda_attention.choose_varlen_attention(capability, precision, features)
        if chosen == "flash_varlen" and features.nested_sdpa:  # the T4's kernel, beside it
            kernels["nested_sdpa"] = cuda_attention.nested_sdpa_kernel()
        if chosen:
            kernels[chosen] = cuda_attention.KERNELS[chosen]()
    kernels["dense"] = None
    return kernels


def block_mask(lengths: list[int], device) -> torch.Tensor:
    """[1, 1, T, T] bool: causal inside each document, nothing across (what transformers builds)."""
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    i = torch.arange(len(doc), device=device)
    return ((doc[:, None] == doc[None, :]) & (i[None, :] <= i[:, None]))[None, None]


def measure(name: str, kernel, lengths: list[int], args, device: torch.device, dtype: torch.dtype) -> dict:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    T, H, H_kv, D = sum(lengths), args.heads, args.kv_heads, args.head_dim
    g = torch.Generator(device=device).manual_seed(0)
    # [1, T, h, D] storage seen as [1, h, T, D]: the layout transformers hands to attention
    q, k, v = (torch.randn(1, T, h, D, device=device, dtype=dtype, generator=g).transpose(1, 2).requires_grad_()
               for h in (H, H_kv, H_kv))
    grad = torch.randn(1, T, H, D, device=device, dtype=dtype, generator=g)
    layer = Layer(H, H_kv)
    packing = PackingContext([lengths], torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), T, 0)
    packing = packing.to(device)
    mask = block_mask(lengths, device) if kernel is None else None

    def attention():
        if kernel is None:
            return sdpa_attention_forward(layer, q, k, v, mask)[0]
        return packed_attention(layer, q, k, v, None, packing=packing, kernel=kernel)[0]

    def step():
        for t in (q, k, v):
            t.grad = None
        out = attention()
        out.backward(grad)
        return out

    bare = sum(t.numel() * t.element_size() for t in (grad, q, k, v))  # out (as grad) + dq + dk + dv
    step()  # warm up (kernel choice, allocator)
    for t in (q, k, v):
        t.grad = None
    with AttentionCalls() as calls:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            out = step()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - before
        else:
            with AllocatedBytes() as allocated:
                out = step()
            peak = allocated.peak
    del out
    times = []
    for _ in range(args.iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return {"tokens": T, "documents": len(lengths), "kernel": name, "calls_forward": calls.forward,
            "calls_backward": calls.backward, "peak_bytes": peak, "bare_bytes": bare, "extra_bytes": peak - bare,
            "mask_bytes": mask.numel() * mask.element_size() if mask is not None else 0,
            "ms": 1e3 * statistics.median(times)}


def write_markdown(path: str, result: dict) -> None:
    meta = result["meta"]
    mib = 2 ** 20
    lines = [f"# Packed attention, one layer: extra memory and kernel calls ({meta['tag']})", "",
             f"Date: {meta['date']}  ", f"Command: `{meta['command']}`  ",
             f"Machine: {meta['machine']}; torch {meta['torch']}, {meta['threads']} threads  ",
             f"Shape: {meta['heads']} query heads, {meta['kv_heads']} K/V heads, head_dim {meta['head_dim']}, "
             f"{meta['precision']}; one packed row, documents of {meta['min_doc']}-{meta['max_doc']} tokens "
             "(seeded), the last cut to fill the row", "",
             "bare = out + dq + dk + dv; peak = most bytes allocated inside forward + backward and alive at once; "
             "extra = peak - bare (what the packed path adds). Calls: attention kernels launched, forward + "
             "backward (the short kernel's explicit matmuls launch none).", "",
             f"1-minute load average {min(meta['load_average']):.1f}-{max(meta['load_average']):.1f} during the run "
             f"on {os.cpu_count()} logical CPUs: where it exceeds the threads, other processes shared them and the "
             "times are noisy (bytes and calls are not).", "",
             "| tokens | documents | kernel | attention calls (fwd + bwd) | bare MiB | peak MiB | extra MiB | "
             "extra / bare | mask MiB | ms fwd + bwd |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['tokens']} | {r['documents']} | {r['kernel']} | error: {r['error'][:80]} "
                         "| | | | | | |")
            continue
        lines.append(f"| {r['tokens']} | {r['documents']} | {r['kernel']} | {r['calls_forward']} + "
                     f"{r['calls_backward']} | {r['bare_bytes'] / mib:.1f} | {r['peak_bytes'] / mib:.1f} | "
                     f"{r['extra_bytes'] / mib:.1f} | {r['extra_bytes'] / r['bare_bytes']:.2f} | "
                     f"{r['mask_bytes'] / mib:.1f} | {r['ms']:.1f} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto", choices=("auto", *DTYPES),
                   help="auto: bf16 (a CPU's kernels pay in bf16; sm80+), fp16 on older GPUs")
    p.add_argument("--tokens", default="4096,16384,32768", help="row lengths, comma-separated")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--min-doc", type=int, default=32)
    p.add_argument("--max-doc", type=int, default=768)
    p.add_argument("--kernels", default="", help="only these (default: every kernel this device has)")
    p.add_argument("--dense-max", type=int, default=16384, help="the dense masked row up to this many tokens")
    p.add_argument("--iters", type=int, default=1, help="timed forward + backward runs (median)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--tag", default=None)
    p.add_argument("--out-dir", default=RESULTS)
    args = p.parse_args(argv)
    if args.heads % args.kv_heads:
        p.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if host_memory.choose("auto", args.device.split(":")[0], []):
        host_memory.retain()  # as a CPU training run does: freed buffers stay in the heap for the next run
    device = torch.device(args.device)
    capability = cuda_attention.cuda_capability(device)
    if args.precision == "auto":
        args.precision = "fp16" if capability is not None and capability[0] < 8 else "bf16"
    dtype = DTYPES[args.precision]
    kernels = kernels_for(device, args.precision)
    if args.kernels:
        kernels = {k: v for k, v in kernels.items() if k in args.kernels.split(",")}
    rows, load = [], [os.getloadavg()[0]]
    for tokens in (int(t) for t in args.tokens.split(",")):
        lengths = doc_lengths(tokens, args.min_doc, args.max_doc)
        for name, kernel in kernels.items():
            if kernel is None and tokens > args.dense_max:
                continue
            try:
                row = measure(name, kernel, lengths, args, device, dtype)
            except torch.OutOfMemoryError as err:
                row = {"tokens": tokens, "documents": len(lengths), "kernel": name, "error": str(err).splitlines()[0]}
            rows.append(row)
            load.append(os.getloadavg()[0])
            print(json.dumps(row), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    machine = f"{platform.machine()} {os.cpu_count()} logical CPUs"
    if capability is not None:
        machine += f", {torch.cuda.get_device_name(device)} (sm{capability[0]}{capability[1]})"
    tag = args.tag or f"{device.type}_{args.precision}"
    meta = {"tag": tag, "date": datetime.date.today().isoformat(),
            "command": "python benchmarks/attention_memory.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": machine, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "precision": args.precision,
            "min_doc": args.min_doc, "max_doc": args.max_doc, "load_average": load}
    result = {"meta": meta, "rows": rows}
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"attention_memory_{tag}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    write_markdown(stem + ".md", result)
    print(open(stem + ".md").read())
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
