"""One GRPO step (rollout + update): the engine's loop vs TRL's GRPOTrainer with PEFT LoRA, same run.

    python benchmarks/grpo_step.py                           # CPU, SmolLM2-135M, 2 prompts x G=4, 64 tokens, fp32
    python benchmarks/grpo_step.py --model tiny --completion-len 8 --steps 1   # a smoke run
    python benchmarks/grpo_step.py --device cuda --precision bf16             # scripts/gpu_check.sh

Each side runs in its own fresh process (the engine's speed plan and TRL's imports change
process-wide state), one after the other.

Both sides train the same model (SmolLM2-135M-Instruct, the embedded default, as the HF directory
benchmarks/throughput_inputs.py builds from its GGUF), on the first `--prompts` prompts of the GRPO
quickstart (data/quickstart_grpo/train.jsonl, chats rendered with the chat template), G =
`--generations` completions each, sampled at temperature 1 (top-p 1, top-k 0), LoRA r/alpha on every
linear (dropout 0), beta 0, loss_type dapo, scale_rewards group, one optimizer step per rollout,
the same reward (engine.tasks.orders_rewards:city_mentioned), no gradient checkpointing (TRL turns
it on by default, which only slows it here), no vLLM. Every completion is exactly
`--completion-len` tokens long on both sides, so both do the same work: the engine's rollout gets a
stop token no model emits (engine.grpo.plugin.stop_token_ids patched for the run), TRL's
generate gets min_new_tokens = max_completion_length (the end of turn is suppressed until then).
The real lengths are read back from each side's logged metrics and reported.

  engine  python -m engine.train's run_training (+experiment=quickstart_grpo, overridden as above),
          log_every 1. A step's time is what the loop logs: the update of step k plus the rollout
          of step k+1 (prepared at the end of step k), so steps 2..N-1 of N are full steps.
  trl     GRPOTrainer.train(), timed by a callback from on_step_begin to on_step_end (its
          rollout happens inside the step); step 1 (warm-up) is dropped.
Reported: ms per step (median of `--steps` steps after the warm-up), and the engine's speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
PROMPTS = os.path.join(ROOT, "data", "quickstart_grpo", "train.jsonl")
REWARD = "engine.tasks.orders_rewards:city_mentioned"
NO_STOP = -1  # a token id no model emits: every completion runs the full length


def write_prompts(n: int, work: str) -> str:
    with open(PROMPTS) as f:
        lines = [line for line in f if line.strip()][:n]
    path = os.path.join(work, "prompts.jsonl")
    with open(path, "w") as f:
        f.writelines(lines)
    return path


def run_engine(args, model_dir: str, prompts: str, work: str) -> dict:
    """Per-step seconds of the engine's own loop, from its metrics.jsonl."""
    import engine.grpo.plugin as plugin
    from variants import compose_config

    from engine.train import run_training

    out = os.path.join(work, "engine")
    cfg = compose_config([
        f"model.path={model_dir}", f"data.train_path={prompts}", "data.eval_path=null", f"output_dir={out}",
        f"objective.prompts_per_step={args.prompts}", f"objective.num_generations={args.generations}",
        f"objective.max_completion_length={args.completion_len}", "objective.temperature=1.0",
        f"objective.rewards=[{REWARD}]", f"peft.r={args.r}", f"peft.alpha={args.alpha}", "peft.dropout=0.0",
        f"optim.lr={args.lr}", f"train.max_steps={args.steps + 2}", "train.log_every=1", "train.save_every=0",
        f"train.precision={args.precision}", f"train.device={args.device}", "train.plots=false",
        f"train.micro_batch_size={args.micro_batch_size}", "train.resume=never"], experiment="quickstart_grpo")
    import engine.tracking.metrics_log as metrics_log

    real, write = plugin.stop_token_ids, metrics_log.MetricsLog.write
    plugin.stop_token_ids = lambda tokenizer: [NO_STOP]
    # this process's CPU seconds (every thread) stamped on each record: log_every 1, so consecutive
    # records bound one step (the file's other fields are the loop's own)
    metrics_log.MetricsLog.write = lambda self, record: write(self, {**record, "process_cpu_s": time.process_time()})
    try:
        run_training(cfg)
    finally:
        plugin.stop_token_ids, metrics_log.MetricsLog.write = real, write
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    train = [r for r in records if "loss" in r]
    seconds, tokens_before = [], 0
    for r in train:  # log_every=1: a record's tokens_per_s is that one step's tokens over its seconds
        seconds.append((r["tokens"] - tokens_before) / r["tokens_per_s"])
        tokens_before = r["tokens"]
    cpu = [b["process_cpu_s"] - a["process_cpu_s"] for a, b in zip(train, train[1:])]  # steps 2..N
    lengths = [r["completions/mean_length"] for r in train]
    return {"step_seconds": seconds[1:-1], "all_step_seconds": seconds, "step_cpu_seconds": cpu[:-1],
            "mean_completion_length": lengths, "rewards": [r["reward"] for r in train]}


