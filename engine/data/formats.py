"""JSONL files -> examples (conversations or plain text), with the line each came from.

Five formats, detected per file from the keys of its first JSON object (or named):

| format              | one line holds                                        | becomes                        |
|---------------------|-------------------------------------------------------|--------------------------------|
| `chat`              | `{"messages": [{"role", "content"}, ...]}` or ShareGPT `{"conversations": [{"from", "value"}, ...]}` | one conversation |
| `messages_per_line` | one `{"role", "content"}` message (the seed's files)  | consecutive lines -> one conversation; a new one starts at a `system` line or at a `user` line after an `assistant` line |
| `prompt_completion` | `{"prompt", "completion"}`                            | user / assistant               |
| `alpaca`            | `{"instruction", "input" (optional), "output"}`       | user (instruction + input) / assistant |
| `text`              | `{"text"}`                                            | plain text, loss on every token |

An example is a dict: `{"messages": [{"role", "content"}, ...], "source_line": n, "message_lines": [...]}`
for conversations, `{"text": str, "source_line": n}` for text. Line numbers are 1-based.
Every malformed line raises `DataError` with a one-line message
`"<file>:<line>: field '<field>': <why> — <excerpt>"` (or, with `on_bad_line="skip"`, is counted).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, TypeVar

FORMATS = ("chat", "messages_per_line", "prompt_completion", "alpaca", "text")
ROLES = ("system", "user", "assistant")
# ShareGPT speaker names -> chat roles (the chat names are accepted verbatim too).
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system",
                  "user": "user", "assistant": "assistant"}

T = TypeVar("T")


class DataError(ValueError):
    """Bad training data; the one-line message names the file, the line and the field."""


def excerpt(value: Any, width: int = 60) -> str:
    """A short single-line rendering of a value or raw line for error messages."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = text.replace("\n", "\\n").replace("\r", "\\r")
    return text if len(text) <= width else text[:width] + "..."


def data_error(path: str, line: int, field: str, why: str, value: Any = "") -> DataError:
    """`path:line: field 'x': why — excerpt` (no dash without an excerpt)."""
    shown = "" if isinstance(value, str) and value == "" else excerpt(value)
    return DataError(f"{path}:{line}: field '{field}': {why}" + (f" — {shown}" if shown else ""))


def check_some_parsed(path: str, nonblank: int, parsed: list, skipped: list[int]) -> None:
    """A file with no JSON line, or whose every line was malformed and skipped, is an error."""
    if nonblank == 0:
        raise DataError(f"{path}:0: field '(file)': file is empty (no JSON lines)")
    if not parsed:
        raise DataError(f"{path}:0: field '(file)': every line was malformed and skipped "
                        f"(lines {_short_list(skipped)})")


class _BadLine(Exception):
    """Internal: a line is malformed; (field, why, value) become a DataError or a skip."""

    def __init__(self, field: str, why: str, value: Any):
        super().__init__(field, why, value)
        self.field, self.why, self.value = field, why, value


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
"""A JSON escape of a UTF-16 surrogate (UTF-8 decoding already refuses raw ones)."""


def _lone_surrogate(obj: Any) -> tuple[str, str] | None:
    """(field path, string) of the first string (key or value) holding a lone UTF-16 surrogate
    (JSON allows "\\ud800"; no tokenizer can encode it), or None. Iterative: no recursion."""
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return where or "(line)", value.encode("utf-8", errors="backslashreplace").decode("ascii")
        elif isinstance(value, dict):
            for k, v in reversed(list(value.items())):
                stack.append((f"{where}.{k}" if where else str(k), v))
                stack.append((f"{where}.{k}" if where else str(k), k))
        elif isinstance(value, list):
            for i in reversed(range(len(value))):
                stack.append((f"{where}[{i}]", value[i]))
    return None


