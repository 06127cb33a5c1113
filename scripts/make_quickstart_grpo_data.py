"""Write the GRPO quickstart's prompts: data/quickstart_grpo/train.jsonl and eval.jsonl.

    python scripts/make_quickstart_grpo_data.py [--out data/quickstart_grpo] [--n-train 400] [--n-eval 32]

Deterministic (the orders task's seeded generator, engine/tasks/orders.py). Each line is a TRL
conversational prompt {"prompt": [user], "answer": city}: the order text and the question of
engine/tasks/orders_rewards.py::CITY_QUESTION; `answer` reaches the reward functions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from engine.tasks.orders import make_splits  # noqa: E402
from engine.tasks.orders_rewards import city_prompt  # noqa: E402


def rows(examples: list[dict]) -> list[dict]:
    return [{"prompt": city_prompt(ex["messages"][1]["content"]),
             "answer": json.loads(ex["messages"][2]["content"])["city"]} for ex in examples]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/quickstart_grpo")
    parser.add_argument("--n-train", type=int, default=400)
    parser.add_argument("--n-eval", type=int, default=32)
    args = parser.parse_args(argv)
    train, held_out = make_splits(args.n_train, args.n_eval, train_seed=10, eval_seed=11)
    os.makedirs(args.out, exist_ok=True)
    for name, examples in (("train", train), ("eval", held_out)):
        with open(os.path.join(args.out, f"{name}.jsonl"), "w", encoding="utf-8", newline="\n") as f:
            for row in rows(examples):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(train)} train and {len(held_out)} eval prompts to {args.out}")


if __name__ == "__main__":
    main()
