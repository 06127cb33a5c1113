#!/usr/bin/env bash
# FSDP2 checks on one CUDA GPU (world size 1 under torchrun). Self-contained: run it directly
#   bash scripts/gpu_check_fsdp.sh [OUT_DIR]
# or source it and call the function from gpu_check.sh:
#   source scripts/gpu_check_fsdp.sh && gpu_check_fsdp "$OUT/fsdp"
#
# What it checks (each prints PASS/FAIL; the function returns non-zero on the first failure):
#   1. tests/parallel/test_fsdp.py's two-process worker, run as ONE process on cuda: fully_shard on a float
#      and a 4-bit (bitsandbytes CUDA kernels) tiny model, quant_storage = the base dtype, one
#      step's loss / gradients / update equal the unsharded model's, full-state-dict round trip;
#   2. QLoRA training through the real entry point (torchrun --nproc_per_node=1 -m engine.train,
#      train.fsdp=true, bf16) against the same run without FSDP: same losses (bf16 tolerance),
#      loss goes down, peak memory of both printed;
#   3. resume under FSDP: a second run started from the first run's step-10 checkpoint logs the
#      same losses for steps 11..20.
# FSDP_QUICK=1 (what gpu_check.sh runs, inside its 8 minutes): 1 and 2 only, 10 steps.
# DEVICE=cpu PRECISION=fp32 runs the same steps on the CPU (gloo), to try the script without a GPU.
# Sharding over several GPUs (world size > 1) is only exercised on CPU with gloo in the tests.

gpu_check_fsdp() {
    local out="${1:-${OUT:-/tmp}/fsdp_check}" dev="${DEVICE:-cuda}" prec="${PRECISION:-bf16}"
    local quick="${FSDP_QUICK:-0}" steps=20
    [ "$quick" = 1 ] && steps=10
    local repo
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    mkdir -p "$out"
    (
        set -euo pipefail
        cd "$repo"
        export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=4
        python - "$out" <<'EOF'
import sys
from pathlib import Path
from tests.conftest import make_tiny_model_dir
from tests.e2e.test_train import write_chat_data
import tests.parallel.test_fsdp as t
out = Path(sys.argv[1])
make_tiny_model_dir(out, "llama")
write_chat_data(out / "train.jsonl", 96, seed=1)
write_chat_data(out / "eval.jsonl", 8, seed=2)
(out / "worker.py").write_text(t.WORKER)
EOF
        echo "== 1. fully_shard step == unsharded step ($dev, world size 1)"
        python -m torch.distributed.run --nproc_per_node=1 --master_port=29517 \
            "$out/worker.py" "$out/tiny-llama" "$out/worker.json" "$dev"
        python - "$out/worker.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(json.dumps(r, indent=1))
for m in ("lora", "qlora"):
    x = r[m]
    assert x["loss_diff"] < 1e-4 and x["grad_max_abs_diff"] < 1e-5 and x["update_max_abs_diff"] < 1e-5, (m, x)
    assert x["round_trip_equal"], (m, x)
assert r["qlora"]["quant_storage"] == ["torch.float32"], r["qlora"]
print("PASS 1")
EOF
        common=(model.path="$out/tiny-llama" data.train_path="$out/train.jsonl" data.eval_path="$out/eval.jsonl"
                data.max_seq_len=128 data.cache_dir="$out/cache" peft=qlora peft.r=8 train.device="$dev"
                train.precision="$prec" train.max_steps="$steps" train.save_every=10 train.keep_last=5
                train.micro_batch_size=2 train.grad_accum=2 train.plots=false train.log_every=1 optim.lr=5e-3)
        echo "== 2. QLoRA training: FSDP (torchrun, 1 GPU) vs plain"
        python -m engine.train "${common[@]}" train.fsdp=false output_dir="$out/plain"
        python -m torch.distributed.run --nproc_per_node=1 --master_port=29518 -m engine.train \
            "${common[@]}" train.fsdp=true output_dir="$out/fsdp"
        if [ "$quick" = 1 ]; then
            python - "$out" "$steps" <<'EOF'
import json, sys
from pathlib import Path
out, n = Path(sys.argv[1]), int(sys.argv[2])
def losses(d):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / d / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
plain, fsdp = losses("plain"), losses("fsdp")
worst = max(abs(plain[k] - fsdp[k]) for k in plain)
print(f"max |loss(plain) - loss(fsdp)| over {n} steps: {worst:.2e}")
assert plain.keys() == fsdp.keys() == set(range(1, n + 1)), (plain.keys(), fsdp.keys())
assert worst < 2e-2, worst
print("PASS 2")
EOF
            exit 0
        fi
        echo "== 3. FSDP resume from step 10"
        python -m torch.distributed.run --nproc_per_node=1 --master_port=29519 -m engine.train \
            "${common[@]}" train.fsdp=true output_dir="$out/fsdp_resumed" train.resume="$out/fsdp/checkpoints/step-10"
        python - "$out" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def losses(d):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / d / "metrics.jsonl").read_text().splitlines()) if "loss" in r}
plain, fsdp, resumed = losses("plain"), losses("fsdp"), losses("fsdp_resumed")
for d in ("plain", "fsdp"):
    s = json.loads((out / d / "summary.json").read_text())
    print(f"{d}: peak {s['peak_memory_gib']:.3f} GiB, final loss {s['final_train_loss']:.4f}, "
          f"eval {s['eval_loss_before']:.4f} -> {s['eval_loss_after']:.4f}")
worst = max(abs(plain[k] - fsdp[k]) for k in plain)
print(f"max |loss(plain) - loss(fsdp)| over 20 steps: {worst:.2e}")
assert plain.keys() == fsdp.keys() == set(range(1, 21)), (plain.keys(), fsdp.keys())
assert worst < 2e-2, worst  # bf16 autocast; world size 1 FSDP does the same math
assert sum(fsdp[k] for k in range(16, 21)) < sum(fsdp[k] for k in range(1, 6)), fsdp
print("PASS 2")
worst = max(abs(resumed[k] - fsdp[k]) for k in range(11, 21))
print(f"max |loss(resumed) - loss(uninterrupted)| steps 11..20: {worst:.2e}")
assert set(range(11, 21)) <= set(resumed), resumed.keys()
assert worst < 1e-3, worst
assert (out / "fsdp_resumed" / "adapter" / "adapter_model.safetensors").exists()
print("PASS 3")
EOF
    )
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    gpu_check_fsdp "$@"
fi
