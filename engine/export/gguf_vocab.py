"""The tokenizer as GGUF metadata (`tokenizer.ggml.*`), what llama.cpp tokenizes and templates with.

Byte-level BPE tokenizers (GPT-2 style: Llama 3, Qwen2/3, SmolLM2, Mistral Nemo) become model
"gpt2": tokens in id order, token types (1 normal, 3 control = special, 4 user-defined added,
5 unused embedding rows), merges "a b", bos / eos / pad ids, and the chat template. Rows of the
embedding no token uses (vocab padded to a multiple) get placeholder tokens so the token list
has vocab_size entries, as llama.cpp requires.

SentencePiece-style BPE tokenizers (tokenizer.json: BPE with byte_fallback, "\u2581" for spaces, no
ByteLevel: Llama 2, Mistral 7B v0.1, Phi-3) become model "llama": the same tokens, types 6 for
the byte tokens <0x00>..<0xFF> and 2 for unk, a score per token and the merges. llama.cpp's
SentencePiece tokenizer merges the adjacent pair whose result has the highest score; in a BPE
vocabulary a token's id grows with the rank of the merge that made it, so score = -id gives
llama.cpp the BPE merge order (transformers' reader uses the merges themselves). Other tokenizer
models (Unigram, WordPiece) are refused with a clear error.
"""

from __future__ import annotations

import json

import gguf

from engine.export.gguf_arch import GGUFExportError


def _spec(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError("GGUF export needs a fast tokenizer (tokenizer.json)")
    return json.loads(backend.to_str())


def tokenizer_kind(tokenizer) -> str:
    """'gpt2' (byte-level BPE) or 'llama' (SentencePiece-style byte-fallback BPE); else an error."""
    spec = _spec(tokenizer)
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or "ByteLevel" in json.dumps(spec.get("decoder"))
    if spec["model"]["type"] == "BPE" and byte_level:
        return "gpt2"
    if spec["model"]["type"] == "BPE" and spec["model"].get("byte_fallback"):
        return "llama"
    raise GGUFExportError(f"GGUF export supports BPE tokenizers (byte-level, or SentencePiece-style with byte "
                          f"fallback); this one is {spec['model']['type']}"
                          f"{'' if spec['model']['type'] != 'BPE' else ' without ByteLevel or byte_fallback'}")


def tokenizer_fields(tokenizer, vocab_size: int) -> dict:
    """tokens, token types, scores and merges of a BPE fast tokenizer, in id order."""
    spec = _spec(tokenizer)
    kind = tokenizer_kind(tokenizer)
    n = len(tokenizer)
    if n > vocab_size:
        raise GGUFExportError(f"tokenizer has {n} tokens but the model's vocab_size is {vocab_size}")
    added = {int(i): t for i, t in tokenizer.added_tokens_decoder.items()}
    unk = getattr(tokenizer, "unk_token_id", None)
    tokens, types, scores = [], [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i].content)
            types.append(2 if i == unk else 3 if added[i].special else 4)
        elif i < n:
            token = tokenizer.convert_ids_to_tokens(i)
            tokens.append(token)
            is_byte = kind == "llama" and len(token) == 6 and token.startswith("<0x") and token.endswith(">")
            types.append(2 if i == unk else 6 if is_byte else 1)
        else:  # rows of the embedding no token uses (vocab padded to a multiple)
            tokens.append(f"[PAD{i}]")
            types.append(5)
        scores.append(-float(i) if types[-1] == 1 else 0.0)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    return {"kind": kind, "tokens": tokens, "types": types, "scores": scores, "merges": merges}


def _adds_space_prefix(spec: dict) -> bool:
    """A SentencePiece-style tokenizer that turns the text's start into "\u2581" (Metaspace or Prepend)."""
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    return '"Prepend"' in text or ('"Metaspace"' in text and '"never"' not in text)


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    fields = tokenizer_fields(tokenizer, vocab_size)
    writer.add_tokenizer_model(fields["kind"])
    writer.add_tokenizer_pre("default")
    writer.add_token_list(fields["tokens"])
    writer.add_token_types(fields["types"])
    if fields["kind"] == "llama":
        writer.add_token_scores(fields["scores"])
        writer.add_add_space_prefix(_adds_space_prefix(_spec(tokenizer)))
    writer.add_token_merges(fields["merges"])
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, key, None)
        if value is not None:
            add(int(value))
    # whether the tokenizer itself prepends BOS (Llama 2 style); a chat template writes its own
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
