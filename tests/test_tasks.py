"""engine.tasks.orders: deterministic generation, held-out split, scoring, committed data files."""

import json
import os
import subprocess
import sys

import pytest

from engine.tasks.orders import (COLORS, PRODUCTS, SYSTEM_PROMPT, canonical_json, extract_answer,
                                 generate_orders, make_splits, mean_scores, score)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "data", "quickstart")


def test_generation_is_deterministic_and_seed_dependent():
    assert generate_orders(50, seed=3) == generate_orders(50, seed=3)
    assert generate_orders(50, seed=3) != generate_orders(50, seed=4)
    assert generate_orders(0, seed=0) == []
    with pytest.raises(ValueError, match="n must be >= 0"):
        generate_orders(-1, seed=0)


def test_examples_are_chats_with_canonical_answers_grounded_in_the_text():
    for ex in generate_orders(300, seed=0):
        system, user, assistant = ex["messages"]
        assert [m["role"] for m in ex["messages"]] == ["system", "user", "assistant"]
        assert system["content"] == SYSTEM_PROMPT
        answer = json.loads(assistant["content"])
        assert list(answer) == ["customer", "items", "city", "shipping"]
        assert canonical_json(answer) == assistant["content"]  # compact, fixed key order
        text = user["content"]
        assert answer["customer"] in text and answer["city"] in text
        assert answer["shipping"] in ("standard", "express")
        assert 1 <= len(answer["items"]) <= 3
        for item in answer["items"]:
            assert list(item) == ["product", "color", "qty"]
            assert item["product"] in PRODUCTS and item["color"] in COLORS and 1 <= item["qty"] <= 6
            # singular in the answer; the text names it (singular or plural) with its color
            assert item["product"] in text or PRODUCTS[item["product"]] in text
            assert item["color"] in text


def test_surface_forms_vary():
    texts = [ex["messages"][1]["content"] for ex in generate_orders(600, seed=0)]
    assert len(set(texts)) == len(texts)
    openings = {t.split()[0] for t in texts}
    assert len(openings) >= 10
    assert any("x" + str(q) in t for t in texts for q in range(2, 7))   # "mugs x3"
    assert any("a pair of" in t for t in texts)
    assert any(" three " in t for t in texts) and any(" 3 " in t for t in texts)


def test_held_out_split_has_no_train_text():
    train, held_out = make_splits(200, 40, train_seed=0, eval_seed=1)
    assert len(train) == 200 and len(held_out) == 40
    train_texts = {ex["messages"][1]["content"] for ex in train}
    eval_texts = [ex["messages"][1]["content"] for ex in held_out]
    assert not train_texts & set(eval_texts) and len(set(eval_texts)) == 40
    assert make_splits(200, 40) == (train, held_out)


def test_held_out_split_skips_colliding_draws(monkeypatch):
    """With only 8 possible orders, eval draws often repeat a train text and must be skipped."""
    import engine.tasks.orders as orders

    calls = []

    def few_orders(rng):
        calls.append(1)
        k = rng.randrange(8)
        return f"order {k}", {"customer": str(k), "items": [], "city": "Oslo", "shipping": "standard"}

    monkeypatch.setattr(orders, "_order", few_orders)
    train, held_out = orders.make_splits(5, 2)
    train_texts = {ex["messages"][1]["content"] for ex in train}
    eval_texts = {ex["messages"][1]["content"] for ex in held_out}
    assert len(train_texts) < 8 and len(eval_texts) == 2 and not train_texts & eval_texts
    assert len(calls) > 5 + 2  # some eval draws were skipped

def test_score_exact_json_valid_and_fields():
    ref = canonical_json({"customer": "Anna Berg", "items": [{"product": "mug", "color": "blue", "qty": 3}],
                          "city": "Oslo", "shipping": "express"})
    perfect = score("  " + ref + "\n", ref)
    assert perfect == {"exact": 1.0, "json_valid": 1.0, "customer": 1.0, "items": 1.0, "city": 1.0,
                       "shipping": 1.0}
    spaced = json.dumps(json.loads(ref))  # same object, other spelling: fields right, not exact
    assert score(spaced, ref) == dict(perfect, exact=0.0)
    wrong_city = ref.replace("Oslo", "Bergen")
    assert score(wrong_city, ref) == dict(perfect, exact=0.0, city=0.0)
    chatty = "Sure! Here it is: " + ref.replace('"qty":3', '"qty":2') + " Anything else?"
    assert score(chatty, ref) == dict(perfect, exact=0.0, items=0.0)
    assert score("I cannot help with that.", ref) == {
        "exact": 0.0, "json_valid": 0.0, "customer": 0.0, "items": 0.0, "city": 0.0, "shipping": 0.0}
    assert score('["not", "an", "object"]', ref)["json_valid"] == 0.0
    assert mean_scores([perfect, score(wrong_city, ref)])["city"] == 0.5
    with pytest.raises(ValueError, match="no scores"):
        mean_scores([])


def test_extract_answer():
    assert extract_answer('noise {"a": {"b": 1}} trailing }') == '{"a": {"b": 1}}'
    assert extract_answer("  no json here ") == "no json here"
    assert extract_answer('{"unterminated": ') == '{"unterminated":'


def test_committed_files_regenerate_byte_identical(tmp_path):
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_quickstart_data.py"),
                    "--out", str(tmp_path)], check=True, capture_output=True, cwd=tmp_path)
    for name in ("train.jsonl", "eval.jsonl"):
        with open(os.path.join(DATA, name), "rb") as committed, open(tmp_path / name, "rb") as fresh:
            assert committed.read() == fresh.read(), f"data/quickstart/{name} is stale: rerun the script"
    lines = (tmp_path / "train.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 600 and json.loads(lines[0])["messages"][0]["role"] == "system"
    assert len((tmp_path / "eval.jsonl").read_text(encoding="utf-8").splitlines()) == 60
