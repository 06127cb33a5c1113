"""Preference pair formats, rendering and errors; the hostile lines (deep nesting, lone surrogates)
as file:line errors in every format, SFT and pairs, through `python -m engine.data` too."""

from __future__ import annotations

import json

import pytest

from engine.config import DataConfig
from engine.data.__main__ import main as data_main
from engine.data.formats import DataError, load_examples
from engine.preference.data import is_pair_file, load_pair_dataset, load_pairs

STANDARD = {"prompt": "count to 3", "chosen": "1 2 3", "rejected": "no"}
CONVERSATIONAL = {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
                  "chosen": [{"role": "assistant", "content": "hi"}],
                  "rejected": [{"role": "assistant", "content": "go away"}]}


def write(tmp_path, rows, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def cfg(path, tmp_path, **kw):
    return DataConfig(train_path=path, max_seq_len=64, cache_dir=str(tmp_path / "cache"), **kw)


def test_both_formats_render_with_the_template_and_train_on_the_reply_only(tmp_path, tiny_tokenizer):
    path = write(tmp_path, [STANDARD, CONVERSATIONAL])
    ds = load_pair_dataset(path, tiny_tokenizer, cfg(path, tmp_path))
    assert ds.stats.format == "mixed" and ds.stats.kept == 2
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    for doc, row in zip(ds.docs, [STANDARD, CONVERSATIONAL]):
        s = doc["split"]
        for ids, labels, side in ((doc["input_ids"][:s], doc["labels"][:s], "chosen"),
                                  (doc["input_ids"][s:], doc["labels"][s:], "rejected")):
            targets = [y for y in labels if y != -100]
            reply = row[side] if isinstance(row[side], str) else row[side][0]["content"]
            assert tiny_tokenizer.decode(targets) == reply + "<|im_end|>"  # reply + end of turn, no prompt
            assert targets[-1] == im_end
            assert "<|im_start|>user" in tiny_tokenizer.decode(ids)  # rendered with the chat template
        assert doc["input_ids"][:s][:5] == doc["input_ids"][s:][:5]  # the same prompt tokens
    again = load_pair_dataset(path, tiny_tokenizer, cfg(path, tmp_path))
    assert again.from_cache and again.docs == ds.docs


@pytest.mark.parametrize("row, field, why", [
    ({"prompt": "p", "chosen": "a"}, "rejected", "missing"),
    ({"chosen": "a", "rejected": "b"}, "prompt", "missing"),
    ({"prompt": "p", "chosen": "  ", "rejected": "b"}, "chosen", "is an empty reply"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "rejected", "identical to chosen"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "prompt", "is empty"),
    ({"prompt": "p", "chosen": ["a"], "rejected": "b"}, "chosen", "must be a string"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "prompt", "must be a string"),
    ({"prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "user", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "chosen[0].role", "must be 'assistant'"),
    ({"prompt": [{"role": "user", "content": "p"}], "chosen": [], "rejected": [{"role": "assistant", "content": "b"}]},
     "chosen", "non-empty list"),
])
def test_bad_pairs_name_file_line_and_field(tmp_path, row, field, why):
    path = write(tmp_path, [STANDARD, row])
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert f"{path}:2: field '{field}':" in str(e.value) and why in str(e.value)
    skipped = []
    assert len(load_pairs(path, "skip", skipped)) == 1 and skipped == [2]


def test_a_prompt_the_template_refuses_is_a_line_error(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('no system role') }}{% endif %}"
                         "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    path = write(tmp_path, [STANDARD, CONVERSATIONAL])
    with pytest.raises(DataError, match=rf"{path}:2: field 'prompt': chat template failed: .*no system role"):
        load_pair_dataset(path, tok, cfg(path, tmp_path))


def test_too_long_pairs_follow_the_length_policy(tmp_path, tiny_tokenizer):
    long = {"prompt": "count " * 80, "chosen": "1 2 3", "rejected": "no"}
    path = write(tmp_path, [STANDARD, long])
    ds = load_pair_dataset(path, tiny_tokenizer, cfg(path, tmp_path, length_policy="drop"))
    assert ds.stats.kept == 1 and ds.stats.dropped_lines == [2]
    ds = load_pair_dataset(path, tiny_tokenizer, cfg(path, tmp_path, length_policy="truncate"))
    assert ds.stats.kept == 2 and ds.stats.truncated_lines == [2]
    assert all(len(d["input_ids"]) - d["split"] <= 64 and d["split"] <= 64 for d in ds.docs)
    with pytest.raises(DataError, match=rf"{path}:2: field '\(example\)': .* > max_seq_len 64"):
        load_pair_dataset(path, tiny_tokenizer, cfg(path, tmp_path, length_policy="error"))


DEEP = '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"
SFT_ROWS = {  # format: (a valid line, the field that holds its first word)
    "chat": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
             "messages[0].content"),
    "messages_per_line": ({"role": "user", "content": "hi"}, "content"),
    "prompt_completion": ({"prompt": "hi", "completion": "yo"}, "prompt"),
    "alpaca": ({"instruction": "hi", "output": "yo"}, "instruction"),
    "text": ({"text": "hi"}, "text"),
    "pairs": ({"prompt": "hi", "chosen": "1 2 3", "rejected": "no"}, "prompt"),
}


@pytest.mark.parametrize("fmt", list(SFT_ROWS))
@pytest.mark.parametrize("hostile, why", [(DEEP, "nested too deeply"), ("SURROGATE", "lone UTF-16 surrogate")])
def test_hostile_lines_are_line_errors_in_every_format(tmp_path, capsys, fmt, hostile, why):
    good, field = SFT_ROWS[fmt]
    if hostile == "SURROGATE":  # the line's first word followed by an unpaired "\ud800" escape
        hostile = json.dumps(good).replace('"hi"', '"hi\\ud800"', 1)
    else:
        field = "(line)"
    path = write(tmp_path, [good, hostile])
    read = load_pairs if fmt == "pairs" else load_examples
    with pytest.raises(DataError) as e:
        read(path)
    assert f"{path}:2: field '{field}':" in str(e.value) and why in str(e.value)
    assert is_pair_file(path) == (fmt == "pairs")
    assert data_main([path]) == 2  # the command a new user runs: one line, no traceback
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}:2: field '{field}'") and "Traceback" not in err


def test_a_pair_file_given_to_sft_says_which_objective(tmp_path):
    path = write(tmp_path, [STANDARD])
    with pytest.raises(DataError, match="objective=dpo or objective=orpo"):
        load_examples(path)


def test_data_report_covers_pairs(tmp_path, capsys, tiny_llama_dir):
    path = write(tmp_path, [STANDARD, CONVERSATIONAL])
    assert data_main([path, "--tokenizer", str(tiny_llama_dir), "--max-seq-len", "64"]) == 0
    out = capsys.readouterr().out
    assert "preference pairs (mixed)" in out and "pairs kept: 2" in out
    assert "carrying loss: chosen " in out


def test_an_sft_file_given_to_dpo_names_the_missing_fields(tmp_path):
    path = write(tmp_path, [SFT_ROWS["chat"][0]])
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert f"{path}:1: field 'prompt': missing (a preference pair needs prompt, chosen and rejected; " \
           "keys present: 'messages')" in str(e.value)
