"""Data pipeline throughput: tokenization tokens/s (cold vs cached) and packing efficiency.

    python benchmarks/data_throughput.py [PATH ...] [--tokenizer default] [--max-seq-len 2048 4608]

Defaults to the seed's two files (and data/quickstart/train.jsonl when it exists). For every
file and max_seq_len it measures
- cold: load_dataset(cache=False): read JSONL, render the chat template, batched fast-tokenizer
  call, masks, length policy (median of --repeats runs);
- cached: load_dataset from a warm on-disk cache (safetensors), the cost of a second run;
- the share of non-pad tokens: packed best-fit decreasing into max_seq_len rows vs one document
  per max_seq_len row, and the loader's real micro-batches of 2 rows (packed and padded);
- collation: milliseconds to build one packed micro-batch of 2 rows.
Writes benchmarks/results/data_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.config import DataConfig  # noqa: E402
from engine.data import load_dataset, make_loader, pack_documents  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = [os.path.join(ROOT, "data", "seed_msa", name)  # the seed's files, shipped in the repository
        for name in ("formatted_train_set.jsonl", "formatted_test_set.jsonl")]


def _timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def loader_efficiency(loader) -> float:
    """Non-pad share of the loader's real micro-batches over one epoch (rows padded to the
    longest row of their micro-batch, as the loader builds them)."""
    real = slots = 0
    for batch in loader.epoch_batches(0):
        real += batch["num_tokens"]
        slots += batch["input_ids"].numel()
    return real / slots


def measure(path: str, tokenizer, max_seq_len: int, repeats: int) -> dict:
    cfg = DataConfig(train_path=path, max_seq_len=max_seq_len)
    cold_s, ds = _timed(lambda: load_dataset(path, tokenizer, cfg, cache=False), repeats)
    with tempfile.TemporaryDirectory() as cache_dir:
        ccfg = dataclasses.replace(cfg, cache_dir=cache_dir)
        load_dataset(path, tokenizer, ccfg)  # fill
        cached_s, cached = _timed(lambda: load_dataset(path, tokenizer, ccfg), repeats)
        assert cached.from_cache and cached.docs == ds.docs
    s = ds.stats
    lengths = s.doc_lengths
    rows = pack_documents(lengths, max_seq_len)
    loader = make_loader(ds, max_seq_len=max_seq_len, micro_batch_size=2, packing=True, seed=0,
                         pad_token_id=tokenizer.pad_token_id)
    padded = make_loader(ds, max_seq_len=max_seq_len, micro_batch_size=2, packing=False, seed=0,
                         pad_token_id=tokenizer.pad_token_id)
    collate_s, _ = _timed(lambda: list(loader.epoch_batches(0)), repeats)
    raw_tokens = sum(s.raw_lengths)
    return {
        "file": os.path.relpath(path, ROOT) if path.startswith(ROOT) else os.path.join(*path.split(os.sep)[-2:]),
        "max_seq_len": max_seq_len, "examples": s.examples, "documents": s.documents,
        "tokens_before_policy": raw_tokens, "tokens": s.tokens, "loss_tokens": s.loss_tokens,
        "truncated": s.truncated, "answer_truncated": s.answer_truncated,
        "cold_seconds": round(cold_s, 4), "cold_tokens_per_s": round(raw_tokens / cold_s),
        "cached_seconds": round(cached_s, 4), "cached_tokens_per_s": round(raw_tokens / cached_s),
        "cache_speedup": round(cold_s / cached_s, 1),
        "packed_rows": len(rows),
        "packed_efficiency": round(sum(lengths) / (len(rows) * max_seq_len), 4),
        "packed_b2_loader_efficiency": round(loader_efficiency(loader), 4),
        "padded_b2_loader_efficiency": round(loader_efficiency(padded), 4),
        "one_per_row_efficiency": round(sum(lengths) / (len(lengths) * max_seq_len), 4),
        "collate_ms_per_batch": round(1000 * collate_s / max(len(loader), 1), 3),
    }


def to_markdown(results: list[dict], meta: dict) -> str:
    lines = [
        "# Data pipeline throughput",
        "",
        f"Measured {meta['date']} on {meta['machine']} (CPU only, {meta['cpus']} cores shared with other jobs), "
        f"tokenizer `{meta['tokenizer']}`, median of {meta['repeats']} runs.",
        "Tokens/s count the tokens of every example before the length policy. Cold = read + render + "
        "batched tokenization + masks; cached = the second run, read back from the safetensors cache.",
        "Efficiency = share of non-pad tokens. *at L*: documents packed best-fit decreasing into rows of exactly "
        "max_seq_len, vs one document per max_seq_len row. *loader b=2*: the real micro-batches of 2 rows, "
        "each padded only to the longest row of its micro-batch (the loader never pads to max_seq_len), "
        "packed vs padded (one document per row).",
        "",
        "| file | max_seq_len | examples | tokens | loss tokens | truncated (answer cut) | cold tok/s | cached tok/s "
        "| cache speedup | packed rows | packed eff. at L | 1 doc/row eff. at L | loader b=2 packed | loader b=2 padded "
        "| collate ms/batch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['file']} | {r['max_seq_len']} | {r['examples']} | {r['tokens']:,} | {r['loss_tokens']:,} | "
            f"{r['truncated']} ({r['answer_truncated']}) | {r['cold_tokens_per_s']:,} | {r['cached_tokens_per_s']:,} | "
            f"{r['cache_speedup']}x | {r['packed_rows']} | {100 * r['packed_efficiency']:.1f}% | "
            f"{100 * r['one_per_row_efficiency']:.1f}% | {100 * r['packed_b2_loader_efficiency']:.1f}% | "
            f"{100 * r['padded_b2_loader_efficiency']:.1f}% | {r['collate_ms_per_batch']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="*", help="JSONL files (default: the seed files + data/quickstart/train.jsonl)")
    p.add_argument("--tokenizer", default="default")
    p.add_argument("--max-seq-len", type=int, nargs="+", default=[2048, 4608])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args(argv)
    paths = args.paths or SEED + [q for q in [os.path.join(ROOT, "data", "quickstart", "train.jsonl")] if os.path.isfile(q)]

    from engine.data.__main__ import _load_tokenizer

    t0 = time.perf_counter()
    tokenizer = _load_tokenizer(args.tokenizer)
    load_s = time.perf_counter() - t0
    results = []
    for path in paths:
        for L in args.max_seq_len:
            r = measure(path, tokenizer, L, args.repeats)
            results.append(r)
            print(json.dumps(r))
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "tokenizer": args.tokenizer, "repeats": args.repeats,
            "tokenizer_load_seconds": round(load_s, 2), "python": platform.python_version()}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "data_throughput.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    with open(os.path.join(args.out, "data_throughput.md"), "w") as f:
        f.write(to_markdown(results, meta))
    print(to_markdown(results, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
