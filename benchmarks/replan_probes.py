"""The current planner against stored GPU probe measurements (no GPU needed).

    python benchmarks/replan_probes.py benchmarks/results/gpu/throughput_t4_*_probe.json \
        --out benchmarks/results/planner_vs_h200_probes.md

Each probe JSON (benchmarks/throughput.py --probe) holds, per sequence length, the measured
torch.cuda.max_memory_allocated of one training step and the prediction of the planner of its day.
This predicts each step again with engine.plan as it is now (the probe's settings: QLoRA r16
all-linear, fp16, checkpointing, chunked loss, offload unless the probe says otherwise, its tiles)
and compares the allocated part (total less CUDA context and allocator slack) with the measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GiB = 2**30


def replan(path: str) -> list[dict]:
    from engine.plan import known_config, predict

    data = json.load(open(path))
    name = os.path.basename(path).replace("throughput_t4_", "").replace("_probe.json", "").replace("_tiled", "")
    config = known_config(name)
    rows = []
    for t in data["tries"]:
        if not t.get("measured_bytes"):
            continue
        b = predict(config, seq_len=t["seq_len"], micro_batch=1, method="qlora", r=16, targets="all-linear",
                    precision=data.get("precision", "fp16"), activation_checkpointing=True,
                    offload_activations=data.get("offload", True), chunked_loss=True, loss_chunk_size=1024,
                    masked=False, mlp_tile_tokens=data.get("mlp_tile_tokens", 0),
                    norm_tile_tokens=data.get("norm_tile_tokens", 0), cuda=True)
        now = b.total - b.allocator_slack - b.cuda_context
        rows.append({"file": os.path.basename(path), "seq_len": t["seq_len"], "measured": t["measured_bytes"],
                     "then": t.get("predicted_bytes"), "now": now, "dominant": b.dominant})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("probes", nargs="+")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    command = "python benchmarks/replan_probes.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [f"Command: `{command}`", "",
             "| probe | tokens | measured GiB | planner then GiB | planner now GiB | now - measured | largest term now |",
             "|---|---|---|---|---|---|---|"]
    for path in args.probes:
        for r in replan(path):
            then = f"{r['then'] / GiB:.2f} ({r['then'] / r['measured'] - 1:+.0%})" if r["then"] else "-"
            lines.append(f"| {r['file']} | {r['seq_len']} | {r['measured'] / GiB:.2f} | {then} | {r['now'] / GiB:.2f} | "
                         f"{r['now'] / r['measured'] - 1:+.1%} | {r['dominant']} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
