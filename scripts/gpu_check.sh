#!/usr/bin/env bash
# The GPU check: one prepared script for a CUDA machine without network access (torch and
# transformers installed; bitsandbytes / hydra may arrive as an unpacked folder .whl/site or as
# wheels in .whl/ beside the checkout).
#
#   bash scripts/gpu_check.sh              # on the GPU machine; results in benchmarks/results/gpu/
#   bash scripts/gpu_check.sh --dry-run    # the same Python steps on this CPU with tiny shapes
#
# Steps, most important first; each bounded by `timeout`, and a step is skipped when the
# script's budget (GPU_CHECK_BUDGET_S, default 480 s) would be overrun, so the whole script ends
# well inside one 10-minute device call:
#   1. throughput in "T4 mode" (fp16 autocast, memory capped at 14.7 GiB, activation checkpointing
#      on for both, as the seed and every 16 GB QLoRA recipe use it): engine vs HF Trainer +
#      PEFT (padded to longest, padding-free) on a random-initialised Llama-3.1-8B-shaped QLoRA
#      model at 2k tokens (benchmarks/throughput.py --t4);
#   2. the longest sequence whose step fits 14.7 GiB with every memory switch on (chunked loss,
#      activation checkpointing + offload, fused LoRA), with the planner's prediction
#      (engine.plan.predict) next to each measured max_memory_allocated (--probe), 8B shape;
#      then the same with the sequence-tiled MLP and RMSNorms (train.mlp_tile_tokens /
#      norm_tile_tokens=auto; issue 22: >= 48k tokens planned within 10% of measured);
#   3. step 1 on the Phi-3-mini shape;  4. scripts/gpu_check_fsdp.sh (not in --dry-run);
#   5. step 2 on the Phi-3-mini shape;  6. planner vs measured: a table from the probes' JSON;
#   7. the compiled kernels (speed.compile, off by default on a GPU until
#      measured): engine vs engine_compiled on the Phi-3-mini shape.
# On the device tool's machine ($OUT set) the results go to a scratch folder that is tarred into
# $OUT/gpu_check.tgz after every step, so a call cut short still returns what it measured.
set -uo pipefail

DRY_RUN=0
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

if [ -d .whl/site ]; then export PYTHONPATH="$REPO/.whl/site${PYTHONPATH:+:$PYTHONPATH}"; fi
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=python3
if ! python -c "import torch" >/dev/null 2>&1; then  # the FSDP check calls `python`: make it python3
    mkdir -p /tmp/gpu_check_bin && ln -sf "$(command -v python3)" /tmp/gpu_check_bin/python && export PATH="/tmp/gpu_check_bin:$PATH"
fi

if [ -n "${OUT:-}" ] && [ "$DRY_RUN" = 0 ]; then RES=/tmp/gpu_check; else RES="$REPO/benchmarks/results/gpu"; fi
[ "$DRY_RUN" = 1 ] && RES="${DRY_RUN_OUT:-/tmp/gpu_check_dry_run}"
mkdir -p "$RES"
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-480}
status=0

if [ "$DRY_RUN" = 1 ]; then
    DEVICE=(--device cpu)
    LLAMA=shape:tiny-llama; PHI3=shape:tiny-phi3
    SEQ=256; PROBE=(--probe-start 256 --probe-max 1024); STEPS=(--warmup 1 --steps 1 --repeats 1)
    PROBE_TILED=()
    T_BENCH=100; T_PROBE=60
else
    DEVICE=(--device cuda --t4)
    LLAMA=shape:llama-3.1-8b; PHI3=shape:phi-3-mini
    SEQ=2048; PROBE=(--probe-start 4096 --probe-max 131072); STEPS=(--warmup 1 --steps 3 --repeats 1)
    PROBE_TILED=(--probe-start 32768)  # the untiled probe's answer is ~30k: start the tiled one there
    T_BENCH=75; T_PROBE=120
fi

