"""Conversations -> rendered text -> token ids + a per-token "carries loss" mask + length policy.

Which tokens carry loss is found template-agnostically, in character space:

    before_i = render(messages[:i], add_generation_prompt=True)   # ... <|im_start|>assistant\n
    upto_i   = render(messages[:i+1])                               # ... <|im_start|>assistant\nreply<|im_end|>\n
    span_i   = [len(before_i), len(upto_i).rstrip())                #                         reply<|im_end|>

i.e. the assistant reply *and whatever the template emits to close the turn* (the end-of-turn
token, so the model learns to stop even when pad == eos; FIELD.md bug 3), minus trailing
whitespace. The full text is tokenized once with the fast tokenizer's offset mapping and a token
carries loss when its character range overlaps a span. No `{% generation %}` markers needed
(FIELD.md bug 4). If a template renders prefixes inconsistently (e.g. it rewrites earlier turns)
we fall back to locating the reply's text in the full render and extending it over a special
token that directly follows.

Labels are shifted here (DESIGN.md): `labels[t] = ids[t+1]` if token t+1 carries loss, else
-100, and the last position is always -100.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from engine.data.formats import DataError

IGNORE_INDEX = -100

# ChatML (the format SmolLM2, Qwen and many others use) for tokenizers shipped without a template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def resolve_template(tokenizer) -> tuple[str, bool]:
    """(chat template, is_fallback). A tokenizer without one gets CHATML_TEMPLATE and a warning."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one is used
        template = template.get("default")
    if isinstance(template, str) and template.strip():
        return template, False
    warnings.warn("tokenizer has no chat template: conversations are rendered with the ChatML "
                  "fallback (<|im_start|>role\\n...<|im_end|>); the end-of-turn marker is '<|im_end|>'",
                  stacklevel=3)
    return CHATML_TEMPLATE, True


def special_token_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens (eos, bos, pad, added control tokens such as <|im_end|>)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for tid, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(tid))
    return ids


@dataclass
class RenderedChat:
    text: str
    spans: list[tuple[int, int]]
    """Character ranges [start, end) of each assistant reply + its end-of-turn marker."""
    tail_starts: list[int]
    """Character offsets where the length policy may resume after a cut, most context first:
    the start of the turn before the final assistant reply (its question), then the start of the
    final assistant turn's header."""


def _render(tokenizer, template: str, messages: list[dict], gen: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=gen)


def render_chat(tokenizer, template: str, messages: list[dict], special_texts: tuple[str, ...]) -> RenderedChat:
    """Render a conversation and find each assistant reply's character span (module docstring)."""
    full = _render(tokenizer, template, messages, gen=False)
    spans: list[tuple[int, int]] = []
    header_starts: list[int] = []
    cursor = 0
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        # a conversation may open with the assistant (a greeting): nothing comes before it, and
        # templates refuse to render an empty conversation, so its reply is found by its text
        before = _render(tokenizer, template, messages[:i], gen=True) if i else None
        upto = _render(tokenizer, template, messages[: i + 1], gen=False)
        header = _render(tokenizer, template, messages[:i], gen=False) if i else ""
        if (before is not None and full.startswith(upto) and upto.startswith(before) and len(before) >= cursor
                and msg["content"].strip() in upto[len(before):]):
            start, end = len(before), len(upto)
        else:  # inconsistent prefixes: find the reply's text, extend over a following special token
            start = -1
            if msg["content"] and before is None and full.startswith(upto):
                start = upto.rfind(msg["content"])  # an opening reply: after its own header, not in it
            elif msg["content"]:
                start = full.find(msg["content"], cursor)
            if start < 0:
                raise ValueError(f"the chat template does not render assistant message {i} verbatim; "
                                 "cannot tell which tokens are the reply")
            end = start + len(msg["content"])
            rest = full[end:]
            gap = len(rest) - len(rest.lstrip())
            for tok in special_texts:
                if tok and rest[gap:].startswith(tok):
                    end += gap + len(tok)
                    break
        end = start + len(full[start:end].rstrip())
        spans.append((start, end))
        header_starts.append(len(header) if full.startswith(header) and len(header) <= start else start)
        cursor = end
    tail_starts: list[int] = []
    if spans:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        if last > 0 and messages[last - 1]["role"] != "assistant":
            question = _render(tokenizer, template, messages[: last - 1], gen=False) if last > 1 else ""
            if full.startswith(question) and len(question) <= header_starts[-1]:
                tail_starts.append(len(question))
        tail_starts.append(header_starts[-1])
    return RenderedChat(full, spans, tail_starts)


