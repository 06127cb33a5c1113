#!/usr/bin/env bash
# The GPU check: one prepared script for a CUDA machine without network access (torch and
# transformers installed; bitsandbytes / peft may arrive as wheels in .whl/ beside the checkout).
#
#   bash scripts/gpu_check.sh              # on the GPU machine; results in $OUT (or benchmarks/results/gpu/)
#   bash scripts/gpu_check.sh --dry-run    # the same Python steps on this CPU with tiny shapes
#
# Steps (each bounded by `timeout`, the whole script < 8 minutes on an H100):
#   1. throughput in "T4 mode" (fp16 autocast, memory capped at 14.7 GiB, activation checkpointing
#      on for both, as the seed and every 16 GB QLoRA recipe use it): engine vs HF Trainer +
#      PEFT (padded to longest, padding-free) on random-initialised Llama-3.1-8B- and
#      Phi-3-mini-shaped QLoRA models at 2k tokens (benchmarks/throughput.py --t4);
#   2. the longest sequence whose step fits 14.7 GiB with every memory switch on (chunked loss,
#      activation checkpointing + offload, fused LoRA), with the planner's prediction
#      (engine.plan.predict) next to each measured max_memory_allocated (--probe);
#   3. planner vs measured: a table of predicted / measured GiB from step 2's JSON;
#   4. scripts/gpu_check_fsdp.sh when present (not in --dry-run).
# Everything is written as JSON (+ markdown) into $OUT/gpu_check/ (or benchmarks/results/gpu/).
set -uo pipefail

DRY_RUN=0
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PY=python3

if [ -n "${OUT:-}" ]; then RES="$OUT/gpu_check"; else RES="$REPO/benchmarks/results/gpu"; fi
[ "$DRY_RUN" = 1 ] && RES="${DRY_RUN_OUT:-/tmp/gpu_check_dry_run}"
mkdir -p "$RES"
START=$(date +%s)
status=0

if [ "$DRY_RUN" = 1 ]; then
    DEVICE=(--device cpu)
    MODELS="shape:tiny-llama shape:tiny-phi3"
    SEQ=256; PROBE=(--probe-start 256 --probe-max 1024); STEPS=(--warmup 1 --steps 1 --repeats 1)
    T_BENCH=600; T_PROBE=300
else
    DEVICE=(--device cuda --t4)
    MODELS="shape:llama-3.1-8b shape:phi-3-mini"
    SEQ=2048; PROBE=(--probe-start 4096 --probe-max 131072); STEPS=(--warmup 1 --steps 3 --repeats 1)
    T_BENCH=150; T_PROBE=150
fi

echo "== environment"
$PY - <<'EOF' | tee "$RES/environment.txt"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.1f} GiB", f"sm{p.major}{p.minor}")
for name in ("transformers", "peft", "bitsandbytes"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:  # noqa: BLE001
        print(name, "NOT AVAILABLE:", type(e).__name__, e)
EOF

echo "== 1. throughput, T4 mode, engine vs HF Trainer + PEFT (QLoRA, $SEQ tokens)"
for model in $MODELS; do
    name="${model#shape:}"
    timeout $((T_BENCH * 3 + 60)) $PY benchmarks/throughput.py "${DEVICE[@]}" --model "$model" --method qlora \
        --data synthetic --seq-len "$SEQ" --checkpointing --configs engine,hf_padded,hf_flat "${STEPS[@]}" \
        --timeout "$T_BENCH" --tag "t4_${name}_${SEQ}" --out-dir "$RES" \
        || { echo "FAIL: throughput $model"; status=1; }
done

echo "== 2. longest sequence in 14.7 GiB, all memory switches on"
for model in $MODELS; do
    name="${model#shape:}"
    timeout $((T_PROBE + 30)) $PY benchmarks/throughput.py "${DEVICE[@]}" --model "$model" --method qlora --probe \
        "${PROBE[@]}" --timeout "$T_PROBE" --tag "t4_${name}_probe" --out-dir "$RES" \
        || { echo "FAIL: probe $model"; status=1; }
done

echo "== 3. planner vs measured"
$PY - "$RES" <<'EOF' || status=1
import glob, json, os, sys
res = sys.argv[1]
rows = []
for path in sorted(glob.glob(os.path.join(res, "throughput_*_probe.json"))):
    data = json.load(open(path))
    for t in data.get("tries", []):
        m, p = t.get("measured_bytes"), t.get("predicted_bytes")
        pt = t.get("predicted_total_bytes")
        rows.append({"file": os.path.basename(path), "seq_len": t["seq_len"], "fits": t["fits"],
                     "predicted_total_gib": pt / 2**30 if pt else None,
                     "measured_gib": m / 2**30 if m else None, "predicted_gib": p / 2**30 if p else None,
                     "error_pct": 100 * (p - m) / m if (m and p) else None})
json.dump(rows, open(os.path.join(res, "planner_vs_measured.json"), "w"), indent=2)
lines = ["max_memory_allocated vs the planner's allocated part (its total adds CUDA context + allocator slack);",
         "on a --dry-run CPU the measured column is the process's peak RSS, not comparable.", "",
         "| run | seq_len | fits | measured GiB | predicted GiB | predicted - measured | predicted total GiB |",
         "|---|---|---|---|---|---|---|"]
for r in rows:
    f = lambda x, fmt: (fmt % x) if x is not None else "-"
    lines.append(f"| {r['file']} | {r['seq_len']} | {r['fits']} | {f(r['measured_gib'], '%.2f')} | "
                 f"{f(r['predicted_gib'], '%.2f')} | {f(r['error_pct'], '%+.0f%%')} | {f(r['predicted_total_gib'], '%.2f')} |")
open(os.path.join(res, "planner_vs_measured.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
if not rows:
    sys.exit("no probe results to compare")
EOF

if [ "$DRY_RUN" = 0 ] && [ -f scripts/gpu_check_fsdp.sh ]; then
    echo "== 4. FSDP check (scripts/gpu_check_fsdp.sh)"
    # shellcheck source=/dev/null
    source scripts/gpu_check_fsdp.sh && gpu_check_fsdp "$RES/fsdp" || { echo "FAIL: fsdp check"; status=1; }
fi

echo "== done in $(( $(date +%s) - START )) s, status $status; results in $RES"
ls -la "$RES"
exit $status
