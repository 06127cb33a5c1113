"""The quickstart preference task: order-to-JSON pairs, the correct answer against a plausible wrong one.

Built on the quickstart orders (engine/tasks/orders.py): the prompt is the system prompt and the
customer's text (conversational format), `chosen` the canonical JSON answer, `rejected` the same
answer with one mistake a model really makes on this task, drawn from `random.Random(seed)`:

| mistake    | what changes                                                         |
|------------|----------------------------------------------------------------------|
| shipping   | express <-> standard                                                 |
| qty        | one item's quantity off by one or two (e.g. "a pair of" read as 1)    |
| color      | one item's color replaced by another                                 |
| plural     | one product name left in the plural the customer wrote               |
| city       | the city replaced by another city (or by the street, a distractor)   |
| item       | one item left out (orders with two or more items)                    |

So chosen and rejected differ in a few tokens: preference accuracy measures whether the model
puts more probability on the exact answer than on a near miss. Held-out prompts never occur in train.
"""

from __future__ import annotations

import copy
import json
import random

from engine.tasks.orders import CITIES, COLORS, PRODUCTS, STREETS, canonical_json, make_splits

MISTAKES = ("shipping", "qty", "color", "plural", "city", "item")


def corrupt(answer: dict, rng: random.Random) -> tuple[dict, str]:
    """(a copy of `answer` with one mistake, the mistake's name)."""
    wrong = copy.deepcopy(answer)
    kinds = [m for m in MISTAKES if m != "item" or len(answer["items"]) > 1]
    kind = rng.choice(kinds)
    item = rng.choice(wrong["items"])
    if kind == "shipping":
        wrong["shipping"] = "standard" if answer["shipping"] == "express" else "express"
    elif kind == "qty":
        item["qty"] = max(1, item["qty"] + rng.choice([-2, -1, 1, 2])) if item["qty"] > 1 else item["qty"] + rng.choice([1, 2])
    elif kind == "color":
        item["color"] = rng.choice([c for c in COLORS if c != item["color"]])
    elif kind == "plural":
        item["product"] = PRODUCTS[item["product"]]
    elif kind == "city":
        wrong["city"] = rng.choice([c for c in CITIES if c != answer["city"]] + STREETS[:3])
    else:
        wrong["items"].remove(item)
    return wrong, kind


def to_pair(example: dict, rng: random.Random) -> dict:
    """An orders chat example -> {"prompt": [system, user], "chosen": [...], "rejected": [...]}."""
    system, user, assistant = example["messages"]
    answer = json.loads(assistant["content"])
    wrong, _ = corrupt(answer, rng)
    return {"prompt": [system, user],
            "chosen": [{"role": "assistant", "content": canonical_json(answer)}],
            "rejected": [{"role": "assistant", "content": canonical_json(wrong)}]}


def make_pair_splits(n_train: int, n_eval: int, train_seed: int = 0, eval_seed: int = 1) -> tuple[list[dict], list[dict]]:
    """Train and held-out preference pairs (the orders' splits, one mistake drawn per example)."""
    train, held_out = make_splits(n_train, n_eval, train_seed, eval_seed)
    rng_train, rng_eval = random.Random(train_seed + 1000), random.Random(eval_seed + 1000)
    return [to_pair(ex, rng_train) for ex in train], [to_pair(ex, rng_eval) for ex in held_out]
