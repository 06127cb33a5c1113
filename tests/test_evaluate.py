"""Evaluation: text metrics, held-out loss packed == padded, generation scores base vs adapter,
before_after_scores for the training loop, the CLI and its error paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.config import DataConfig, EvalConfig, ModelConfig, PeftConfig, RunConfig
from engine.evaluate import (EvalError, before_after_scores, detect_task, generation_scores, heldout_loss, main,
                             reference_examples)
from engine.layers.lora import lora_modules
from engine.layers.inject import inject_lora
from engine.metrics_text import exact_match, lcs_length, normalize, rouge_l, text_scores, token_f1
from tests.conftest import make_tiny_model, make_tiny_model_dir

WORDS = "the quick brown fox jumps over lazy dog capital of france paris hello how are you".split()


# ----------------------------------------------------------------------------- metrics

def test_normalize_like_squad():
    assert normalize("The  Cat, sat on a MAT!") == "cat sat on mat"
    assert normalize("An apple-pie.") == "applepie"


def test_exact_match_and_f1():
    assert exact_match("Paris.", "paris") == 1.0
    assert exact_match("Paris is", "paris") == 0.0
    # pred tokens [paris, is, capital], ref [capital, is, paris, france]: common 3, P=1, R=3/4
    assert token_f1("Paris is the capital", "The capital is Paris, France") == pytest.approx(2 * 0.75 / 1.75)
    assert token_f1("a b b", "b b b") == pytest.approx(2 * (2 / 2) * (2 / 3) / (1 + 2 / 3))  # 'a' is an article
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0 and token_f1("x", "y") == 0.0


def test_rouge_l():
    assert lcs_length("a b c d e".split(), "a c e f".split()) == 3
    # pred [police, killed, gunman], ref [police, kill, gunman]: LCS 2, P = R = 2/3
    assert rouge_l("police killed the gunman", "the police kill the gunman") == pytest.approx(2 / 3)
    assert rouge_l("x y z", "x y z") == 1.0 and rouge_l("", "x") == 0.0
    assert set(text_scores("a", "b")) == {"exact_match", "token_f1", "rouge_l"}


# ----------------------------------------------------------------------------- references

def write_chats(path: Path, n: int, seed: int, system: str | None = None) -> Path:
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for _ in range(n):
            k = int(torch.randint(2, 12, (1,), generator=g))
            user = " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g))
            msgs = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": user}, {"role": "assistant", "content": " ".join(reversed(user.split()))}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def test_reference_examples_split_prompt_and_final_reply(tmp_path):
    path = tmp_path / "pc.jsonl"
    path.write_text(json.dumps({"prompt": "q1", "completion": "a1"}) + "\n" + json.dumps({"prompt": "q2", "completion": "a2"}) + "\n")
    examples = reference_examples(str(path), max_examples=1)
    assert examples == [{"messages": [{"role": "user", "content": "q1"}], "reference": "a1", "source_line": 1}]
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "just text"}) + "\n")
    with pytest.raises(EvalError, match="text.jsonl: no example has a prompt followed by an assistant reply"):
        reference_examples(str(text))


def test_detect_orders_task(tmp_path):
    from engine.tasks.orders import generate_orders, SYSTEM_PROMPT

    path = tmp_path / "orders.jsonl"
    path.write_text("".join(json.dumps(ex) + "\n" for ex in generate_orders(3, seed=0)))
    examples = reference_examples(str(path))
    assert detect_task(examples) == "orders"
    assert detect_task(reference_examples(str(write_chats(tmp_path / "c.jsonl", 2, 0)))) is None
    assert examples[0]["messages"][0]["content"] == SYSTEM_PROMPT


# ----------------------------------------------------------------------------- held-out loss

@pytest.fixture(scope="module")
def lora_model():
    model, tokenizer = make_tiny_model("llama")
    torch.manual_seed(1)
    inject_lora(model, "all-linear", r=4, alpha=8)
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.3)
    return model.eval(), tokenizer


def test_heldout_loss_packed_equals_padded(tmp_path, lora_model):
    from engine.data import load_dataset

    model, tokenizer = lora_model
    path = write_chats(tmp_path / "eval.jsonl", 12, seed=3)
    results = {}
    for packing in (True, False):
        cfg = DataConfig(train_path=str(path), max_seq_len=96, packing=packing, cache_dir=str(tmp_path / "cache"))
        dataset = load_dataset(str(path), tokenizer, cfg)
        results[packing] = heldout_loss(model, dataset, max_seq_len=96, batch_size=3, packing=packing,
                                        precision="fp32", device=torch.device("cpu"),
                                        pad_token_id=tokenizer.pad_token_id)
    assert results[True]["tokens"] == results[False]["tokens"] > 0
    assert results[True]["loss"] == pytest.approx(results[False]["loss"], rel=1e-6)
    assert results[True]["ppl"] == pytest.approx(results[False]["ppl"], rel=1e-6)


# ----------------------------------------------------------------------------- generation scores

def test_generation_scores_base_vs_adapter(lora_model):
    """References set to the base model's own greedy outputs: base scores 1 on every metric,
    the adapter (which generates something else) less."""
    from engine.generate import decode, encode_prompt, generate_tokens
    from engine.layers.lora import adapters_disabled

    model, tokenizer = lora_model
    chats = [[{"role": "user", "content": " ".join(WORDS[i:i + 4])}] for i in range(0, 12, 3)]
    with adapters_disabled(model):
        base_out = [decode(tokenizer, t) for t in generate_tokens(
            model, tokenizer, [encode_prompt(tokenizer, c) for c in chats], max_new_tokens=6)]
    examples = [{"messages": c, "reference": r, "source_line": i + 1} for i, (c, r) in enumerate(zip(chats, base_out))]
    table, rows = generation_scores(model, tokenizer, examples, max_new_tokens=6, batch_size=3,
                                    device=torch.device("cpu"), precision="fp32")
    assert set(table) == {"exact_match", "token_f1", "rouge_l"}
    for metric in table:
        assert table[metric]["before"] == 1.0
        assert table[metric]["after"] < 1.0
    assert [r["base"] for r in rows] == base_out
    assert rows[0]["scores"]["base"]["exact_match"] == 1.0 and rows[0]["prompt"] == chats[0][-1]["content"]


def test_task_metrics_are_added(lora_model, tmp_path):
    from engine.tasks.orders import generate_orders

    model, tokenizer = lora_model
    path = tmp_path / "orders.jsonl"
    path.write_text("".join(json.dumps(ex) + "\n" for ex in generate_orders(2, seed=0)))
    examples = reference_examples(str(path))
    table, rows = generation_scores(model, tokenizer, examples, max_new_tokens=4, batch_size=2,
                                    device=torch.device("cpu"), precision="fp32", task="orders", max_prompt_tokens=64)
    assert {"task_json_valid", "task_customer", "task_items", "task_city", "task_shipping"} <= set(table)
    assert table["task_json_valid"]["after"] == 0.0  # 4 random tokens are no JSON object
    with pytest.raises(EvalError, match="unknown task 'nope'"):
        generation_scores(model, tokenizer, examples, max_new_tokens=1, batch_size=2, device=torch.device("cpu"),
                          precision="fp32", task="nope")


def test_before_after_scores_for_the_training_loop(tmp_path):
    from engine.model.build import build_model

    model_dir = make_tiny_model_dir(tmp_path, "llama")
    evalf = write_chats(tmp_path / "eval.jsonl", 5, seed=2)
    cfg = RunConfig(output_dir=str(tmp_path / "run"), model=ModelConfig(path=str(model_dir)),
                    data=DataConfig(train_path=str(evalf), eval_path=str(evalf), max_seq_len=64),
                    peft=PeftConfig(r=4, alpha=8), eval=EvalConfig(generate=True, max_examples=3, max_new_tokens=5,
                                                                   batch_size=2)).validate()
    torch.manual_seed(0)
    model, tokenizer = build_model(cfg.model, cfg.peft, device="cpu", compute_dtype=torch.float32)
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.3)
    result = before_after_scores(model, tokenizer, cfg, device=torch.device("cpu"), precision="fp32")
    assert result["examples"] == 3 and result["task"] is None
    assert set(result["table"]) == {"exact_match", "token_f1", "rouge_l"}
    for pair in result["table"].values():
        assert 0.0 <= pair["before"] <= 1.0 and 0.0 <= pair["after"] <= 1.0
    out = Path(cfg.output_dir)
    rows = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and {"prompt", "reference", "base", "adapter", "scores"} <= set(rows[0])
    assert rows[0]["base"] != rows[0]["adapter"]
    assert "| exact_match |" in (out / "scores.md").read_text()


# ----------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    from engine.export.adapter import save_adapter
    from engine.model.build import load_base_model

    root = tmp_path_factory.mktemp("evalcli")
    model_dir = make_tiny_model_dir(root, "llama")
    model = load_base_model(str(model_dir))
    torch.manual_seed(0)
    inject_lora(model, "all-linear", 4, 8)
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.3)
    save_adapter(model, str(root / "run" / "adapter"), PeftConfig(r=4, alpha=8), str(model_dir))
    return root, model_dir, root / "run" / "adapter", write_chats(root / "eval.jsonl", 6, seed=5)


@pytest.mark.slow
def test_cli_writes_scores_and_generations(cli_setup, capsys):
    root, model_dir, adapter, data = cli_setup
    args = ["--model", str(model_dir), "--adapter", str(adapter), "--data", str(data), "--max-seq-len", "64",
            "--max-examples", "4", "--max-new-tokens", "5", "--batch-size", "2", "--precision", "fp32"]
    assert main(args) == 0
    out = root / "run" / "eval"  # default: next to the adapter
    scores = json.loads((out / "scores.json").read_text())
    assert {"loss", "perplexity", "exact_match", "token_f1", "rouge_l"} <= set(scores["table"])
    assert scores["table"]["loss"]["before"] != scores["table"]["loss"]["after"]
    assert scores["examples"] == 4 and len((out / "generations.jsonl").read_text().splitlines()) == 4
    assert "| token_f1 |" in capsys.readouterr().out
    # padded batches give the same held-out loss
    assert main(args + ["--no-packing", "--no-generate", "--out", str(root / "padded")]) == 0
    padded = json.loads((root / "padded" / "scores.json").read_text())["table"]["loss"]
    assert padded["after"] == pytest.approx(scores["table"]["loss"]["after"], rel=1e-6)
    assert padded["before"] == pytest.approx(scores["table"]["loss"]["before"], rel=1e-6)


def test_cli_bad_inputs(cli_setup, tmp_path, capsys):
    root, model_dir, adapter, data = cli_setup
    base = ["--model", str(model_dir), "--out", str(tmp_path / "o")]
    cases = [(["--adapter", str(adapter), "--data", str(tmp_path / "none.jsonl")], "none.jsonl' does not exist"),
             (["--adapter", str(tmp_path / "gone"), "--data", str(data)], "gone' does not exist")]
    bad = tmp_path / "bad_adapter"
    bad.mkdir()
    config = json.loads((adapter / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps(dict(config, target_modules=["c_attn"])))
    (bad / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    cases.append((["--adapter", str(bad), "--data", str(data)], "c_attn"))
    for extra, message in cases:
        assert main(base + extra) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_training_run_reports_generation_scores(tmp_path, capsys):
    """engine.train with eval.generate=true (QLoRA: generation on a 4-bit base) puts the table in
    the summary, prints it, and writes the generations next to the run."""
    from engine.config import OptimConfig, TrainConfig
    from engine.train import run_training

    model_dir = make_tiny_model_dir(tmp_path, "llama")
    train, evalf = write_chats(tmp_path / "train.jsonl", 16, seed=1), write_chats(tmp_path / "eval.jsonl", 4, seed=2)
    cfg = RunConfig(output_dir=str(tmp_path / "run"), model=ModelConfig(path=str(model_dir)),
                    data=DataConfig(train_path=str(train), eval_path=str(evalf), max_seq_len=64),
                    peft=PeftConfig(method="qlora", r=4, alpha=8), optim=OptimConfig(lr=3e-2),
                    train=TrainConfig(max_steps=3, micro_batch_size=2, plots=False),
                    eval=EvalConfig(generate=True, max_examples=4, max_new_tokens=6)).validate()
    summary = run_training(cfg)
    table = summary["scores"]["table"]
    assert set(table) == {"exact_match", "token_f1", "rouge_l"} and summary["scores"]["examples"] == 4
    assert "| rouge_l |" in capsys.readouterr().out
    assert len((tmp_path / "run" / "generations.jsonl").read_text().splitlines()) == 4