def parse_object(raw: str) -> dict:
    """One JSONL line -> a dict, or _BadLine: not JSON, not an object, nested beyond the recursion
    limit (json.loads raises RecursionError), or a string holding a lone surrogate."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise _BadLine("(line)", f"not valid JSON ({e.msg} at column {e.colno})", raw) from None
    except RecursionError:  # e.g. an array nested 100,000 deep
        raise _BadLine("(line)", "nested too deeply to parse (arrays/objects inside each other "
                       "beyond Python's recursion limit)", raw) from None
    if not isinstance(obj, dict):
        raise _BadLine("(line)", f"must be a JSON object, got {type(obj).__name__}", raw)
    bad = _lone_surrogate(obj) if _SURROGATE_ESCAPE.search(raw) else None
    if bad is not None:
        raise _BadLine(bad[0], "holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape): "
                       "not text any tokenizer can encode", bad[1])
    return obj


def _string(obj: dict, key: str, where: str | None = None, *, optional: bool = False) -> str:
    name = where or key
    if key not in obj:
        if optional:
            return ""
        raise _BadLine(name, f"missing (keys present: {', '.join(map(repr, obj)) or 'none'})", obj)
    value = obj[key]
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise _BadLine(name, f"must be a string, got {type(value).__name__}", value)
    return value


def _role(raw: Any, field: str, mapping: dict) -> str:
    if not isinstance(raw, str):
        raise _BadLine(field, f"must be a string, got {type(raw).__name__}", raw)
    if raw not in mapping:
        raise _BadLine(field, f"unknown role {raw!r} (expected one of {', '.join(sorted(set(mapping)))})", raw)
    return mapping[raw]


def _message_list(obj: dict, key: str) -> list[dict]:
    """`messages` / ShareGPT `conversations` -> [{"role", "content"}]."""
    msgs = obj[key]
    if not isinstance(msgs, list) or not msgs:
        raise _BadLine(key, "must be a non-empty list of messages", msgs)
    sharegpt = key == "conversations"
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    mapping = SHAREGPT_ROLES if sharegpt else {r: r for r in ROLES}
    out = []
    for i, m in enumerate(msgs):
        where = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise _BadLine(where, f"must be an object, got {type(m).__name__}", m)
        if role_key not in m:
            raise _BadLine(f"{where}.{role_key}", "missing", m)
        role = _role(m[role_key], f"{where}.{role_key}", mapping)
        out.append({"role": role, "content": _content(m, content_key, f"{where}.{content_key}")})
    return out


def _content(m: dict, key: str, where: str) -> str:
    """A message's text: a string, or OpenAI-style content parts [{"type": "text", "text": ...}]
    (joined; any other part type is refused by name). Tool calls are refused by name too."""
    value = m.get(key)
    if value is None and m.get("tool_calls"):
        raise _BadLine(where, "is null with tool_calls: tool-call messages are not supported (text only)",
                       m["tool_calls"])
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _BadLine(f"{where}[{j}]", f"content part of type {kind!r}: only text parts "
                               "({\"type\": \"text\", \"text\": ...}) are supported", part)
            texts.append(part["text"])
        return "".join(texts)
    return _string(m, key, where)


def detect_format(obj: dict) -> str | None:
    """The format a JSON object's keys say it is in, or None."""
    if "messages" in obj or "conversations" in obj:
        return "chat"
    if "role" in obj and "content" in obj:
        return "messages_per_line"
    if "prompt" in obj and "completion" in obj:
        return "prompt_completion"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    if "text" in obj:
        return "text"
    return None


# The key(s) that identify each format: the field a line is missing is named after them.
_KEY_FIELDS = {"chat": "messages", "messages_per_line": "role", "prompt_completion": "prompt",
               "alpaca": "instruction", "text": "text"}


def _parse(obj: dict, fmt: str) -> dict:
    """One JSON object in format `fmt` -> an example (a conversation, a text or one message)."""
    if fmt == "chat":
        key = "messages" if "messages" in obj else "conversations" if "conversations" in obj else None
        if key is None:
            raise _BadLine("messages", "missing (file is in chat format: expected 'messages' or 'conversations')", obj)
        return {"messages": _message_list(obj, key)}
    if fmt == "messages_per_line":
        if "role" not in obj:
            raise _BadLine("role", "missing (file has one {role, content} message per line)", obj)
        role = _role(obj["role"], "role", {r: r for r in ROLES})
        return {"message": {"role": role, "content": _string(obj, "content")}}
    if fmt == "prompt_completion":
        return {"messages": [{"role": "user", "content": _string(obj, "prompt")},
                             {"role": "assistant", "content": _string(obj, "completion")}]}
    if fmt == "alpaca":
        instruction = _string(obj, "instruction")
        extra = _string(obj, "input", optional=True)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return {"messages": [{"role": "user", "content": prompt},
                             {"role": "assistant", "content": _string(obj, "output")}]}
    if fmt == "text":
        return {"text": _string(obj, "text")}
    raise ValueError(f"unknown format {fmt!r}")


