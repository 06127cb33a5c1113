"""GRPO's training update (forward + backward over one rollout's micro-batches) with and without
objective.share_prompt, same process, same rollout, alternating.

    python benchmarks/grpo_update.py                 # the quickstart's shapes: +experiment=quickstart_grpo
    python benchmarks/grpo_update.py --repeats 1 --fixed-length 16   # every completion 16 tokens
    python benchmarks/grpo_update.py --synthetic 16   # no rollout: random completions of 16 tokens

The run is built as `python -m engine.train +experiment=quickstart_grpo` builds it (SmolLM2-135M-
Instruct, LoRA r=16 on every linear, 4 prompts x G=8, completions of <= 16 tokens, packed rows of
512 tokens, 2 rows per forward, the machine's precision and speed plan), one rollout is sampled
(or, with --fixed-length, every completion is that many tokens of the sampled ones, repeated),
and its micro-batches are built both ways from the same rollout:

    unshared   prompt + completion per document: the prompt computed G times
    shared     one tree document per group: the prompt once (engine/model/prefix_tree.py)

Each update runs the engine's forward_backward (the objective's loss, backward into the LoRA
grads; no optimizer step, so both see the same weights). Reported per config: tokens per update
(what the rows hold), wall ms and process CPU ms (median of --repeats, configs alternating, after
one warm-up each), and the ratio of the medians; the machine is shared, so CPU time and same-run
ratios are the numbers to read.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/grpo_update.py", description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="timed updates per config, after a warm-up each")
    p.add_argument("--fixed-length", type=int, default=0, help="every completion this many tokens (0: as sampled)")
    p.add_argument("--synthetic", type=int, default=0, help="no rollout: random completions of this many tokens")
    p.add_argument("--precision", default="auto")
    p.add_argument("--tag", default=None)
    p.add_argument("--out-dir", default=RESULTS)
    p.add_argument("overrides", nargs="*", help="more Hydra overrides on +experiment=quickstart_grpo")
    args = p.parse_args(argv)

    import torch
    from variants import compose_config

    from engine.grpo.batches import Rollout, rollout_batches
    from engine.parallel.distributed import init_distributed
    from engine.train import build_everything
    from engine.training.step import forward_backward, to_device

    cfg = compose_config(["output_dir=/tmp/grpo_update_bench", "train.resume=never", "data.eval_path=null",
                          f"train.precision={args.precision}", *args.overrides], experiment="quickstart_grpo")
    ctx = init_distributed(cfg.train.device)
    model, tokenizer, *_, precision, objective, _guard, _kernels = build_everything(cfg, ctx)
    o = cfg.objective
    if args.synthetic:  # no generation: the first prompts, random completions of exactly that length
        g = torch.Generator().manual_seed(0)
        N = o.prompts_per_step * o.num_generations
        ids = torch.randint(100, tokenizer.vocab_size - 100, (N, args.synthetic), generator=g).tolist()
        adv = (torch.randn(N, generator=g)).tolist()
        rollout = Rollout(list(range(o.prompts_per_step)), ids, [False] * N, adv)
    else:
        rollout, _ = objective._roll_out()
    if args.fixed_length:  # the sampled tokens, cut or repeated to the length: every completion as long
        ids = [(c * args.fixed_length)[:args.fixed_length] for c in rollout.completion_ids]
        rollout = Rollout(rollout.prompt_index, ids, [False] * len(ids), rollout.advantages)
    prompts = [p.prompt_ids for p in objective.train_set]

    def batches(share: bool) -> list[dict]:
        micro = rollout_batches(rollout, prompts, num_generations=o.num_generations, loss_type=o.loss_type,
                                max_completion_length=o.max_completion_length,
                                mask_truncated=o.mask_truncated_completions, max_seq_len=cfg.data.max_seq_len,
                                micro_batch_size=objective.loader.micro_batch_size,
                                pad_token_id=tokenizer.pad_token_id, packed=True, share_prompt=share)
        return [to_device(b, ctx.device) for b in micro]

    def update(micro: list[dict]) -> tuple[float, float, float]:
        count = sum(objective.loss.count(b) for b in micro)
        model.zero_grad(set_to_none=True)
        wall, cpu = time.perf_counter(), time.process_time()
        loss, _ = forward_backward(model, micro, objective=objective.loss, count=count, scale=1.0,
                                   precision=precision, device=ctx.device)
        float(loss)  # the update's end (a sync, deliberately: the timer's)
        return time.perf_counter() - wall, time.process_time() - cpu, float(loss)

    configs = {"unshared": False, "shared": True}
    tokens = {name: sum(b["num_tokens"] for b in batches(share)) for name, share in configs.items()}
    grads, times, losses = {}, {name: [] for name in configs}, {}
    for name, share in configs.items():  # warm-up, and the gradients each way (to print their agreement)
        _, _, losses[name] = update(batches(share))
        grads[name] = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
        print(f"{name}: loss {losses[name]:.6g}, non-finite gradient entries {int((~grads[name].isfinite()).sum())} "
              f"of {grads[name].numel()}", file=sys.stderr)
    grad_diff = float((grads["shared"] - grads["unshared"]).norm() / grads["unshared"].norm())
    for _ in range(args.repeats):
        for name, share in configs.items():
            times[name].append(update(batches(share))[:2])
    rows = []
    base = {k: statistics.median(t[k] for t in times["unshared"]) for k in (0, 1)}
    for name in configs:
        wall, cpu = (statistics.median(t[k] for t in times[name]) for k in (0, 1))
        rows.append({"config": name, "tokens_per_update": tokens[name], "wall_ms": round(wall * 1000, 1),
                     "cpu_ms": round(cpu * 1000, 1), "speedup_wall": round(base[0] / wall, 2),
                     "speedup_cpu": round(base[1] / cpu, 2), "loss": losses[name],
                     "timed_ms": [round(t[0] * 1000, 1) for t in times[name]]})
    lengths = [len(c) for c in rollout.completion_ids]
    meta = {"command": "python benchmarks/grpo_update.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "precision": precision, "prompts": len(rollout.prompt_index), "generations": o.num_generations,
            "prompt_lengths": [len(prompts[i]) for i in rollout.prompt_index],
            "completion_lengths_mean": sum(lengths) / len(lengths), "completion_lengths_max": max(lengths),
            "loss_tokens": sum(lengths), "repeats": args.repeats, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "load_average_at_end": os.getloadavg(), "relative_grad_difference": grad_diff}
    tag = args.tag or (f"{ctx.device.type}_quickstart_{precision}" + (f"_len{args.fixed_length}" if args.fixed_length else "")
                       + (f"_synthetic{args.synthetic}" if args.synthetic else ""))
    os.makedirs(args.out_dir, exist_ok=True)
    result = {"meta": meta, "rows": rows}
    with open(os.path.join(args.out_dir, f"grpo_update_{tag}.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = [f"# GRPO update with and without share_prompt ({ctx.device.type}, quickstart shapes, {precision})", "",
             f"`{meta['command']}`", "",
             f"{meta['prompts']} prompts of {meta['prompt_lengths']} tokens x G={meta['generations']}, completions "
             f"of {meta['completion_lengths_mean']:.1f} tokens on average (max {meta['completion_lengths_max']}); "
             f"forward + backward of one rollout, median of {args.repeats} alternating updates after a warm-up, "
             f"{meta['threads']} threads, torch {meta['torch']}. Load average at the end: "
             f"{', '.join(f'{x:.1f}' for x in meta['load_average_at_end'])} (shared machine: read CPU time and the "
             f"same-run ratio). Relative difference of the LoRA gradients, shared vs unshared: {grad_diff:.2e}.", "",
             "| config | tokens per update | wall ms | CPU ms | speed-up (wall) | speed-up (CPU) | timed (ms) |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['tokens_per_update']} | {r['wall_ms']} | {r['cpu_ms']} | "
                     f"{r['speedup_wall']}x | {r['speedup_cpu']}x | {', '.join(map(str, r['timed_ms']))} |")
    with open(os.path.join(args.out_dir, f"grpo_update_{tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
