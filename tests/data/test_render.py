"""Rendering, loss masks (shifted labels), EOS handling, length policy and dataset-level errors."""


import pytest

from engine.config import ConfigError
from engine.data import DataError, load_dataset

IM_END = "<|im_end|>"


def _chat(*turns, system=None):
    msgs = [{"role": "system", "content": system}] if system else []
    roles = ["user", "assistant"]
    return {"messages": [*msgs, *({"role": roles[i % 2], "content": t} for i, t in enumerate(turns))]}


def test_labels_are_shifted_and_last_is_ignored(tok, write_jsonl, cfg):
    ds = load_dataset(write_jsonl([_chat("hi", "hello there")]), tok, cfg(), cache=False)
    d = ds.docs[0]
    ids, labels = d["input_ids"], d["labels"]
    assert len(ids) == len(labels) and labels[-1] == -100
    for t in range(len(ids) - 1):
        assert labels[t] in (-100, ids[t + 1])
    assert ds.stats.loss_tokens == sum(x != -100 for x in labels)


def test_multi_turn_assistant_mask(tok, write_jsonl, cfg, trained_text):
    path = write_jsonl([_chat("What is 1?", "One.", "And 2?", "Two, the number.", system="Be brief.")])
    d = load_dataset(path, tok, cfg(), cache=False).docs[0]
    # every reply and its end-of-turn token carry loss; nothing of the prompts does
    assert trained_text(tok, d) == f"One.{IM_END}Two, the number.{IM_END}"
    assert sum(t == tok.eos_token_id for t in d["labels"]) == 2


def test_conversation_opening_with_the_assistant(tok, write_jsonl, cfg, trained_text):
    """A greeting before any user turn: templates refuse to render the empty conversation before
    it, so its span is found in its own rendering, after its header (its text "a" also occurs
    inside the header "<|im_start|>assistant")."""
    path = write_jsonl([{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"},
                                      {"role": "assistant", "content": "Fine."}]}])
    d = load_dataset(path, tok, cfg(), cache=False).docs[0]
    assert trained_text(tok, d) == f"a{IM_END}Fine.{IM_END}"


def test_last_assistant_and_all(tok, write_jsonl, cfg, trained_text):
    path = write_jsonl([_chat("q1", "a1", "q2", "a2")])
    d = load_dataset(path, tok, cfg(loss_on="last_assistant"), cache=False).docs[0]
    assert trained_text(tok, d) == f"a2{IM_END}"
    d = load_dataset(path, tok, cfg(loss_on="all"), cache=False).docs[0]
    assert d["labels"][:-1] == d["input_ids"][1:]  # every token but the first is a target
    text = tok.apply_chat_template(_chat("q1", "a1", "q2", "a2")["messages"], tokenize=False)
    assert tok.decode(d["input_ids"]) == text


def test_prompt_completion_and_alpaca_masks(tok, write_jsonl, cfg, trained_text):
    d = load_dataset(write_jsonl([{"prompt": "Capital of France?", "completion": "Paris."}], "pc.jsonl"),
                     tok, cfg(), cache=False).docs[0]
    assert trained_text(tok, d) == f"Paris.{IM_END}"
    assert "Capital of France?" in tok.decode(d["input_ids"])
    d = load_dataset(write_jsonl([{"instruction": "Add.", "input": "1 2", "output": "3"}], "al.jsonl"),
                     tok, cfg(), cache=False).docs[0]
    assert trained_text(tok, d) == f"3{IM_END}"
    assert "<|im_start|>user\nAdd.\n\n1 2<|im_end|>" in tok.decode(d["input_ids"])


def test_text_gets_loss_everywhere_and_an_eos(tok, write_jsonl, cfg, trained_text):
    d = load_dataset(write_jsonl([{"text": "The quick brown fox."}]), tok, cfg(), cache=False).docs[0]
    ids = d["input_ids"]
    assert ids[-1] == tok.eos_token_id and d["labels"][:-1] == ids[1:]
    assert tok.decode(ids) == f"The quick brown fox.{IM_END}"


