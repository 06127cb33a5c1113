"""LoRA variants side by side on the quickstart task: LoRA, rsLoRA, DoRA, PiSSA, LoRA+ (and QLoRA of each).

Every variant trains SmolLM2-135M-Instruct on data/quickstart (conf/experiment/quickstart.yaml,
composed with Hydra exactly as `python -m engine.train +experiment=quickstart` does) for the same
number of steps with the same seed, data order and learning rate; only the PeftConfig switch
differs. Each run is a fresh subprocess (so its peak RSS is its own) calling
engine.train.run_training; the parent collects each run's summary.json:

    held-out loss      eval_loss_before -> eval_loss_after on data/quickstart/eval.jsonl (60 chats)
    exact match, F1    greedy generations on the first --max-examples eval chats, after training
    useful tokens/s    non-padding tokens per second of training steps (no evaluation time)
    peak memory        the run's process peak RSS on CPU (max_memory_allocated on a GPU)

    python benchmarks/variants.py                       # all 10 runs, 25 steps each
    python benchmarks/variants.py --steps 10 --variants lora dora --no-qlora
    python benchmarks/variants.py --steps 8 --no-qlora --max-seq-len 512 --eval-chats 20   # a busy 2-core CPU
writes benchmarks/results/variants.{json,md} and variants.png (held-out loss per variant).
Short runs rank the variants' early learning speed, not their final quality: the quickstart
itself trains 20 steps. Timings on a shared CPU are noisy; the results file says how many cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
sys.path.insert(0, ROOT)

# name -> Hydra overrides on top of +experiment=quickstart (the only thing that differs per run)
VARIANTS = {
    "lora": [],
    "rslora": ["peft.use_rslora=true"],
    "dora": ["peft.use_dora=true"],
    "pissa": ["peft.init=pissa"],
    "loraplus": ["peft.loraplus_ratio=16"],
}


def compose_config(overrides: list[str], experiment: str = "quickstart"):
    """RunConfig from conf/ + an experiment + overrides (as the Hydra entry point builds it)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from engine.config import from_dict, register_configs

    register_configs()
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        dcfg = compose(config_name="config", overrides=[f"+experiment={experiment}", *overrides])
    return from_dict(OmegaConf.to_container(dcfg, resolve=True)).validate()


def eval_subset(args) -> list[str]:
    """--eval-chats N: held-out loss and generations on the first N eval chats (a copy in --work-dir)."""
    if not args.eval_chats:
        return []
    os.makedirs(args.work_dir, exist_ok=True)
    path = os.path.join(args.work_dir, f"eval-first-{args.eval_chats}.jsonl")
    with open(os.path.join(ROOT, "data", "quickstart", "eval.jsonl")) as f:
        lines = f.readlines()[: args.eval_chats]
    with open(path, "w") as f:
        f.writelines(lines)
    return [f"data.eval_path={path}"]


def run_overrides(name: str, method: str, args, eval_overrides: list[str]) -> list[str]:
    out = os.path.join(args.work_dir, f"{name}-{method}")
    trims = [f"data.max_seq_len={args.max_seq_len}"] if args.max_seq_len else []
    return [f"output_dir={out}", f"peft.method={method}", f"train.max_steps={args.steps}", *trims, *eval_overrides,
            "train.eval_every=0", f"train.save_every={args.steps}", "train.resume=never", "train.plots=false",
            "train.device=cpu",
            f"eval.max_examples={args.max_examples}", f"eval.max_new_tokens={args.max_new_tokens}", *VARIANTS[name]]


def child(overrides: list[str]) -> None:
    """One training run in this process (called in a fresh subprocess by the parent)."""
    os.chdir(ROOT)  # conf/experiment paths (data/quickstart) are relative to the repository
    from engine.train import run_training
    cfg = compose_config(overrides)
    run_training(cfg)


def row(name: str, method: str, summary: dict, wall: float) -> dict:
    table = (summary.get("scores") or {}).get("table", {})
    score = lambda metric, when: (table.get(metric) or {}).get(when)  # noqa: E731
    return {"variant": f"{name} ({method})", "name": name, "method": method, "steps": summary["steps"],
            "eval_loss_before": summary["eval_loss_before"], "eval_loss_after": summary["eval_loss_after"],
            "exact_match_before": score("exact_match", "before"), "exact_match_after": score("exact_match", "after"),
            "token_f1_after": score("token_f1", "after"),
            "useful_tokens_per_s": summary["useful_tokens_per_s"], "peak_memory_gib": summary["peak_memory_gib"],
            "train_seconds": summary["train_seconds"], "wall_seconds": wall}


def fmt(x, digits=4):
    return "-" if x is None else f"{x:.{digits}f}"


