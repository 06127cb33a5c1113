"""Quantization speed of the GGUF writer's block quantizers: weights per second on this CPU.

One random [rows, 4096] fp32 weight (normal, std 0.02), quantized the way engine/export/gguf.py
does it, in blocks of ~4 MiB of fp32 rows:
  q4_k / q5_k / q6_k   engine/export/kquants.py (llama.cpp's reference algorithms in NumPy)
  q8_0 / q4_0 / q5_0   gguf-py's quantizer (the baseline the K-quants are measured against)
Each type runs `--repeats` times; the row is the best wall time, and the process CPU time of that run
(all threads; on a shared machine wall time is inflated by other jobs, CPU time much less). K-quants
split rows over the CPUs this process may use. An 8B model (~7.5e9 weights in its 2-D tensors)
takes 7.5e9 / (weights/s) seconds for a file of one type; per core, 7.5e9 / (weights per CPU-second).

    python benchmarks/gguf_quantize.py              # writes benchmarks/results/gguf_quantize.{json,md}
    python benchmarks/gguf_quantize.py --quick      # 256 rows, one repeat, not saved
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
sys.path.insert(0, ROOT)
EIGHT_B = 7.5e9


def main() -> None:
    import gguf

    from engine.export.gguf import _encode, BLOCK_BYTES
    from engine.export.safetensors_io import row_blocks
    import torch

    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    rows, repeats = (256, 1) if args.quick else (args.rows, args.repeats)
    weight = torch.from_numpy(np.random.default_rng(0).standard_normal((rows, 4096)).astype(np.float32) * 0.02)
    T = gguf.GGMLQuantizationType
    results = []
    for name, qtype in (("q4_k", T.Q4_K), ("q5_k", T.Q5_K), ("q6_k", T.Q6_K), ("q8_0", T.Q8_0), ("q4_0", T.Q4_0),
                        ("q5_0", T.Q5_0)):
        best, cpu = float("inf"), 0.0
        for _ in range(repeats):
            started, cpu_started = time.perf_counter(), time.process_time()
            for a, b in row_blocks(tuple(weight.shape), BLOCK_BYTES):
                _encode(weight[a:b], qtype)
            if time.perf_counter() - started < best:
                best, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        rate, per_cpu = weight.numel() / best, weight.numel() / cpu
        results.append({"type": name, "weights": weight.numel(), "seconds": round(best, 3), "cpu_seconds": round(cpu, 3),
                        "weights_per_s": round(rate), "weights_per_cpu_s": round(per_cpu),
                        "eight_b_minutes": round(EIGHT_B / rate / 60, 1),
                        "eight_b_cpu_minutes": round(EIGHT_B / per_cpu / 60, 1)})
        print(f"{name:5s} {rate / 1e6:7.2f} M weights/s wall, {per_cpu / 1e6:7.2f} M per CPU-second   (an 8B: "
              f"~{EIGHT_B / rate / 60:.0f} min here, ~{EIGHT_B / per_cpu / 60:.0f} CPU-minutes)", flush=True)
    if args.quick:
        return
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    meta = {"cpu": platform.processor() or platform.machine(), "cpus": threads, "numpy": np.__version__,
            "load_average": os.getloadavg()[0],
            "shape": [rows, 4096], "note": "best of repeats on a shared machine (2 cores, other jobs running)"}
    with open(os.path.join(RESULTS, "gguf_quantize.json"), "w") as f:
        json.dump({"meta": meta, "rows": results}, f, indent=2)
    with open(os.path.join(RESULTS, "gguf_quantize.md"), "w") as f:
        f.write("# GGUF quantization speed (python benchmarks/gguf_quantize.py)\n\n")
        f.write(f"{meta}\n\n| type | M weights/s (wall) | M weights per CPU-second | 8B model, minutes (wall here) "
                f"| 8B model, CPU-minutes |\n|---|---|---|---|---|\n")
        for r in results:
            f.write(f"| {r['type']} | {r['weights_per_s'] / 1e6:.2f} | {r['weights_per_cpu_s'] / 1e6:.2f} | "
                    f"{r['eight_b_minutes']} | {r['eight_b_cpu_minutes']} |\n")


if __name__ == "__main__":
    main()
