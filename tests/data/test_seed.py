"""The seed's real files with the real SmolLM2 tokenizer (loaded once per session)."""

import json


from engine.data import load_dataset
from tests.data.conftest import SEED_TEST


def test_seed_conversations_and_end_of_turn_loss(smol_tok, seed_file, cfg, trained_text):
    ds = load_dataset(seed_file, smol_tok, cfg(max_seq_len=4608), cache=False)
    s = ds.stats
    assert s.format == "messages_per_line" and s.examples == s.conversations == s.documents == 17
    assert s.truncated == s.dropped == s.no_trainable == s.skipped == 0
    rows = [json.loads(line) for line in open(seed_file)]
    im_end = smol_tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end == smol_tok.eos_token_id == smol_tok.pad_token_id  # pad == eos: EOS must still be trained
    for d in ds.docs:
        answer = rows[d["source_line"] + 1]  # the conversation's third line
        assert answer["role"] == "assistant"
        trained = [t for t in d["labels"] if t != -100]
        assert trained[-1] == im_end and trained.count(im_end) == 1
        assert trained_text(smol_tok, d) == answer["content"] + "<|im_end|>"
    assert s.loss_tokens < 0.5 * s.tokens  # the long contracts are prompt, not targets


def test_seed_truncated_at_2048_keeps_question_and_answer(smol_tok, cfg, trained_text):
    from engine.data.formats import load_examples

    path = SEED_TEST
    ds = load_dataset(path, smol_tok, cfg(max_seq_len=2048), cache=False)
    examples = {e["source_line"]: e for e in load_examples(path)}
    assert ds.stats.truncated == 17
    for d in ds.docs:
        assert len(d["input_ids"]) <= 2048
        if d["source_line"] in ds.stats.answer_truncated_lines:
            continue
        system, question, answer = (m["content"] for m in examples[d["source_line"]]["messages"])
        text = smol_tok.decode(d["input_ids"])
        assert text.startswith("<|im_start|>system\n" + system[:200])
        assert text.endswith(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n")
        assert trained_text(smol_tok, d) == answer + "<|im_end|>"