def token_mask(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """[n] bool: token t carries loss when its char range offsets[t] = (a, b) overlaps a span."""
    mask = np.zeros(len(offsets), dtype=bool)
    a, b = offsets[:, 0], offsets[:, 1]
    for s, e in spans:
        mask |= (a < e) & (b > s)
    return mask


def char_to_token(offsets: np.ndarray, char: int) -> int:
    """Index of the first token starting at or after character `char` (len if none)."""
    return int(np.searchsorted(offsets[:, 0], char, side="left"))


def ensure_eos(ids: np.ndarray, mask: np.ndarray, eos_id: int | None, special: set[int],
               at: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Make the model learn to stop: if the trained token just before position `at` (the end of
    the final reply) is not a special token (EOS / end-of-turn), insert a trained EOS there.
    Returns (ids, mask, inserted)."""
    if eos_id is None or at <= 0 or not mask[at - 1] or int(ids[at - 1]) in special:
        return ids, mask, False
    return np.insert(ids, at, eos_id), np.insert(mask, at, True), True


@dataclass
class Fitted:
    ids: np.ndarray
    mask: np.ndarray
    status: str
    """fits | truncated (prompt middle cut) | answer_truncated | text_truncated | dropped."""


def fit_length(ids: np.ndarray, mask: np.ndarray, max_len: int, policy: str,
               tail_tokens: list[int], where: str) -> Fitted:
    """Apply the length policy to one document of n tokens.

    truncate, conversations: keep the head (the system prompt's start) and the tail that starts at
    tail_tokens[0] (the final question + the final assistant turn) whole, cutting
    ids[head_len : tail_start] from the middle, with head_len = max_len - (n - tail_start) >= a
    minimum prefix of min(64, max_len // 8) tokens; else try the next tail start (the final
    assistant header). If even that does not fit, keep the minimum prefix + the final turn's
    header and cut the *answer's end* ("answer_truncated", counted separately).
    truncate, text (no tail): keep the first max_len tokens.
    drop: status "dropped". error: DataError naming the line (`where`).
    """
    n = len(ids)
    if n <= max_len:
        return Fitted(ids, mask, "fits")
    if policy == "error":
        raise DataError(f"{where}: field '(example)': {n} tokens > max_seq_len {max_len} "
                        "(length_policy=error; use truncate or drop)")
    if policy == "drop":
        return Fitted(ids[:0], mask[:0], "dropped")
    if not tail_tokens:
        return Fitted(ids[:max_len], mask[:max_len], "text_truncated")
    min_prefix = min(64, max_len // 8)
    for tail_start in tail_tokens:
        head_len = max_len - (n - tail_start)
        if head_len >= min_prefix:
            keep = np.r_[0:head_len, tail_start:n]
            return Fitted(ids[keep], mask[keep], "truncated")
    header = tail_tokens[-1]
    keep = np.r_[0:min_prefix, header:header + max_len - min_prefix]
    return Fitted(ids[keep], mask[keep], "answer_truncated")


def shift_labels(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """labels[t] = ids[t+1] where token t+1 carries loss, else -100; labels[-1] = -100."""
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = np.where(mask[1:], ids[1:], IGNORE_INDEX)
    return labels
