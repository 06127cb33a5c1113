"""Write the quickstart preference task's data: data/quickstart_dpo/train.jsonl and eval.jsonl.

    python scripts/make_quickstart_dpo_data.py [--out data/quickstart_dpo] [--n-train 400] [--n-eval 60]

Deterministic: the same arguments give byte-identical files (a test checks the committed ones).
Each line is one conversational pair {"prompt": [system, user], "chosen": [assistant], "rejected":
[assistant]}; see engine/tasks/order_preferences.py.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from engine.tasks.order_preferences import make_pair_splits  # noqa: E402
from scripts.make_quickstart_data import write_jsonl  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/quickstart_dpo")
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--n-eval", type=int, default=60)
    args = parser.parse_args(argv)
    train, held_out = make_pair_splits(args.n_train, args.n_eval)
    os.makedirs(args.out, exist_ok=True)
    write_jsonl(os.path.join(args.out, "train.jsonl"), train)
    write_jsonl(os.path.join(args.out, "eval.jsonl"), held_out)
    print(f"wrote {len(train)} train and {len(held_out)} eval pairs to {args.out}")


if __name__ == "__main__":
    main()
