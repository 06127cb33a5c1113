"""The quickstart preference set: deterministic, one near miss per pair, held-out prompts unseen."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from engine.tasks.order_preferences import MISTAKES, corrupt, make_pair_splits
from engine.tasks.orders import generate_orders

ROOT = Path(__file__).resolve().parents[2]


def test_every_mistake_changes_the_answer_and_all_kinds_occur():
    import random

    rng = random.Random(0)
    kinds = Counter()
    for ex in generate_orders(300, 5):
        answer = json.loads(ex["messages"][2]["content"])
        wrong, kind = corrupt(answer, rng)
        assert wrong != answer and answer == json.loads(ex["messages"][2]["content"])  # a copy was changed
        kinds[kind] += 1
    assert set(kinds) == set(MISTAKES)


def test_splits_are_disjoint_and_in_trl_conversational_format():
    train, held_out = make_pair_splits(50, 20)
    seen = {p["prompt"][1]["content"] for p in train}
    assert not any(p["prompt"][1]["content"] in seen for p in held_out)
    for p in train + held_out:
        assert [m["role"] for m in p["prompt"]] == ["system", "user"]
        assert p["chosen"][0]["role"] == p["rejected"][0]["role"] == "assistant"
        assert p["chosen"] != p["rejected"]


def test_committed_files_are_what_the_script_writes(tmp_path):
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_quickstart_dpo_data.py"),
                    "--out", str(tmp_path)], check=True, capture_output=True)
    for name in ("train.jsonl", "eval.jsonl"):
        assert (ROOT / "data" / "quickstart_dpo" / name).read_bytes() == (tmp_path / name).read_bytes(), \
            f"data/quickstart_dpo/{name} is stale: rerun scripts/make_quickstart_dpo_data.py"
