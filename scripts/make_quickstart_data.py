"""Write the quickstart task's data: data/quickstart/train.jsonl and eval.jsonl.

    python scripts/make_quickstart_data.py [--out data/quickstart] [--n-train 600] [--n-eval 60]

Deterministic: the same arguments give byte-identical files (a test checks the committed ones).
Each line is one chat example {"messages": [system, user, assistant]}; see engine/tasks/orders.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from engine.tasks.orders import make_splits  # noqa: E402


def write_jsonl(path: str, examples: list[dict]) -> None:
    # "\n" line ends and UTF-8 output so the bytes do not depend on the platform
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for ex in examples:
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/quickstart")
    parser.add_argument("--n-train", type=int, default=600)
    parser.add_argument("--n-eval", type=int, default=60)
    parser.add_argument("--train-seed", type=int, default=0)
    parser.add_argument("--eval-seed", type=int, default=1)
    args = parser.parse_args(argv)
    train, held_out = make_splits(args.n_train, args.n_eval, args.train_seed, args.eval_seed)
    os.makedirs(args.out, exist_ok=True)
    write_jsonl(os.path.join(args.out, "train.jsonl"), train)
    write_jsonl(os.path.join(args.out, "eval.jsonl"), held_out)
    print(f"wrote {len(train)} train and {len(held_out)} eval examples to {args.out}")


if __name__ == "__main__":
    main()