def test_no_template_uses_chatml_fallback_with_warning(tok, write_jsonl, cfg, trained_text):
    tok.chat_template = None
    with pytest.warns(UserWarning, match="ChatML fallback"):
        ds = load_dataset(write_jsonl([_chat("hi", "yo")]), tok, cfg(), cache=False)
    assert ds.stats.template_fallback
    assert trained_text(tok, ds.docs[0]) == f"yo{IM_END}"


def test_template_without_closing_token_gets_eos(tok, write_jsonl, cfg, trained_text):
    # a template that closes assistant turns with plain text only: the model would never learn to stop
    tok.chat_template = ("{% for m in messages %}{{ '### ' + m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '### assistant: ' }}{% endif %}")
    ds = load_dataset(write_jsonl([_chat("q1", "a1", "q2", "a2")]), tok, cfg(), cache=False)
    # EOS inserted after the final reply. (" a1": the byte-level token " a1" straddles the
    # template's space and the reply; a token overlapping a reply carries loss.)
    assert trained_text(tok, ds.docs[0]) == f" a1 a2{IM_END}"
    assert ds.stats.eos_inserted == 1


def test_template_rewriting_earlier_turns_uses_fallback_search(tok, write_jsonl, cfg, trained_text):
    # renders earlier replies differently from the last one ("[old]" marker), so prefixes differ
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
                         "{% if m['role'] == 'assistant' and not loop.last %}{{ '[old] ' }}{% endif %}"
                         "{{ m['content'] + '<|im_end|>\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    d = load_dataset(write_jsonl([_chat("q1", "first answer", "q2", "second answer")]), tok, cfg(),
                     cache=False).docs[0]
    # the template's "[old] " is not trained (" first" is one token straddling its space)
    assert trained_text(tok, d) == f" first answer{IM_END}second answer{IM_END}"


def test_template_error_names_the_line(tok, write_jsonl, cfg):
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    path = write_jsonl([_chat("q", "a"), _chat("q", "a")])
    with pytest.raises(DataError, match=rf"^{path}:1: field 'messages': chat template failed: .*roles must alternate"):
        load_dataset(path, tok, cfg(), cache=False)
    with pytest.raises(DataError, match="no example has a trainable token"):
        load_dataset(path, tok, cfg(on_bad_line="skip"), cache=False)


# ----------------------------------------------------------------------------- length policy

SYSTEM = " ".join(f"clause {i} says the quick brown fox." for i in range(40))


def _long(write_jsonl, answer="Paris is the capital."):
    return write_jsonl([_chat("What is the capital of France?", answer, system=SYSTEM)])


def test_truncate_cuts_the_middle_of_the_prompt(tok, write_jsonl, cfg, trained_text):
    path = _long(write_jsonl)
    full = load_dataset(path, tok, cfg(max_seq_len=4096), cache=False).docs[0]
    L = 160
    assert len(full["input_ids"]) > L
    ds = load_dataset(path, tok, cfg(max_seq_len=L), cache=False)
    d = ds.docs[0]
    assert len(d["input_ids"]) == L
    assert ds.stats.truncated_lines == [1] and ds.stats.answer_truncated == 0
    tail = tok.encode("<|im_start|>user\nWhat is the capital of France?", add_special_tokens=False)
    n_tail = len(full["input_ids"]) - _find(full["input_ids"], tail)
    # head = the system prompt's start; tail = the question + the whole answer, untouched
    assert d["input_ids"][: L - n_tail] == full["input_ids"][: L - n_tail]
    assert d["input_ids"][L - n_tail:] == full["input_ids"][-n_tail:]
    assert trained_text(tok, d) == f"Paris is the capital.{IM_END}"
    assert tok.decode(d["input_ids"]).startswith("<|im_start|>system\nclause 0 says")


