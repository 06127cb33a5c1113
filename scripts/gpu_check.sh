#!/usr/bin/env bash
# The GPU check: one prepared command for a CUDA machine without network access, under 8 minutes.
#
#   bash scripts/gpu_wheels.sh             # here, once: the packages the GPU machine lacks, in .whl/
#   bash scripts/gpu_check.sh              # there (carry .whl); results in benchmarks/results/gpu/DATE/
#   bash scripts/gpu_check.sh --dry-run    # the same Python steps on this CPU with tiny shapes
#
# Steps, most important first; each bounded by `timeout`, and a step is skipped (SKIP, with the
# reason) when the script's budget (GPU_CHECK_BUDGET_S, default 480 s) would be overrun:
#   1. the GPU tests (pytest -m gpu): training runs under torch.cuda.set_sync_debug_mode with no
#      synchronising call between log steps (LoRA / QLoRA, fp16 / bf16; bf16 on sm80+ replays CUDA
#      graphs), one attention kernel call per layer per forward with the plan's varlen kernel, its
#      numerics; CUDA graph replays against eager steps (tests/speed/test_cuda_graphs.py);
#   1b. the speed plan's kernel self-check on this GPU (verdicts and cost, fp16 and bf16, one block of
#      Gemma-2-2B / Llama-3.1-8B widths) and an fp16 LoRA run of a Gemma-2-shaped model whose MLP
#      overflows fp16, with the guard (trains, follows fp32), without it (must fail), and in fp32
#      (scripts/gpu_guard_check.py);
#   1c. host cost per step (benchmarks/host_cost.py): host ms (time to issue the step), GPU ms (CUDA
#      events) and aten ops per step, engine vs transformers + PEFT, bf16, checkpointing, LoRA r16 on
#      every linear, 128-token rows, with and without the fused blocks (speed.disable=[fused_blocks]),
#      and with CUDA graphs (--cuda-graphs: each micro-batch replayed from its shape bucket's graph,
#      speed.cuda_graphs; the eager rows are the "without"), on the Phi-3-mini and Llama-3.1-8B shapes
#      (real widths);
#   2. throughput in "T4 mode" (fp16, memory capped at 14.7 GiB, activation checkpointing, as every
#      16 GB QLoRA recipe runs): engine vs HF Trainer + PEFT, padded and padding-free (the report
#      names the best of the two), Phi-3-mini shape, random weights, synthetic documents of 1/16
#      to 1/2 of the row (several per packed row); attention kernel calls per step in each row;
#   3. the same for the Llama-3.1-8B shape;
#   3b. GRPO rollout generation: the engine's generate_rollouts vs transformers' generate on the
#      SmolLM2-135M shape (random weights, LoRA, bf16), 8 prompts x G=8, 256 + 256 tokens, same run
#      (benchmarks/rollout_generation.py);
#   4. long context: the longest row that trains one step in 14.7 GiB on the 8B shape (QLoRA, every
#      memory switch on: chunked loss, checkpointing + offload, the sequence-tiled MLP and RMSNorms),
#      three documents per row, starting at 48k tokens (the target), the planner's prediction and
#      its largest term next to each measured max_memory_allocated;
#   5. FSDP2 on one GPU under torchrun (scripts/gpu_check_fsdp.sh: sharded step == unsharded step,
#      float and 4-bit; engine.train with train.fsdp=true vs without);
#   6. packed attention per kernel in the real step on the Phi-3-mini shape (calls per step, time,
#      memory, loss agreement: benchmarks/gpu_attention.py) and one layer's extra memory of the
#      packed path at 4k / 16k / 32k tokens (benchmarks/attention_memory.py);
#   7. planner vs measured: a table from step 4's JSON.
# On the device tool's machine ($OUT set) the results go to a scratch folder that is tarred into
# $OUT/gpu_check.tgz after every step, so a call cut short still returns what it measured; unpack
# it into benchmarks/results/gpu/ here.
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

DATE=$(date +%F)
if [ "$DRY_RUN" = 1 ]; then RES="${DRY_RUN_OUT:-/tmp/gpu_check_dry_run}/$DATE"
elif [ -n "${OUT:-}" ]; then RES="/tmp/gpu_check/$DATE"
else RES="$REPO/benchmarks/results/gpu/$DATE"; fi
mkdir -p "$RES"
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-480}
status=0

if [ "$DRY_RUN" = 1 ]; then
    DEVICE=(--device cpu)
    LLAMA=shape:tiny-llama; PHI3=shape:tiny-phi3
    SEQ=256; PROBE=(--probe-start 256 --probe-max 1024); STEPS=(--warmup 1 --steps 1 --repeats 1)
    T_BENCH=100; T_PROBE=120
    VARLEN=(--dry-run); ATTN_MEMORY=(--tokens 1024,4096 --dense-max 4096)
    ROLLOUT=(--device cpu --precision fp32 --model shape:tiny-llama --prompts 2 --generations 2 --prompt-len 16
             --completion-len 8 --repeats 1); T_ROLLOUT=60
    HOST_COST=(--layers 2 --hidden 32 --steps 1 --repeats 1)
else
    DEVICE=(--device cuda --t4)
    LLAMA=shape:llama-3.1-8b; PHI3=shape:phi-3-mini
    SEQ=2048; PROBE=(--probe-start 49152 --probe-max 131072); STEPS=(--warmup 1 --steps 3 --repeats 1)
    T_BENCH=30; T_PROBE=90
    VARLEN=(--model "$PHI3" --seq-len 4096 --micro-batch 2 --checkpointing --warmup 1 --steps 2)
    ATTN_MEMORY=(--device cuda --heads 32 --kv-heads 32 --head-dim 96 --iters 3)
    ROLLOUT=(--device cuda --precision bf16 --model shape:smollm2-135m --prompts 8 --generations 8 --prompt-len 256
             --completion-len 256 --repeats 2); T_ROLLOUT=60
    HOST_COST=(--device cuda --hidden 0 --rows 4 --steps 5 --repeats 2)
