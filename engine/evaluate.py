"""Held-out evaluation: token-weighted loss and perplexity, and generation scores, base vs adapter.

The loss is sum(token losses) / count(loss tokens) over the whole file, so packed and padded
batching give the same number (a mean of per-batch means would not).

    python -m engine.evaluate --model default --adapter runs/quickstart/adapter --data data/quickstart/eval.jsonl

writes scores.json, scores.md (| metric | base | base + adapter | change |) and generations.jsonl
(per example: prompt excerpt, reference, base output, adapter output, scores). Scores (see
engine/metrics_text.py): exact match, SQuAD token F1 and ROUGE-L against the final assistant turn
of each example, greedy decoding so reruns give the same numbers; the quickstart's orders task
adds its JSON field accuracies (task_*).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

from engine.cli import run_cli
from engine.config import DataConfig
from engine.data import load_dataset, load_examples, make_loader
from engine.generate import decode, encode_prompt, generate_tokens, load_for_inference, stop_token_ids
from engine.layers.lora import adapters_disabled
from engine.metrics_text import text_scores
from engine.model.isolation import packing_for
from engine.parallel.distributed import DistContext
from engine.tasks import orders
from engine.training import amp
from engine.training.loss import causal_lm_loss
from engine.training.step import to_device


@torch.no_grad()
def heldout_loss(model, dataset, *, max_seq_len: int, batch_size: int, packing: bool, precision: str,
                 device: torch.device, pad_token_id: int, chunk_size: int | None = None,
                 ctx: DistContext | None = None) -> dict:
    """One pass over all of `dataset`; returns {"loss", "ppl", "tokens"}.

    Every rank evaluates the whole file (held-out sets are small; this keeps the number exact
    and independent of the world size)."""
    loader = make_loader(dataset, max_seq_len=max_seq_len, micro_batch_size=batch_size, packing=packing,
                         seed=0, pad_token_id=pad_token_id, shuffle=False)
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for batch in loader.one_pass():
        batch = to_device(batch, device)
        with amp.autocast(precision, device):
            loss_sum, n = causal_lm_loss(model, batch, chunk_size=chunk_size)
        total += loss_sum.double()
        count += n
    model.train(was_training)
    loss = float(total.item()) / max(count, 1)  # sync: the result
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count}


# ============================================================================= generation scores
# Greedy generations on held-out prompts, scored against the reference answer (the final
# assistant turn of each example), for the base model (LoRA switched off with
# `adapters_disabled`) and for base + adapter, side by side.

METRICS = ("exact_match", "token_f1", "rouge_l")


class EvalError(ValueError):
    """Bad evaluation input (no references, unknown task, output path); the message says which."""


def reference_examples(path: str, fmt: str = "auto", max_examples: int | None = None) -> list[dict]:
    """The first `max_examples` conversations of a JSONL file (any format engine.data reads) as
    {"messages": the turns before the final assistant reply, "reference": that reply,
    "source_line": n}. Plain-text examples have no reference and are left out."""

    out = []
    for ex in load_examples(path, fmt):
        msgs = ex.get("messages")
        if not msgs:
            continue
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None or last == 0:
            continue
        out.append({"messages": msgs[:last], "reference": msgs[last]["content"], "source_line": ex["source_line"]})
        if max_examples is not None and len(out) >= max_examples:
            break
    if not out:
        raise EvalError(f"{path}: no example has a prompt followed by an assistant reply to score against "
                        "(plain-text examples have no reference answer)")
    return out


def _task_scorer(task: str | None):
    """(score(prediction, reference) -> dict, name) for a task of engine.tasks, or None."""
    if task is None:
        return None
    if task == "orders":
        return orders.score
    raise EvalError(f"unknown task {task!r} (known: orders)")


def detect_task(examples: list[dict]) -> str | None:
    """"orders" when the examples carry the quickstart task's system prompt, else None."""

    for ex in examples:
        if any(m["role"] == "system" and m["content"] == orders.SYSTEM_PROMPT for m in ex["messages"]):
            return "orders"
    return None


def _score(prediction: str, reference: str, task_score) -> dict:

    scores = text_scores(prediction, reference)
    if task_score is not None:
        try:
            extra = task_score(prediction, reference)
        except ValueError as err:  # json.JSONDecodeError: the reference is not this task's answer
            raise EvalError(f"task scorer: reference {reference[:60]!r} is not an answer of this task ({err})") from None
        scores.update({f"task_{k}": v for k, v in extra.items()})
    return scores


def _mean(rows: list[dict]) -> dict:
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def _excerpt(messages: list[dict], width: int = 200) -> str:
    text = messages[-1]["content"].replace("\n", " ")
    return text if len(text) <= width else text[:width] + "..."