def run_trl(args, model_dir: str, prompts: str, work: str) -> dict:
    """Per-step seconds of TRL's GRPOTrainer, from a callback around each step."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from engine.tasks.orders_rewards import city_mentioned  # REWARD, the plain function TRL calls

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self.cpu, self.t0, self.c0 = [], [], 0.0, 0.0

        def on_step_begin(self, *a, **k):
            if args.device == "cuda":
                torch.cuda.synchronize()
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            if args.device == "cuda":
                torch.cuda.synchronize()
            self.seconds.append(time.perf_counter() - self.t0)
            self.cpu.append(time.process_time() - self.c0)

    with open(prompts) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = GRPOConfig(
        output_dir=os.path.join(work, "trl"), per_device_train_batch_size=args.prompts * args.generations,
        gradient_accumulation_steps=1, num_generations=args.generations, max_completion_length=args.completion_len,
        temperature=1.0, top_p=1.0, top_k=0, beta=0.0, loss_type="dapo", scale_rewards="group", num_iterations=1,
        learning_rate=args.lr, lr_scheduler_type="constant", max_steps=args.steps + 1, logging_steps=1,
        save_strategy="no", report_to=[], seed=0, bf16=args.precision == "bf16", fp16=False,
        use_cpu=args.device == "cpu", gradient_checkpointing=False, dataloader_num_workers=0,
        generation_kwargs={"min_new_tokens": args.completion_len}, disable_tqdm=True)
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=[city_mentioned], args=config,
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[timer],
                          peft_config=LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer.train()
    logs = [r for r in trainer.state.log_history if "completions/mean_length" in r]
    return {"step_seconds": timer.seconds[1:], "all_step_seconds": timer.seconds, "step_cpu_seconds": timer.cpu[1:],
            "mean_completion_length": [r["completions/mean_length"] for r in logs],
            "rewards": [r.get("reward") for r in logs]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/grpo_step.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="smollm2 | tiny | an HF model dir")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--generations", type=int, default=4, help="G, completions per prompt")
    p.add_argument("--completion-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=2, help="timed steps per side, after one warm-up step")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--micro-batch-size", type=int, default=2, help="the engine's packed rows per forward")
    p.add_argument("--configs", default="engine,trl")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--tag", default=None, help="results file suffix (default: device_model_precision)")
    p.add_argument("--out-dir", default=RESULTS)
    p.add_argument("--load-note", default=None, help="say in the results how loaded the machine was")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # KIND:RESULT.json, set by the parent
    args = p.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    if set(configs) - {"engine", "trl"}:
        p.error(f"--configs: unknown {sorted(set(configs) - {'engine', 'trl'})}; one of ['engine', 'trl']")
    if min(args.prompts, args.generations, args.completion_len, args.steps) < 1:
        p.error("--prompts, --generations, --completion-len and --steps must be >= 1")
    if args.generations < 2:
        p.error("--generations must be >= 2 (GRPO's advantages are relative to the group)")

    import torch

    from throughput_inputs import resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model)
    if args.worker:  # one side, in this fresh process: the JSON of its steps to --worker's file
        kind, path = args.worker.split(":", 1)
        prompts = os.path.join(os.path.dirname(path), "prompts.jsonl")
        torch.manual_seed(0)
        result = {"engine": run_engine, "trl": run_trl}[kind](args, model_dir, prompts, os.path.dirname(path))
        with open(path, "w") as f:
            json.dump(result, f)
        return 0
    results = {}
    with tempfile.TemporaryDirectory() as work:
        write_prompts(args.prompts, work)
        for kind in configs:  # each side in its own process: neither inherits the other's global state
            path = os.path.join(work, f"{kind}.json")
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]),
                                   "--worker", f"{kind}:{path}"],
                                  cwd=ROOT)
            if proc.returncode != 0:
                print(f"{kind}: failed (exit {proc.returncode})", file=sys.stderr)
                return proc.returncode
            with open(path) as f:
                results[kind] = json.load(f)
            print(f"{kind}: steps {[round(s * 1000) for s in results[kind]['all_step_seconds']]} ms, completion "
                  f"lengths {results[kind]['mean_completion_length']}", file=sys.stderr, flush=True)
    base = statistics.median(results["trl"]["step_seconds"]) if "trl" in results else None
    base_cpu = statistics.median(results["trl"]["step_cpu_seconds"]) if "trl" in results else None
    rows = []
    for kind in configs:
        t = statistics.median(results[kind]["step_seconds"])
        c = statistics.median(results[kind]["step_cpu_seconds"])
        rows.append({"config": kind, "ms_per_step": round(t * 1000, 1),
                     "speedup_vs_trl": round(base / t, 2) if base else None,
                     "cpu_ms_per_step": round(c * 1000, 1),
                     "cpu_speedup_vs_trl": round(base_cpu / c, 2) if base_cpu else None,
                     "timed_steps_ms": [round(s * 1000, 1) for s in results[kind]["step_seconds"]],
                     "all_steps_ms": [round(s * 1000, 1) for s in results[kind]["all_step_seconds"]],
                     "mean_completion_length": results[kind]["mean_completion_length"],
                     "reward": results[kind]["rewards"]})
    meta = {"command": "python benchmarks/grpo_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "model": args.model, "device": args.device, "precision": args.precision, "prompts": args.prompts,
            "generations": args.generations, "completion_len": args.completion_len, "steps": args.steps,
            "r": args.r, "alpha": args.alpha, "micro_batch_size": args.micro_batch_size,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "trl": _version("trl"), "peft": _version("peft"),
            "cpu": platform.processor() or platform.machine(), "load_average_at_end": os.getloadavg(),
            "load_note": args.load_note, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}
    model_name = "dir" if os.path.isdir(args.model) else args.model
    tag = args.tag or f"{args.device}_{model_name}_{args.precision}"
    os.makedirs(args.out_dir, exist_ok=True)
    result = {"meta": meta, "rows": rows}
    with open(os.path.join(args.out_dir, f"grpo_step_{tag}.json"), "w") as f:
        json.dump(result, f, indent=1)
    write_markdown(os.path.join(args.out_dir, f"grpo_step_{tag}.md"), result)
    print(open(os.path.join(args.out_dir, f"grpo_step_{tag}.md")).read())
    return 0


def _version(name: str) -> str | None:
    try:
        return __import__(name).__version__
    except ImportError:
        return None


def write_markdown(path: str, result: dict) -> None:
    m = result["meta"]
    lines = [f"# One GRPO step (rollout + update): engine vs TRL GRPOTrainer + PEFT ({m['device']}, {m['model']}, "
             f"{m['precision']})", "",
             f"`{m['command']}`", "",
             f"{m['prompts']} prompts (data/quickstart_grpo/train.jsonl) x G={m['generations']} = "
             f"{m['prompts'] * m['generations']} completions of exactly {m['completion_len']} tokens per step "
             f"(sampled at temperature 1, no end-of-turn stop on either side), LoRA r={m['r']} alpha={m['alpha']} "
             f"on every linear, beta 0, loss_type dapo, no gradient checkpointing, median of {m['steps']} step(s) "
             f"after a warm-up step, {m['threads']} threads; torch {m['torch']}, transformers {m['transformers']}, "
             f"trl {m['trl']}, peft {m['peft']}" + (f", {m['gpu']}" if m["gpu"] else "") + ".",
             f"Load average at the end: {', '.join(f'{x:.1f}' for x in m['load_average_at_end'])}"
             + (f" ({m['load_note']})" if m["load_note"] else "") + ".", "",
             "CPU time: this process's, every thread, over the same steps (robust to other jobs on the machine).", "",
             "| config | ms per step | vs TRL | CPU ms per step | vs TRL (CPU) | timed steps (ms) | all steps (ms) "
             "| mean completion length per step |",
             "|---|---:|---:|---:|---:|---|---|---|"]
    for r in result["rows"]:
        speedup = f"{r['speedup_vs_trl']:.2f}x" if r["speedup_vs_trl"] else "-"
        cpu_speedup = f"{r['cpu_speedup_vs_trl']:.2f}x" if r["cpu_speedup_vs_trl"] else "-"
        lines.append(f"| {r['config']} | {r['ms_per_step']:.0f} | {speedup} | {r['cpu_ms_per_step']:.0f} | {cpu_speedup} | "
                     f"{', '.join(f'{x:.0f}' for x in r['timed_steps_ms'])} | "
                     f"{', '.join(f'{x:.0f}' for x in r['all_steps_ms'])} | "
                     f"{', '.join(f'{x:g}' for x in r['mean_completion_length'])} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
