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
from dataclasses import dataclass, field

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


def read_chat_template(path: str) -> str:
    """The Jinja text of a chat-template file (data.chat_template): a .jinja file, or a
    tokenizer_config.json / chat_template.json holding it under "chat_template"."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json"):
        import json

        template = json.loads(text).get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if not isinstance(template, str):
            raise DataError(f"{path}:0: field 'chat_template': missing (a JSON file must hold the template "
                            "under \"chat_template\")")
        return template
    if not text.strip():
        raise DataError(f"{path}:0: field '(file)': the chat template file is empty")
    return text


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
    """Character ranges [start, end) of each assistant reply (its tool calls included) + its
    end-of-turn marker."""
    tail_starts: list[int]
    """Character offsets where the length policy may resume after a cut, most context first:
    the start of the turn before the final assistant reply (its question), then the start of the
    final assistant turn's header."""
    regions: list[tuple[int, int] | None] = field(default_factory=list)
    """Per message: the characters its turn renders to ([header, end-of-turn]), None where the
    template renders prefixes inconsistently. For per-message loss flags and per-role counts."""
    traces: list[tuple[int, int] | None] = field(default_factory=list)
    """Per assistant span: the part of it that is the reasoning trace (from the span's start through
    the trace's closing tag), None when the reply has no trace in the text."""


# ------------------------------------------------------------------------ how the template
# renders tool calls and reasoning, probed once per template
_PROBE_FN, _PROBE_TOOL, _PROBE_TRACE = "probe_fn_7f3a", "probe_tool_7f3a", "PROBE_TRACE_7f3a"
_probed: dict[str, dict] = {}


def template_features(tokenizer, template: str) -> dict:
    """{"tool_calls": bool, "tools": bool, "reasoning_key": "reasoning_content" | "thinking" | None}:
    whether rendering a probe conversation shows a tool call's function name, a tool schema's
    name, and a reasoning trace given under that key (None: the template drops both keys, so the
    trace is written into the content as a <think> block)."""
    key = template  # what a template renders depends on its text (and the special tokens it names)
    if key not in _probed:
        # ids of 9 alphanumerics: Mistral's templates refuse any other
        call = {"type": "function", "id": "probe0001", "function": {"name": _PROBE_FN, "arguments": {"x": 1}}}
        tools = [{"type": "function", "function": {"name": _PROBE_TOOL, "description": "probe",
                                                   "parameters": {"type": "object", "properties": {}}}}]
        convo = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                 {"role": "tool", "tool_call_id": "probe0001", "name": _PROBE_FN, "content": "r"},
                 {"role": "assistant", "content": "a"}]
        out = {"tool_calls": False, "tools": False, "reasoning_key": None}
        text = _try_render(tokenizer, template, convo, tools)
        out["tool_calls"] = _PROBE_FN in text
        out["tools"] = _PROBE_TOOL in (_try_render(tokenizer, template, convo[:1] + convo[-1:], tools)
                                       or text)
        for rkey in ("reasoning_content", "thinking"):
            msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", rkey: _PROBE_TRACE}]
            if _PROBE_TRACE in _try_render(tokenizer, template, msgs, None):
                out["reasoning_key"] = rkey
                break
        _probed[key] = out
    return _probed[key]


def _try_render(tokenizer, template, messages, tools) -> str:
    try:
        return _render(tokenizer, template, messages, False, tools)
    except Exception:  # noqa: BLE001 - a template that refuses the probe cannot render it
        return ""


