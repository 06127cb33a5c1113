"""The tokenized cache: a second load does not tokenize; any relevant change misses; no pickle."""

import os

import pytest

import engine.data.tokenized as tokenized
from engine.data import load_dataset


class Tokenized(Exception):
    pass


def _forbid_tokenizing(monkeypatch):
    def boom(*a, **k):
        raise Tokenized("tokenized although the cache should have been used")
    monkeypatch.setattr(tokenized, "encode_batch", boom)


def _rows(n=3):
    return [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(n)]


def test_second_load_does_not_tokenize(tok, write_jsonl, cfg, monkeypatch, tmp_path):
    path, c = write_jsonl(_rows()), cfg()
    first = load_dataset(path, tok, c)
    assert not first.from_cache
    files = os.listdir(c.cache_dir)
    assert len(files) == 1 and files[0].endswith(".safetensors")
    _forbid_tokenizing(monkeypatch)
    second = load_dataset(path, tok, c)
    assert second.from_cache and second.docs == first.docs
    assert second.stats.as_dict() == first.stats.as_dict()


CHANGED = {"max_seq_len": 512, "loss_on": "all", "length_policy": "drop", "on_bad_line": "skip", "format": "chat"}


@pytest.mark.parametrize("change", ["file", "max_seq_len", "loss_on", "length_policy", "on_bad_line", "format",
                                    "template", "tokenizer"])
def test_changes_invalidate(tok, write_jsonl, cfg, monkeypatch, change):
    path, c = write_jsonl(_rows()), cfg()
    load_dataset(path, tok, c)
    _forbid_tokenizing(monkeypatch)
    if change == "file":
        path = write_jsonl(_rows(4))  # same name, new bytes
    elif change == "template":
        tok.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
        assert "<|im_start|> " in tok.chat_template
    elif change == "tokenizer":
        tok.add_tokens(["<extra>"], special_tokens=True)
    else:
        c = cfg(**{change: CHANGED[change]})
    with pytest.raises(Tokenized):
        load_dataset(path, tok, c)


def test_cache_off_always_tokenizes(tok, write_jsonl, cfg, monkeypatch):
    path, c = write_jsonl(_rows()), cfg()
    load_dataset(path, tok, c)
    _forbid_tokenizing(monkeypatch)
    with pytest.raises(Tokenized):
        load_dataset(path, tok, c, cache=False)


def test_corrupt_cache_is_rebuilt(tok, write_jsonl, cfg):
    path, c = write_jsonl(_rows()), cfg()
    first = load_dataset(path, tok, c)
    (entry,) = os.listdir(c.cache_dir)
    with open(os.path.join(c.cache_dir, entry), "wb") as f:
        f.write(b"not a safetensors file")
    again = load_dataset(path, tok, c)
    assert not again.from_cache and again.docs == first.docs
    assert load_dataset(path, tok, c).from_cache