def _group_messages(rows: list[tuple[int, dict]]) -> list[dict]:
    """Seed layout: consecutive one-message lines -> conversations.

    A conversation starts at a `system` line, or at a `user` line that follows an `assistant` line."""
    convs: list[dict] = []
    prev_role = None
    for line, msg in rows:
        starts = not convs or msg["role"] == "system" or (msg["role"] == "user" and prev_role == "assistant")
        if starts:
            convs.append({"messages": [], "source_line": line, "message_lines": []})
        convs[-1]["messages"].append(msg)
        convs[-1]["message_lines"].append(line)
        prev_role = msg["role"]
    return convs


def load_examples(path: str, fmt: str = "auto", on_bad_line: str = "error",
                  skipped: list[int] | None = None) -> list[dict]:
    """Read a JSONL file into examples (see the module docstring for the formats).

    fmt: "auto" (from the first JSON object's keys) or one of FORMATS.
    on_bad_line: "error" raises DataError at the first malformed line; "skip" leaves it out and
    appends its line number to `skipped` (if given). Blank lines are ignored.
    Returns a list of examples, each with "source_line" (its first line, 1-based).
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"{path}:0: field 'format': unknown format {fmt!r} (expected auto or one of {', '.join(FORMATS)})")
    detected = None if fmt == "auto" else fmt

    def parse(lineno: int, raw: str) -> tuple[int, dict]:
        nonlocal detected
        obj = parse_object(raw)
        if detected is None:
            detected = detect_format(obj)
            if detected is None and "chosen" in obj and "rejected" in obj:
                raise _BadLine("(keys)", "a preference pair (prompt, chosen, rejected): train on it "
                               "with objective=dpo or objective=orpo, not sft", obj)
            if detected is None:
                raise _BadLine("(keys)", "cannot tell the format from the keys (expected messages, "
                               "conversations, role+content, prompt+completion, instruction+output or text)", obj)
        return lineno, _parse(obj, detected)

    parsed = read_jsonl(path, parse, on_bad_line=on_bad_line, skipped=skipped)
    if detected == "messages_per_line":
        return _group_messages([(line, ex["message"]) for line, ex in parsed])
    return [dict(ex, source_line=line) for line, ex in parsed]


def read_jsonl(path: str, parse: Callable[[int, str], T], *, on_bad_line: str = "error",
               skipped: list[int] | None = None) -> list[T]:
    """`parse(lineno, line)` of every non-blank line of `path` (1-based line numbers), in order. A
    line whose parse raises _BadLine is a DataError naming the file, line and field
    (on_bad_line="error") or is left out with its number appended to `skipped` ("skip"); a missing
    file, and a file with nothing parsed, are DataErrors too. The reader of SFT examples and of
    preference pairs (engine.preference.data)."""
    if on_bad_line not in ("error", "skip"):
        raise DataError(f"{path}:0: field 'on_bad_line': must be 'error' or 'skip' — {on_bad_line!r}")
    if not os.path.isfile(path):
        raise DataError(f"{path}:0: field '(file)': does not exist")
    skipped = skipped if skipped is not None else []
    parsed, nonblank = [], 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(_lines(path, f), start=1):
            if not raw.strip():
                continue
            nonblank += 1
            try:
                parsed.append(parse(lineno, raw))
            except _BadLine as bad:
                if on_bad_line == "error":
                    raise data_error(path, lineno, bad.field, bad.why, bad.value) from None
                skipped.append(lineno)
    check_some_parsed(path, nonblank, parsed, skipped)
    return parsed


def _lines(path: str, f):
    """Decoded lines of a file opened in binary mode; a non-UTF-8 line is a DataError naming it.
    A UTF-8 byte-order mark at the start of the file (Windows editors write one) is dropped."""
    for lineno, raw in enumerate(f, start=1):
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{lineno}: field '(line)': not valid UTF-8 ({e.reason}) — "
                            f"{excerpt(raw.decode('utf-8', errors='replace'))}") from None


def _short_list(xs: list[int], limit: int = 20) -> str:
    head = ", ".join(map(str, xs[:limit]))
    return head + (f", ... ({len(xs)} in all)" if len(xs) > limit else "")


def format_of(path: str, fmt: str = "auto") -> str:
    """The format load_examples would use for `path` (first parseable object's keys)."""
    if fmt != "auto":
        return fmt
    with open(path, "rb") as f:
        for raw in _lines(path, f):
            try:
                obj = parse_object(raw)
            except _BadLine:
                continue
            if isinstance(obj, dict) and detect_format(obj):
                return detect_format(obj)
    return "unknown"