def template_messages(messages: list[dict], reasoning_key: str | None) -> list[dict]:
    """Messages as the template takes them: no loss flags; a reasoning trace under the key the
    template reads, or (a template that reads none) as a <think> block opening the content."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if k != "train"}
        trace = m.pop("reasoning_content", None)
        if trace is not None:
            if reasoning_key is None:
                m["content"] = f"<think>\n{trace}\n</think>\n\n{m['content']}"
            else:
                m[reasoning_key] = trace
        out.append(m)
    return out


def _render(tokenizer, template: str, messages: list[dict], gen: bool, tools: list | None = None) -> str:
    if tools:
        return tokenizer.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False,
                                             add_generation_prompt=gen)
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=gen)


def render_chat(tokenizer, template: str, messages: list[dict], special_texts: tuple[str, ...],
                tools: list | None = None, reasoning_key: str | None = None) -> RenderedChat:
    """Render a conversation (normalized messages, engine/data/messages.py; `tools` the example's
    schemas) and find each assistant reply's character span (module docstring), every message's
    region and each reply's reasoning trace. `reasoning_key`: template_features()'s."""
    source = messages
    messages = template_messages(messages, reasoning_key)
    # prefix renders: upto[k] = messages[:k] rendered (upto[n] is the whole conversation)
    upto: list[str | None] = [""] + [None] * len(messages)
    full = upto[-1] = _render(tokenizer, template, messages, False, tools)

    def prefix(k: int) -> str:
        if upto[k] is None:
            upto[k] = _render(tokenizer, template, messages[:k], False, tools)
        return upto[k]

    spans: list[tuple[int, int]] = []
    traces: list[tuple[int, int] | None] = []
    header_starts: list[int] = []
    cursor = 0
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        # a conversation may open with the assistant (a greeting): nothing comes before it, and
        # templates refuse to render an empty conversation, so its reply is found by its text
        before = _render(tokenizer, template, messages[:i], True, tools) if i else None
        after, header = prefix(i + 1), prefix(i)
        start = end = -1
        if before is not None and upto_consistent(full, after, before, cursor) and msg["content"].strip() in after[len(before):]:
            start, end = len(before), len(after)
        elif before is not None and full.startswith(before) and after.startswith(before) and len(before) >= cursor:
            # later turns change how this one renders (Qwen3 drops the reasoning of turns before the
            # last question): the reply runs from the header to the marker that closed it alone
            # (only ever shorter than alone: a longer match ran into later turns)
            body = after[len(before):]
            closer = _closing_special(body, special_texts)
            at = full.find(closer, len(before)) if closer else -1
            if (at >= 0 and at + len(closer) - len(before) <= len(body)
                    and full[len(before):at].lstrip().startswith(msg["content"].strip())):
                start, end = len(before), at + len(closer)
        if start < 0:  # inconsistent prefixes: find the reply's text, extend over a following special token
            # the text as given to the template, else the answer alone (a template that drops a
            # <think> block written into the content, as DeepSeek-R1's does)
            for text in dict.fromkeys([msg["content"], source[i]["content"]]):
                if text and before is None and full.startswith(after):
                    start = after.rfind(text)  # an opening reply: after its own header, not in it
                elif text:
                    start = full.find(text, cursor)
                if start >= 0:
                    break
            if start < 0:
                raise ValueError(f"the chat template does not render assistant message {i} verbatim; "
                                 "cannot tell which tokens are the reply")
            end = start + len(text)
            rest = full[end:]
            gap = len(rest) - len(rest.lstrip())
            for tok in special_texts:
                if tok and rest[gap:].startswith(tok):
                    end += gap + len(tok)
                    break
        end = start + len(full[start:end].rstrip())
        spans.append((start, end))
        traces.append(_trace(full, start, end, source[i].get("reasoning_content"), special_texts))
        header_starts.append(len(header) if full.startswith(header) and len(header) <= start else start)
        cursor = end
    tail_starts: list[int] = []
    if spans:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        if last > 0 and messages[last - 1]["role"] != "assistant":
            question = prefix(last - 1) if last > 1 else ""
            if full.startswith(question) and len(question) <= header_starts[-1]:
                tail_starts.append(len(question))
        tail_starts.append(header_starts[-1])
    regions = _regions(full, messages, spans, prefix)
    return RenderedChat(full, spans, tail_starts, regions, traces)


def upto_consistent(full: str, after: str, before: str, cursor: int) -> bool:
    return full.startswith(after) and after.startswith(before) and len(before) >= cursor


def _closing_special(body: str, special_texts: tuple[str, ...]) -> str | None:
    """The special token a rendered assistant turn (its text after the header) ends with."""
    body = body.rstrip()
    return next((t for t in special_texts if t and body.endswith(t)), None)


def _trace(full: str, start: int, end: int, trace: str | None, special_texts) -> tuple[int, int] | None:
    """[span start, end of the trace's closing tag) when the reply's text opens with its trace."""
    if not trace or not trace.strip():
        return None
    at = full.find(trace.strip(), start, end)
    if at < 0:  # the template left this turn's trace out (Qwen3: turns before the last question)
        return None
    stop = at + len(trace.strip())
    rest = full[stop:end]
    gap = len(rest) - len(rest.lstrip())
    closing = rest[gap:]
    tag = next((t for t in special_texts if t and closing.startswith(t)), None)
    if tag is None and closing.startswith("</"):
        tag = closing[:closing.find(">") + 1] if ">" in closing else None
    return (start, stop + gap + len(tag)) if tag else (start, stop)


def _regions(full: str, messages: list[dict], spans, prefix) -> list[tuple[int, int] | None]:
    """Each message's [start, end) in the full text: assistant replies are their spans (from the
    reply's start: the header is the prompt's), other turns run from the end of the previous
    prefix render to the end of their own; None where the renders are not prefixes of each other."""
    regions: list[tuple[int, int] | None] = []
    reply = iter(spans)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            regions.append(next(reply))
            continue
        try:
            a, b = prefix(i), prefix(i + 1)
        except Exception:  # noqa: BLE001 - a template that refuses this prefix (e.g. a lone system turn)
            regions.append(None)
            continue
        ok = full.startswith(b) and b.startswith(a)
        regions.append((len(a), len(a) + len(b[len(a):].rstrip())) if ok else None)
    return regions


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
    keep: object = field(default_factory=lambda: slice(None))
    """The positions of the input kept (ids = input_ids[keep]), for arrays that travel with the ids."""


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
        return Fitted(ids[:0], mask[:0], "dropped", slice(0, 0))
    if not tail_tokens:
        return Fitted(ids[:max_len], mask[:max_len], "text_truncated", slice(0, max_len))
    min_prefix = min(64, max_len // 8)
    for tail_start in tail_tokens:
        head_len = max_len - (n - tail_start)
        if head_len >= min_prefix:
            keep = np.r_[0:head_len, tail_start:n]
            return Fitted(ids[keep], mask[keep], "truncated", keep)
    header = tail_tokens[-1]
    keep = np.r_[0:min_prefix, header:header + max_len - min_prefix]
    return Fitted(ids[keep], mask[keep], "answer_truncated", keep)


def shift_labels(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """labels[t] = ids[t+1] where token t+1 carries loss, else -100; labels[-1] = -100."""
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = np.where(mask[1:], ids[1:], IGNORE_INDEX)
    return labels
