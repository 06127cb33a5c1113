"""SentencePiece-style tokenizers (Llama 2 / Phi-3 layout: byte-fallback BPE over "\u2581" pieces)
written as GGUF model "llama" and read back by transformers encode every text the same; byte
tokens, scores and BOS are what llama.cpp needs; other tokenizer models are refused by name."""

from __future__ import annotations

import json

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.export.gguf import GGUFExportError, export_gguf
from tests.conftest import _CORPUS, CHATML_TEMPLATE, tiny_config

TEXTS = ["The quick brown fox, 42!", "  hello  world", "déjà vu ünïcode 🙂", "What is the capital of France?\nParis."]


def spm_tokenizer(phi3_style: bool):
    """A tiny byte-fallback BPE trained in code, wrapped as transformers' LlamaTokenizer (Metaspace),
    or with Phi-3's normalizer (Prepend + Replace, no pre-tokenizer)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(_CORPUS * 4, trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                             show_progress=False))
    spec = json.loads(tok.to_str())["model"]
    tokenizer = LlamaTokenizer(vocab=spec["vocab"], merges=[tuple(m) for m in spec["merges"]])
    if phi3_style:
        tokenizer.backend_tokenizer.normalizer = normalizers.Sequence(
            [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        tokenizer.backend_tokenizer.pre_tokenizer = None
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_sentencepiece_style_roundtrip(tmp_path, family):
    tokenizer = spm_tokenizer(phi3_style=family == "phi3")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer)))
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf", "f16")
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in TEXTS:
        assert back(text)["input_ids"] == tokenizer(text)["input_ids"], text
    assert back.chat_template == CHATML_TEMPLATE
    reader = gguf.GGUFReader(str(path))
    assert bytes(reader.fields["tokenizer.ggml.model"].parts[-1]).decode() == "llama"
    types = list(reader.fields["tokenizer.ggml.token_type"].data)
    types = [int(reader.fields["tokenizer.ggml.token_type"].parts[i][0]) for i in types]
    byte_id = tokenizer.convert_tokens_to_ids("<0x0A>")
    assert types[byte_id] == 6 and types[tokenizer.unk_token_id] == 2 and types[tokenizer.bos_token_id] == 3
    scores = [float(reader.fields["tokenizer.ggml.scores"].parts[i][0]) for i in reader.fields["tokenizer.ggml.scores"].data]
    normal = [s for s, t in zip(scores, types) if t == 1]
    assert normal == sorted(normal, reverse=True) and len(set(normal)) == len(normal)  # merge order


def test_other_tokenizer_models_are_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    model = AutoModelForCausalLM.from_config(tiny_config("llama", 2))
    with pytest.raises(GGUFExportError, match="supports BPE tokenizers .* this one is WordLevel"):
        export_gguf(model, tokenizer, tmp_path / "m.gguf", "f16")
    assert not list(tmp_path.iterdir())


def test_phi3_name_needs_phi3_special_tokens(tmp_path):
    """llama.cpp looks up <unk>, <s>, </s>, <|endoftext|> when general.name says phi3 (else
    "unordered_map::at"): a BPE vocabulary without them gets the name without "phi3"; a Phi-3 style
    SentencePiece vocabulary with them keeps it."""
    from engine.export.gguf import llama_cpp_safe_name
    from tests.conftest import make_tiny_tokenizer

    bpe = make_tiny_tokenizer()
    assert llama_cpp_safe_name("tiny-phi3 + adapter", bpe) == "tiny-phi 3 + adapter"
    assert llama_cpp_safe_name("Phi-3-mini + a", bpe) == "phi 3-mini + a"
    assert llama_cpp_safe_name("llama + a", bpe) == "llama + a"
    spm = spm_tokenizer(phi3_style=True)
    spm.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|end|>"]})
    assert llama_cpp_safe_name("Phi-3-mini + a", spm) == "Phi-3-mini + a"