fi

save() {  # what has been measured so far travels back even if the call is cut short
    if [ -n "${OUT:-}" ] && [ "$DRY_RUN" = 0 ]; then tar czf "$OUT/gpu_check.tgz" -C "$(dirname "$RES")" "$(basename "$RES")"; fi
}
fits_budget() {  # fits_budget SECONDS: is there time left for a step bounded by SECONDS?
    local left=$(( BUDGET - ($(date +%s) - START) ))
    if [ "$1" -gt "$left" ]; then echo "SKIP: needs up to $1 s, $left s left of the $BUDGET s budget"; return 1; fi
}
step() {  # step SECONDS NAME COMMAND...: run a bounded step, log it, keep going on failure
    local t="$1" name="$2"; shift 2
    fits_budget "$t" || return 0
    timeout -k 10 "$t" "$@" 2>&1 | tee "$RES/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || { echo "FAIL ($rc): $name"; status=1; }
    save
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

if [ "$DRY_RUN" = 0 ]; then
    echo "== 1. GPU tests: no sync between log steps, one attention kernel call per layer"
    step 85 gpu_tests $PY -m pytest -q -m gpu -p no:cacheprovider tests/training/test_sync_free.py \
        tests/speed/test_varlen_attention.py tests/speed/test_cuda_graphs.py
fi

echo "== 1b. the kernel self-check's verdicts (Gemma-2-2B / Llama-3.1-8B widths) and an fp16 run of a Gemma-2-shaped model through the guard"
if [ "$DRY_RUN" = 1 ]; then GUARD=(--dry-run); else GUARD=(); fi
step 150 guard_check $PY scripts/gpu_guard_check.py --out "$RES/guard_check" "${GUARD[@]}"
echo "== 1c. host cost per step, engine vs transformers + PEFT, with and without the fused blocks, with CUDA graphs"
for shape in phi-3-mini llama-3.1-8b; do
    step 40 "host_cost_$shape" $PY benchmarks/host_cost.py --shape "$shape" "${HOST_COST[@]}" \
        --tag "gpu_$shape" --out-dir "$RES"
    step 40 "host_cost_${shape}_unfused" $PY benchmarks/host_cost.py --shape "$shape" "${HOST_COST[@]}" \
        --disable fused_blocks --tag "gpu_${shape}_unfused" --out-dir "$RES"
    if [ "$DRY_RUN" = 0 ]; then  # a GPU only: host_cost.py refuses --cuda-graphs on a CPU
        step 45 "host_cost_${shape}_graphs" $PY benchmarks/host_cost.py --shape "$shape" "${HOST_COST[@]}" \
            --cuda-graphs --tag "gpu_${shape}_graphs" --out-dir "$RES"
    fi
done

throughput() {  # throughput MODEL SECONDS: engine vs HF + PEFT (padded, padding-free), T4 mode
    local name="${1#shape:}"
    echo "== throughput, T4 mode, engine vs HF Trainer + PEFT ($1, QLoRA, $SEQ-token rows, several documents each)"
    step "$2" "throughput_$name" $PY benchmarks/throughput.py "${DEVICE[@]}" --model "$1" --method qlora \
        --data synthetic --seq-len "$SEQ" --checkpointing --configs engine,hf_padded,hf_flat "${STEPS[@]}" \
        --timeout "$T_BENCH" --tag "t4_${name}_${SEQ}" --out-dir "$RES"
}
throughput "$PHI3" 100
throughput "$LLAMA" 110

echo "== 3b. GRPO rollout generation: engine vs transformers' generate (benchmarks/rollout_generation.py)"
step "$T_ROLLOUT" rollout_generation $PY benchmarks/rollout_generation.py "${ROLLOUT[@]}" \
    --configs engine,engine_nolean,engine_nomerge,hf_generate --out-dir "$RES"

echo "== 4. longest context in 14.7 GiB, every memory switch on, several documents per row ($LLAMA)"
step "$T_PROBE" "probe_${LLAMA#shape:}" $PY benchmarks/throughput.py "${DEVICE[@]}" --model "$LLAMA" \
    --method qlora --probe "${PROBE[@]}" --mlp-tile-tokens auto --norm-tile-tokens auto --docs-per-row 3 \
    --timeout $((T_PROBE - 10)) --tag "t4_${LLAMA#shape:}_tiled_probe" --out-dir "$RES"

if [ "$DRY_RUN" = 0 ] && [ -z "${SKIP_FSDP:-}" ]; then
    echo "== 5. FSDP2 on one GPU (scripts/gpu_check_fsdp.sh)"
    FSDP_QUICK=1 step 55 fsdp bash scripts/gpu_check_fsdp.sh "$RES/fsdp"
fi

echo "== 6. packed attention per kernel in the real step ($PHI3), extra memory at 4k/16k/32k"
step 30 gpu_attention $PY benchmarks/gpu_attention.py "${VARLEN[@]}" --out-dir "$RES"
step 20 attention_memory $PY benchmarks/attention_memory.py "${ATTN_MEMORY[@]}" --out-dir "$RES"

echo "== 7. planner vs measured"
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

echo "== done in $(( $(date +%s) - START )) s, status $status; results in $RES"
ls -la "$RES"
save
exit $status
