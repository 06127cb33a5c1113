"""The tokenizer as GGUF metadata (`tokenizer.ggml.*`), what llama.cpp tokenizes and templates with.

Byte-level BPE tokenizers (GPT-2 style: Llama 3, Qwen2/3, SmolLM2, Mistral Nemo) become model
"gpt2": tokens in id order, token types (1 normal, 3 control = special, 4 user-defined added,
5 unused embedding rows), merges "a b", bos / eos / pad ids, and the chat template. Rows of the
embedding no token uses (vocab padded to a multiple) get placeholder tokens so the token list
has vocab_size entries, as llama.cpp requires. SentencePiece-style tokenizers (byte-fallback
BPE without ByteLevel: Llama 2, Mistral 7B v0.1, Phi-3, Gemma) are refused with a clear error.
"""

from __future__ import annotations

import json

import gguf

from engine.export.gguf_arch import GGUFExportError


def tokenizer_fields(tokenizer, vocab_size: int) -> dict:
    """tokens, token types and merges of a byte-level BPE fast tokenizer, in id order."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError("GGUF export needs a fast tokenizer (tokenizer.json)")
    spec = json.loads(backend.to_str())
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or "ByteLevel" in json.dumps(spec.get("decoder"))
    if spec["model"]["type"] != "BPE" or not byte_level:
        raise GGUFExportError(f"GGUF export supports byte-level BPE tokenizers (GPT-2 style) only; this one is "
                              f"{spec['model']['type']} without ByteLevel pre-tokenization (SentencePiece-style "
                              "tokenizers: convert the merged directory with llama.cpp's convert_hf_to_gguf.py)")
    n = len(tokenizer)
    if n > vocab_size:
        raise GGUFExportError(f"tokenizer has {n} tokens but the model's vocab_size is {vocab_size}")
    added = {int(i): t for i, t in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i].content)
            types.append(3 if added[i].special else 4)
        elif i < n:
            tokens.append(tokenizer.convert_ids_to_tokens(i))
            types.append(1)
        else:  # rows of the embedding no token uses (vocab padded to a multiple)
            tokens.append(f"[PAD{i}]")
            types.append(5)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges}


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    fields = tokenizer_fields(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(fields["tokens"])
    writer.add_token_types(fields["types"])
    writer.add_token_merges(fields["merges"])
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, key, None)
        if value is not None:
            add(int(value))
    writer.add_add_bos_token(False)  # the chat template writes whatever the model needs
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