def write_results(rows: list[dict], args) -> None:
    import torch
    meta = {"steps": args.steps, "max_examples": args.max_examples, "max_seq_len": args.max_seq_len or 1024,
            "eval_chats": args.eval_chats or 60, "max_new_tokens": args.max_new_tokens, "cpu_cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "device": "cpu", "torch": torch.__version__,
            "load_average_at_end": os.getloadavg(),
            "load_note": args.load_note or f"load average {os.getloadavg()[0]:.1f} at the end"}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "variants.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    cfg = compose_config([f"data.max_seq_len={meta['max_seq_len']}"])  # what every run shares
    lines = [f"# LoRA variants on the quickstart task ({args.steps} steps each)", "",
             f"SmolLM2-135M-Instruct, data/quickstart, conf/experiment/quickstart.yaml (r={cfg.peft.r}, "
             f"alpha={cfg.peft.alpha:g}, {cfg.peft.targets}, lr {cfg.optim.lr:g}, {cfg.optim.warmup_steps} warmup steps, "
             f"{cfg.optim.schedule}, micro-batch {cfg.train.micro_batch_size} x {meta['max_seq_len']} packed tokens) "
             f"with train.max_steps={args.steps} (the quickstart trains {cfg.train.max_steps}); "
             f"exact match / token F1 on the first {args.max_examples} eval chats (greedy, at most "
             f"{args.max_new_tokens} new tokens), held-out loss on the first {meta['eval_chats']} of 60. "
             f"CPU ({os.cpu_count()} cores; {meta['load_note']}), fp32. "
             "`python benchmarks/variants.py` regenerates it.", "",
             "| variant | held-out loss before -> after | exact match before -> after | token F1 after "
             "| useful tokens/s | peak memory GiB | train s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {fmt(r['eval_loss_before'])} -> {fmt(r['eval_loss_after'])} "
                     f"| {fmt(r['exact_match_before'], 3)} -> {fmt(r['exact_match_after'], 3)} "
                     f"| {fmt(r['token_f1_after'], 3)} | {r['useful_tokens_per_s']:.0f} "
                     f"| {r['peak_memory_gib']:.2f} | {r['train_seconds']:.0f} |")
    lines += ["", "rsLoRA scales by alpha/sqrt(r) = 8 instead of alpha/r = 2 (a 4x larger update at r=16). "
              "DoRA adds a magnitude per output row and recomputes ||W + sBA|| every forward (slower per step). "
              "PiSSA starts A, B on the top-16 singular directions of W (the QLoRA row quantizes the residual). "
              "LoRA+ trains B at 16x A's learning rate.", ""]
    if args.max_examples < 20 or args.steps < 20:
        lines += [f"With {args.steps} steps and {args.max_examples} scored chats one exact match is "
                  f"{1 / args.max_examples:.2g}: the score columns are noise at this size, the held-out loss is the "
                  "steadier signal.", ""]
    with open(os.path.join(RESULTS, "variants.md"), "w") as f:
        f.write("\n".join(lines))
    try:
        from engine.plot import bar_chart
        bar_chart(rows, "eval_loss_after", os.path.join(RESULTS, "variants.png"),
                  f"Held-out loss after {args.steps} steps (quickstart; lower is better)", "held-out loss (nats/token)",
                  label_key="variant")
    except ImportError:
        print("no bar chart: matplotlib is not installed", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--max-examples", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--max-seq-len", type=int, default=None, help="packed row length (quickstart: 1024)")
    p.add_argument("--eval-chats", type=int, default=None, help="held-out loss on the first N eval chats (all 60)")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--no-qlora", action="store_true", help="float-base runs only")
    p.add_argument("--work-dir", default=os.path.join(ROOT, "runs", "variants"))
    p.add_argument("--load-note", default=None, help="say in the results how loaded the machine was")
    p.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        child(args.child)
        return 0
    if args.steps < 3:
        p.error("--steps must be >= 3 (the quickstart warms up for 2)")
    rows, eval_overrides = [], eval_subset(args)
    for method in ("lora",) + (() if args.no_qlora else ("qlora",)):
        for name in args.variants:
            overrides = run_overrides(name, method, args, eval_overrides)
            print(f"== {name} ({method}): {' '.join(overrides)}", flush=True)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *overrides], check=True, cwd=ROOT)
            wall = time.perf_counter() - t0
            with open(os.path.join(args.work_dir, f"{name}-{method}", "summary.json")) as f:
                rows.append(row(name, method, json.load(f), wall))
            write_results(rows, args)  # after every run: a partial table survives an interruption
    print(open(os.path.join(RESULTS, "variants.md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