def generation_scores(model, tokenizer, examples: list[dict], *, max_new_tokens: int, batch_size: int,
                      device: torch.device, precision: str, max_prompt_tokens: int | None = None,
                      task: str | None = None, compare_base: bool = True) -> tuple[dict, list[dict]]:
    """Greedy generations for every example, base (adapters off) and base + adapter.

    Returns (table, rows): table = {metric: {"before": base mean, "after": adapter mean}} (before
    is None when compare_base is False), rows = one record per example for generations.jsonl.
    """

    task_score = _task_scorer(task)
    stops = stop_token_ids(tokenizer)
    prompts = [encode_prompt(tokenizer, ex["messages"], max_tokens=max_prompt_tokens) for ex in examples]

    def run() -> list[str]:
        tokens = generate_tokens(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 device=device, precision=precision, stops=stops)
        return [decode(tokenizer, t) for t in tokens]

    base = None
    if compare_base:
        with adapters_disabled(model):
            base = run()
    adapted = run()
    rows, base_scores, adapter_scores = [], [], []
    for i, ex in enumerate(examples):
        after = _score(adapted[i], ex["reference"], task_score)
        before = _score(base[i], ex["reference"], task_score) if base is not None else None
        adapter_scores.append(after)
        if before is not None:
            base_scores.append(before)
        rows.append({"index": i, "source_line": ex["source_line"], "prompt": _excerpt(ex["messages"]),
                     "reference": ex["reference"], "base": base[i] if base is not None else None,
                     "adapter": adapted[i], "scores": {"base": before, "adapter": after}})
    mean_after = _mean(adapter_scores)
    mean_before = _mean(base_scores) if base_scores else {}
    table = {k: {"before": mean_before.get(k), "after": mean_after[k]} for k in mean_after}
    return table, rows


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def scores_markdown(table: dict, n_examples: int, title: str = "Generation scores") -> str:
    """The table as markdown: | metric | base | base + adapter | change |."""
    lines = [f"# {title}", "", f"{n_examples} held-out examples, greedy decoding.", "",
             "| metric | base | base + adapter | change |", "|---|---|---|---|"]
    for name, pair in table.items():
        before, after = pair["before"], pair["after"]
        change = f"{after - before:+.4f}" if before is not None and after is not None else "-"
        lines.append(f"| {name} | {_fmt(before)} | {_fmt(after)} | {change} |")
    return "\n".join(lines) + "\n"


def write_scores(out_dir: str | Path, table: dict, rows: list[dict], meta: dict | None = None) -> None:
    """scores.json ({"table", "examples", **meta}), scores.md and generations.jsonl in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scores.json").write_text(json.dumps({"table": table, "examples": len(rows), **(meta or {})}, indent=2))
    (out / "scores.md").write_text(scores_markdown(table, len(rows)))
    with open(out / "generations.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def adapter_scores(model, tokenizer, cfg, *, device: torch.device, precision: str) -> dict:
    """Mean generation scores of base + adapter on the first cfg.eval.max_examples examples of
    cfg.data.eval_path ({exact_match: ..., token_f1: ..., ...}): an evaluation during training
    whose early-stopping metric is a generation score (no base pass, nothing written)."""
    examples = reference_examples(cfg.data.eval_path, cfg.data.format, cfg.eval.max_examples)
    table, _ = generation_scores(model, tokenizer, examples, max_new_tokens=cfg.eval.max_new_tokens,
                                 batch_size=cfg.eval.batch_size, device=device, precision=precision,
                                 max_prompt_tokens=cfg.data.max_seq_len, task=detect_task(examples),
                                 compare_base=False)
    return {name: pair["after"] for name, pair in table.items()}


def before_after_scores(model, tokenizer, cfg, *, device: torch.device, precision: str,
                        ctx: DistContext | None = None) -> dict:
    """Generation scores at the end of a training run (cfg: RunConfig, eval.generate=true).

    Greedy generations on the first cfg.eval.max_examples examples of cfg.data.eval_path, base
    (adapters switched off) and base + adapter. Returns {"table": {metric: {"before", "after"}},
    "examples": N, "task": name or None}; rank 0 writes generations.jsonl, scores.md and
    scores.json into cfg.output_dir. The quickstart's orders task adds its field scores."""
    examples = reference_examples(cfg.data.eval_path, cfg.data.format, cfg.eval.max_examples)
    task = detect_task(examples)
    table, rows = generation_scores(model, tokenizer, examples, max_new_tokens=cfg.eval.max_new_tokens,
                                    batch_size=cfg.eval.batch_size, device=device, precision=precision,
                                    max_prompt_tokens=cfg.data.max_seq_len, task=task)
    if ctx is None or ctx.is_main:
        write_scores(cfg.output_dir, table, rows, {"task": task, "eval_path": cfg.data.eval_path})
    return {"table": table, "examples": len(rows), "task": task}


