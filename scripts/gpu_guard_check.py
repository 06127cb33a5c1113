"""GPU check (scripts/gpu_check.sh): the kernel self-check's verdicts, and an fp16 run through the guard.

1. self-check: a one-block model with the real widths of Gemma-2-2B and Llama-3.1-8B (their
   embeddings and one decoder block, LoRA on every linear), the speed plan this device resolves for
   fp16 (a T4's precision) and bf16 (where the GPU has it), every switch checked against its
   reference (engine/speed/self_check.py): verdicts, and the cost of the check (first call, with
   the kernels' warm-up, and a second one).
2. fp16 guard: a two-block Gemma-2-shaped model (Gemma-2-2B's widths, a small vocabulary) whose
   first MLP writes ~3e5 into the residual stream, trained with LoRA in fp16 with the guard
   (train.fp16_guard=auto), without it (every step skipped: the run must fail), and in fp32;
   the guard's line and the losses side by side.

    python scripts/gpu_guard_check.py --out DIR             # on the GPU
    python scripts/gpu_guard_check.py --out DIR --dry-run   # the same on this CPU, tiny widths
Writes DIR/guard_check.json and prints a summary.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

SHAPES = {  # (family, widths): one block of each, the real embeddings
    "gemma-2-2b": ("gemma2", dict(hidden_size=2304, intermediate_size=9216, num_attention_heads=8,
                                  num_key_value_heads=4, head_dim=256, vocab_size=256000)),
    "llama-3.1-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                   num_key_value_heads=8, vocab_size=128256)),
}
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def self_check_verdicts(device: torch.device, dry_run: bool) -> list[dict]:
    from transformers import AutoConfig, AutoModelForCausalLM

    from engine.config import SpeedConfig
    from engine.layers.inject import inject_lora
    from engine.speed import plan as speed_plan
    from engine.speed.self_check import check_plan

    rows = []
    precisions = ["fp16"] + (["bf16"] if device.type == "cpu" or torch.cuda.is_bf16_supported(False) else [])
    for name, (family, widths) in SHAPES.items():
        widths = {**widths, **((TINY | {"vocab_size": 512}) if dry_run else {})}
        config = AutoConfig.for_model(family, num_hidden_layers=1, **widths)
        dtype = torch.float32 if device.type == "cpu" else torch.float16
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.requires_grad_(False)
        inject_lora(model, "all-linear", r=16, alpha=32)
        for precision in precisions:
            if device.type == "cuda":
                model.to(torch.float16 if precision == "fp16" else torch.bfloat16)
                for m in model.modules():  # LoRA factors stay fp32
                    if hasattr(m, "lora_A"):
                        m.lora_A.float()
                        m.lora_B.float()
            # a dry run leaves inductor out (its CPU compile alone takes longer than the rest)
            speed = SpeedConfig(retain_host_memory=False, compile=False if dry_run else "auto")
            plan = speed_plan.resolve(speed, device=device, precision=precision)
            speed_plan.apply(plan, model)
            checked, lines, first = check_plan(plan, model, precision=precision)
            _, _, second = check_plan(plan, model, precision=precision)
            rows.append({"shape": name, "precision": precision, "plan": plan.describe(),
                         "after_check": checked.describe(), "failures": lines,
                         "seconds_first": round(first, 3), "seconds_second": round(second, 3)})
            print(f"self-check {name} {precision}: {len(lines)} failure(s), {first:.2f} s first, {second:.2f} s "
                  f"again; {plan.describe()}")
            for line in lines:
                print("   ", line)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def overflowing_gemma2(root: Path, dry_run: bool) -> Path:
    from tests.conftest import make_tiny_model
    from tests.training.test_fp16_guard import plant

    widths = {} if dry_run else {k: v for k, v in SHAPES["gemma-2-2b"][1].items() if k != "vocab_size"}
    model, tokenizer = make_tiny_model("gemma2", **widths)
    with torch.no_grad():  # a trained model's scale at this width (the tiny models' 0.1 grows too fast)
        for p in model.parameters():
            if p.dim() > 1 and not dry_run:
                p.normal_(0.0, 0.02)
    plant(model, "mlp.down_proj")
    out = root / "gemma2-overflow"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def guarded_runs(device: torch.device, root: Path, dry_run: bool, steps: int) -> dict:
    from engine import train as train_mod
    from engine.config import PeftConfig
    from tests.conftest import counting_run_config

    model_dir = overflowing_gemma2(root, dry_run)
    result = {}
    for name, precision, guard in (("fp32", "fp32", "auto"), ("fp16_guard", "fp16", "auto"), ("fp16_off", "fp16", "off")):
        run_root = root / name
        run_root.mkdir(parents=True, exist_ok=True)
        cfg = counting_run_config(run_root, model_dir, PeftConfig(r=8, alpha=16, targets="all-linear"), max_steps=steps)
        cfg = replace(cfg, train=replace(cfg.train, precision=precision, fp16_guard=guard, log_every=1,
                                         device=device.type),
                      data=replace(cfg.data, eval_path=str(run_root / "train.jsonl")))
        err = io.StringIO()
        t0 = time.perf_counter()
        try:
            with contextlib.redirect_stderr(err):
                summary = train_mod.run_training(cfg)
            outcome = {"ok": True, "eval_loss_after": summary["eval_loss_after"],
                       "skipped_steps": summary["skipped_steps"]}
        except Exception as e:  # noqa: BLE001 -- the guard-off run must fail: its message is the result
            outcome = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        records = [json.loads(line) for line in (run_root / "run" / "metrics.jsonl").read_text().splitlines()]
        outcome["losses"] = [r["loss"] for r in records if "loss" in r]
        outcome["seconds"] = round(time.perf_counter() - t0, 1)
        outcome["guard_line"] = next((line for line in err.getvalue().splitlines()
                                      if line.startswith("precision: fp16 (") and "fp32" in line), None)
        result[name] = outcome
        print(f"{name}: {'trained' if outcome['ok'] else outcome['error'][:160]}; losses "
              f"{[round(x, 4) for x in outcome['losses']][:8]}...")
        if outcome["guard_line"]:
            print("   ", outcome["guard_line"])
    ref, got = result["fp32"]["losses"], result["fp16_guard"]["losses"]
    result["max_abs_loss_diff_guard_vs_fp32"] = max((abs(a - b) for a, b in zip(ref, got)), default=math.nan)
    print(f"fp16 with the guard vs fp32: max |loss difference| {result['max_abs_loss_diff_guard_vs_fp32']:.4f}; "
          f"guard-off run failed as it must: {not result['fp16_off']['ok']}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny widths")
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__}
    report["self_check"] = self_check_verdicts(device, args.dry_run)
    report["guard"] = guarded_runs(device, out / "runs", args.dry_run, 4 if args.dry_run else args.steps)
    (out / "guard_check.json").write_text(json.dumps(report, indent=2))
    guard = report["guard"]
    ok = guard["fp16_guard"]["ok"] and not guard["fp16_off"]["ok"] and guard["max_abs_loss_diff_guard_vs_fp32"] < 0.05
    print("guard check:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
