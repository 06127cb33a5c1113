"""Tokenization throughput by source format: the same N rows as JSONL and as Parquet.

    python benchmarks/data_sources.py [--rows 100000] [--tokenizer default] [--max-seq-len 1024]

Builds N chat rows from data/quickstart/train.jsonl (cycled, each user turn tagged with its row
number so no two rows are equal), writes them once as JSONL and once as Parquet (pyarrow, row
groups of 10,000), and times for each, in the same run:
- read: load_examples (rows -> normalized examples; JSON parsing vs Arrow record batches);
- tokenize: load_dataset(cache=False): read + render the chat template + batched fast-tokenizer
  call + masks + length policy, in rows/s and tokens/s (tokens of every example before the
  length policy).
It also checks that both give the same documents (a digest of each; each format's documents are
freed before the next is measured, so both start from the same heap). Writes benchmarks/results/data_sources.{json,md}.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.config import DataConfig  # noqa: E402
from engine.data import load_dataset, load_examples  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "data", "quickstart", "train.jsonl")


def make_rows(n: int) -> list[dict]:
    with open(QUICKSTART, encoding="utf-8") as f:
        base = [json.loads(line) for line in f if line.strip()]
    rows = []
    for i in range(n):
        row = json.loads(json.dumps(base[i % len(base)]))
        row["messages"][1]["content"] += f" (order {i})"
        rows.append(row)
    return rows


def write_files(rows: list[dict], directory: str) -> dict[str, str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = os.path.join(directory, "rows.jsonl")
    with open(jsonl, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    parquet = os.path.join(directory, "rows.parquet")
    pq.write_table(pa.Table.from_pylist(rows), parquet, row_group_size=10_000)
    return {"jsonl": jsonl, "parquet": parquet}


def docs_digest(docs: list[dict]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(json.dumps([d["input_ids"], d["labels"], d["source_line"]]).encode())
    return h.hexdigest()


def measure(kind: str, path: str, tokenizer, max_seq_len: int) -> tuple[dict, str]:
    t0 = time.perf_counter()
    examples = load_examples(path)
    read_s = time.perf_counter() - t0
    n = len(examples)
    del examples
    gc.collect()
    cfg = DataConfig(train_path=path, max_seq_len=max_seq_len)
    t0 = time.perf_counter()
    ds = load_dataset(path, tokenizer, cfg, cache=False)
    tok_s = time.perf_counter() - t0
    tokens = sum(ds.stats.raw_lengths)
    digest = docs_digest(ds.docs)
    del ds
    gc.collect()  # the next format starts from the same heap (a large heap slows Python's collector)
    return {"format": kind, "rows": n, "file_mb": round(os.path.getsize(path) / 2**20, 1),
            "read_s": round(read_s, 2), "read_rows_per_s": round(n / read_s),
            "tokenize_s": round(tok_s, 2), "rows_per_s": round(n / tok_s),
            "tokens": tokens, "tokens_per_s": round(tokens / tok_s)}, digest


def to_markdown(results: list[dict], meta: dict) -> str:
    lines = [
        "# Tokenization throughput by source format",
        "",
        f"Measured {meta['date']} on {meta['machine']} (CPU only, {meta['cpus']} cores shared with other jobs), "
        f"tokenizer `{meta['tokenizer']}`, max_seq_len {meta['max_seq_len']}, one run each, both in the same process.",
        f"Command: `{meta['command']}`",
        "",
        "Rows: the quickstart chats cycled to N rows (each user turn tagged with its row number). *read*: rows -> "
        "examples only; *tokenize*: load_dataset without the cache (read + render + tokenize + masks + length "
        "policy). Both formats gave identical documents: " + ("yes" if meta["identical"] else "NO") + ".",
        "",
        "| format | rows | file MB | read s | read rows/s | tokenize s | rows/s | tokens | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['format']} | {r['rows']:,} | {r['file_mb']} | {r['read_s']} | {r['read_rows_per_s']:,} | "
                     f"{r['tokenize_s']} | {r['rows_per_s']:,} | {r['tokens']:,} | {r['tokens_per_s']:,} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--tokenizer", default="default")
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args(argv)

    from engine.data.__main__ import _load_tokenizer

    tokenizer = _load_tokenizer(args.tokenizer)
    results, docs = [], {}
    with tempfile.TemporaryDirectory() as directory:
        files = write_files(make_rows(args.rows), directory)
        gc.collect()
        for kind, path in files.items():
            r, docs[kind] = measure(kind, path, tokenizer, args.max_seq_len)
            results.append(r)
            print(json.dumps(r), flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "tokenizer": args.tokenizer, "max_seq_len": args.max_seq_len,
            "python": platform.python_version(), "identical": docs["jsonl"] == docs["parquet"],
            "command": "python benchmarks/data_sources.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "data_sources.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    with open(os.path.join(args.out, "data_sources.md"), "w") as f:
        f.write(to_markdown(results, meta))
    print(to_markdown(results, meta))
    return 0 if meta["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