# ============================================================================= CLI

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m engine.evaluate",
                                description="Held-out loss and generation scores, base vs base + adapter.")
    p.add_argument("--model", default="default", help="HF model dir, .gguf file, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", default=None, help="adapter directory; without it only the base is scored")
    p.add_argument("--method", choices=("lora", "qlora"), default=None,
                   help="base as trained: float (lora) or 4-bit (qlora); default: what the adapter's run says")
    p.add_argument("--data", required=True, help="held-out JSONL file (any format engine.data reads)")
    p.add_argument("--format", default="auto")
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--generate", action=argparse.BooleanOptionalAction, default=True,
                   help="also score greedy generations against the reference answers")
    p.add_argument("--max-examples", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--task", default=None, help="extra task metrics (orders); default: detected from the data")
    p.add_argument("--out", default=None, help="output directory (default: <adapter>/../eval)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                   help="auto: bf16 on a GPU or CPU that has it, fp16 on older GPUs, fp32 elsewhere")
    args = p.parse_args(argv)
    for key in ("max_seq_len", "batch_size", "max_examples", "max_new_tokens"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    return args


def evaluate(args: argparse.Namespace) -> dict:
    """Run the CLI's evaluation; returns what scores.json holds."""

    if not os.path.isfile(args.data):
        raise EvalError(f"data file {args.data!r} does not exist")
    out = args.out or (os.path.join(os.path.dirname(os.path.abspath(args.adapter)), "eval") if args.adapter else None)
    if out is None:
        raise EvalError("--out is required when no --adapter is given")
    if os.path.exists(out) and not os.path.isdir(out):
        raise EvalError(f"output path {out!r} exists and is not a directory")
    model, tokenizer, info = load_for_inference(args.model, args.adapter, method=args.method, device=args.device,
                                                precision=args.precision)
    device, precision = torch.device(info["device"]), info["precision"]
    packing = packing_for(model, args.packing, precision=precision)
    data_cfg = DataConfig(train_path=args.data, format=args.format, max_seq_len=args.max_seq_len, packing=packing)
    dataset = load_dataset(args.data, tokenizer, data_cfg)
    kwargs = dict(max_seq_len=args.max_seq_len, batch_size=args.batch_size, packing=packing,
                  precision=precision, device=device, pad_token_id=tokenizer.pad_token_id)
    with adapters_disabled(model):
        base_loss = heldout_loss(model, dataset, **kwargs)
    adapter_loss = heldout_loss(model, dataset, **kwargs) if args.adapter else None
    table = {"loss": {"before": base_loss["loss"], "after": adapter_loss and adapter_loss["loss"]},
             "perplexity": {"before": base_loss["ppl"], "after": adapter_loss and adapter_loss["ppl"]}}
    rows: list[dict] = []
    task = args.task
    if args.generate:
        examples = reference_examples(args.data, args.format, args.max_examples)
        task = task or detect_task(examples)
        gen_table, rows = generation_scores(model, tokenizer, examples, max_new_tokens=args.max_new_tokens,
                                            batch_size=args.batch_size, device=device, precision=precision,
                                            max_prompt_tokens=args.max_seq_len, task=task,
                                            compare_base=args.adapter is not None)
        if args.adapter is None:  # only the base was run: its numbers are the "before" column
            gen_table = {k: {"before": v["after"], "after": None} for k, v in gen_table.items()}
            for row in rows:
                row["base"], row["adapter"] = row["adapter"], None
                row["scores"] = {"base": row["scores"]["adapter"], "adapter": None}
        table.update(gen_table)
    meta = {"task": task, "data": args.data, "model": args.model, "adapter": args.adapter, "method": info["method"],
            "packing": packing, "loss_tokens": base_loss["tokens"]}
    write_scores(out, table, rows, meta)
    print(scores_markdown(table, len(rows) if rows else base_loss["tokens"],
                          title=f"Evaluation of {args.adapter or 'the base model'} on {args.data}"))
    print(f"written to {out}/scores.json, scores.md, generations.jsonl", file=sys.stderr)
    return {"table": table, "examples": len(rows), **meta}


def main(argv: list[str] | None = None) -> int:

    args = parse_args(argv)

    def body() -> None:
        evaluate(args)

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