save() {  # what has been measured so far travels back even if the call is cut short
    if [ -n "${OUT:-}" ] && [ "$DRY_RUN" = 0 ]; then tar czf "$OUT/gpu_check.tgz" -C "$(dirname "$RES")" "$(basename "$RES")"; fi
}
fits_budget() {  # fits_budget SECONDS: is there time left for a step bounded by SECONDS?
    local left=$(( BUDGET - ($(date +%s) - START) ))
    if [ "$1" -gt "$left" ]; then echo "SKIP: needs up to $1 s, $left s left of the $BUDGET s budget"; return 1; fi
}

echo "== environment"
$PY - <<'EOF' | tee "$RES/environment.txt"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.1f} GiB", f"sm{p.major}{p.minor}")
for name in ("transformers", "peft", "bitsandbytes", "hydra"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:  # noqa: BLE001
        print(name, "NOT AVAILABLE:", type(e).__name__, e)
EOF
save

throughput() {  # throughput MODEL: engine vs HF + PEFT, T4 mode
    local name="${1#shape:}" t=$((T_BENCH * 3 + 45))
    echo "== throughput, T4 mode, engine vs HF Trainer + PEFT ($1, QLoRA, $SEQ tokens)"
    fits_budget "$t" || return 0
    timeout -k 10 "$t" $PY benchmarks/throughput.py "${DEVICE[@]}" --model "$1" --method qlora \
        --data synthetic --seq-len "$SEQ" --checkpointing --configs engine,hf_padded,hf_flat "${STEPS[@]}" \
        --timeout "$T_BENCH" --tag "t4_${name}_${SEQ}" --out-dir "$RES" \
        || { echo "FAIL: throughput $1"; status=1; }
    save
}
probe() {  # probe MODEL [TAG_SUFFIX ARGS...]: the longest sequence that fits, planner next to measured
    local model="$1" name="${1#shape:}" suffix="${2:-}"
    shift; [ $# -gt 0 ] && shift
    echo "== longest sequence in 14.7 GiB, all memory switches on ($model${suffix:+, $suffix}: $*)"
    fits_budget $((T_PROBE + 20)) || return 0
    timeout -k 10 $((T_PROBE + 20)) $PY benchmarks/throughput.py "${DEVICE[@]}" --model "$model" --method qlora --probe \
        "${PROBE[@]}" "$@" --timeout "$T_PROBE" --tag "t4_${name}${suffix}_probe" --out-dir "$RES" \
        || { echo "FAIL: probe $model $suffix"; status=1; }
    save
}

throughput "$LLAMA"
probe "$LLAMA"
probe "$LLAMA" _tiled --mlp-tile-tokens auto --norm-tile-tokens auto "${PROBE_TILED[@]}"
throughput "$PHI3"
if [ "$DRY_RUN" = 0 ] && [ -z "${SKIP_FSDP:-}" ] && [ -f scripts/gpu_check_fsdp.sh ]; then
    echo "== FSDP check (scripts/gpu_check_fsdp.sh)"
    if fits_budget 150; then
        timeout -k 10 150 bash scripts/gpu_check_fsdp.sh "$RES/fsdp" \
            || { echo "FAIL: fsdp check"; status=1; }
        save
    fi
fi
probe "$PHI3"

echo "== planner vs measured"
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

echo "== compiled kernels: engine vs engine_compiled ($PHI3)"
if fits_budget $((T_BENCH * 2 + 60)); then
    timeout -k 10 $((T_BENCH * 2 + 60)) $PY benchmarks/throughput.py "${DEVICE[@]}" --model "$PHI3" --method qlora \
        --data synthetic --seq-len "$SEQ" --checkpointing --configs engine,engine_compiled "${STEPS[@]}" \
        --timeout "$((T_BENCH + 60))" --tag "t4_${PHI3#shape:}_${SEQ}_compiled" --out-dir "$RES" \
        || { echo "FAIL: compiled kernels $PHI3"; status=1; }
    save
fi

echo "== done in $(( $(date +%s) - START )) s, status $status; results in $RES"
ls -la "$RES"
save
exit $status