def test_truncate_cuts_the_answer_when_nothing_else_fits(tok, write_jsonl, cfg):
    answer = " ".join(["The capital of France is Paris."] * 30)
    path = _long(write_jsonl, answer)
    L = 64
    full = load_dataset(path, tok, cfg(max_seq_len=4096), cache=False).docs[0]
    ds = load_dataset(path, tok, cfg(max_seq_len=L), cache=False)
    d = ds.docs[0]
    assert len(d["input_ids"]) == L and ds.stats.answer_truncated_lines == [1] and ds.stats.truncated == 1
    # a minimum prefix of the system prompt (L // 8 tokens), then the final turn's header and the
    # answer's start
    assert d["input_ids"][: L // 8] == full["input_ids"][: L // 8]
    assert tok.decode(d["input_ids"][L // 8:]).startswith("<|im_start|>assistant\nThe capital of France")
    text = tok.decode(d["input_ids"])
    assert not text.endswith(IM_END)  # the answer's end is gone, and that is counted


def test_drop_and_error_policies(tok, write_jsonl, cfg):
    path = write_jsonl([_chat("q", "short"), _chat("q", "x " * 200), _chat("q", "ok")])
    ds = load_dataset(path, tok, cfg(max_seq_len=64, length_policy="drop"), cache=False)
    assert ds.stats.dropped_lines == [2] and [d["source_line"] for d in ds.docs] == [1, 3]
    with pytest.raises(DataError, match=rf"^{path}:2: field '\(example\)': \d+ tokens > max_seq_len 64"):
        load_dataset(path, tok, cfg(max_seq_len=64, length_policy="error"), cache=False)


def test_text_truncation_keeps_the_start(tok, write_jsonl, cfg):
    ds = load_dataset(write_jsonl([{"text": "The quick brown fox. " * 50}]), tok, cfg(max_seq_len=32), cache=False)
    assert len(ds.docs[0]["input_ids"]) == 32 and ds.stats.truncated == 1
    assert tok.decode(ds.docs[0]["input_ids"]).startswith("The quick brown fox.")


# ----------------------------------------------------------------------------- dataset errors

def test_no_trainable_examples_counted_and_all_none_is_an_error(tok, write_jsonl, cfg):
    path = write_jsonl([{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"}, {"role": "system", "content": "s2"},
                        {"role": "user", "content": "only a question"}])
    ds = load_dataset(path, tok, cfg(), cache=False)
    assert ds.stats.no_trainable_lines == [4] and len(ds.docs) == 1
    path = write_jsonl([_chat("q")] * 2, "none.jsonl")
    with pytest.raises(DataError, match=rf"^{path}:0: field '\(dataset\)': no example has a trainable token"):
        load_dataset(path, tok, cfg(), cache=False)


def test_skip_bad_lines_in_load_dataset(tok, write_jsonl, cfg):
    path = write_jsonl([_chat("q", "a"), "oops", {"messages": "x"}, _chat("q", "b")])
    ds = load_dataset(path, tok, cfg(on_bad_line="skip"), cache=False)
    assert ds.stats.skipped_lines == [2, 3] and [d["source_line"] for d in ds.docs] == [1, 4]
    with pytest.raises(DataError, match=rf"^{path}:2: "):
        load_dataset(path, tok, cfg(), cache=False)


def test_bad_config_is_a_config_error(tok, write_jsonl, cfg):
    with pytest.raises(ConfigError, match="data.loss_on"):
        load_dataset(write_jsonl([_chat("q", "a")]), tok, cfg(loss_on="everything"), cache=False)


def test_slow_tokenizer_rejected(tok, write_jsonl, cfg):
    class Slow:
        is_fast = False
    with pytest.raises(DataError, match="fast tokenizer is required"):
        load_dataset(write_jsonl([_chat("q", "a")]), Slow(), cfg(), cache=False)


def _find(seq, sub):
    for i in range(len(seq) - len(sub) + 1):
        if seq[i:i + len(sub)] == sub:
            return i
    raise AssertionError("subsequence not found")
