"""Rows of any source (sources.py: JSONL, Parquet, CSV, Arrow, save_to_disk folders) -> examples
(conversations or plain text), with the line or row each came from.

Five formats, detected per source from the keys of its first row (or named):

| format              | one row holds                                         | becomes                        |
|---------------------|-------------------------------------------------------|--------------------------------|
| `chat`              | `{"messages": [message, ...], "tools"?: [schema, ...]}` or ShareGPT `{"conversations": [{"from", "value"}, ...]}` | one conversation (messages: messages.py: tool calls, tool results, reasoning, loss flags) |
| `messages_per_line` | one `{"role", "content"}` message (the seed's files)  | consecutive lines -> one conversation; a new one starts at a `system` line or at a `user` line after an `assistant` line |
| `prompt_completion` | `{"prompt", "completion", "tools"?}` (strings or lists of messages) | user / assistant |
| `alpaca`            | `{"instruction", "input" (optional), "output"}`       | user (instruction + input) / assistant |
| `text`              | `{"text"}`                                            | plain text, loss on every token |

An example is a dict: `{"messages": [{"role", "content", ...}, ...], "tools"?: [...], "source_line": n,
"message_lines": [...]}` for conversations, `{"text": str, "source_line": n}` for text. Line and row
numbers are 1-based. Every malformed line or row raises `DataError` with a one-line message
`"<file>:<line or row>: field '<field>': <why> — <excerpt>"` (or, with `on_bad_line="skip"`, is counted).
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator

from engine.data.errors import DataError, _BadLine, data_error, decode_lines, excerpt, parse_object  # noqa: F401
from engine.data.messages import ROLES, decode_json_text, parse_message, parse_messages, parse_tools  # noqa: F401
from engine.data.sources import good_rows, parsed_rows

FORMATS = ("chat", "messages_per_line", "prompt_completion", "alpaca", "text")


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


def _turns(obj: dict, key: str, role: str) -> list[dict]:
    """A prompt / completion: a string (one `role` turn) or a list of messages (TRL's
    conversational prompt-completion), also as its JSON text (a CSV cell)."""
    value = decode_json_text(obj.get(key), key, list)
    if isinstance(value, list):
        return parse_messages(value, key)
    return [{"role": role, "content": _string(obj, key)}]


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
        return _with_tools({"messages": parse_messages(obj[key], key, sharegpt=key == "conversations")}, obj)
    if fmt == "messages_per_line":
        if "role" not in obj:
            raise _BadLine("role", "missing (file has one {role, content} message per line)", obj)
        return {"message": parse_message(obj, "")}
    if fmt == "prompt_completion":
        return _with_tools({"messages": _turns(obj, "prompt", "user") + _turns(obj, "completion", "assistant")}, obj)
    if fmt == "alpaca":
        instruction = _string(obj, "instruction")
        extra = _string(obj, "input", optional=True)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return {"messages": [{"role": "user", "content": prompt},
                             {"role": "assistant", "content": _string(obj, "output")}]}
    if fmt == "text":
        return {"text": _string(obj, "text")}
    raise ValueError(f"unknown format {fmt!r}")


def _with_tools(example: dict, obj: dict) -> dict:
    tools = parse_tools(obj.get("tools"))
    return dict(example, tools=tools) if tools else example


def _group_messages(rows: Iterable[tuple[int, dict]]) -> Iterator[dict]:
    """Seed layout: consecutive one-message lines -> conversations.

    A conversation starts at a `system` line, or at a `user` line that follows an `assistant` line."""
    conv = None
    prev_role = None
    for line, msg in rows:
        starts = conv is None or msg["role"] == "system" or (msg["role"] == "user" and prev_role == "assistant")
        if starts:
            if conv is not None:
                yield conv
            conv = {"messages": [], "source_line": line, "message_lines": []}
        conv["messages"].append(msg)
        conv["message_lines"].append(line)
        prev_role = msg["role"]
    if conv is not None:
        yield conv


def iter_examples(path: str, fmt: str = "auto", on_bad_line: str = "error",
                  skipped: list[int] | None = None, columns: dict[str, str] | None = None) -> Iterator[dict]:
    """The examples of a data source (JSONL, Parquet, CSV, Arrow or a save_to_disk folder:
    sources.py) as they are read (see the module docstring for the formats).

    fmt: "auto" (from the first row's keys) or one of FORMATS. columns: {ours: theirs} renames.
    on_bad_line: "error" raises DataError at the first malformed row; "skip" leaves it out and
    appends its number to `skipped` (if given). Blank JSONL lines are ignored.
    Each example has "source_line" (its first line or row, 1-based).
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"{path}:0: field 'format': unknown format {fmt!r} (expected auto or one of {', '.join(FORMATS)})")
    detected = None if fmt == "auto" else fmt

    def parse(lineno: int, obj: dict) -> tuple[int, dict]:
        nonlocal detected
        if detected is None:
            detected = detect_format(obj)
            if detected is None and "chosen" in obj and "rejected" in obj:
                raise _BadLine("(keys)", "a preference pair (prompt, chosen, rejected): train on it "
                               "with objective=dpo or objective=orpo, not sft", obj)
            if detected is None:
                raise _BadLine("(keys)", "cannot tell the format from the keys (expected messages, "
                               "conversations, role+content, prompt+completion, instruction+output or text"
                               + ("" if columns else "; data.columns maps other names onto these") + ")", obj)
        return lineno, _parse(obj, detected)

    parsed = parsed_rows(path, parse, on_bad_line=on_bad_line, skipped=skipped, columns=columns)
    first = next(parsed, None)
    if first is None:
        return
    rows = itertools.chain([first], parsed)
    if detected == "messages_per_line":
        yield from _group_messages((line, ex["message"]) for line, ex in rows)
    else:
        yield from (dict(ex, source_line=line) for line, ex in rows)


def load_examples(path: str, fmt: str = "auto", on_bad_line: str = "error",
                  skipped: list[int] | None = None, columns: dict[str, str] | None = None) -> list[dict]:
    """iter_examples as a list."""
    return list(iter_examples(path, fmt, on_bad_line, skipped, columns))


def format_of(path: str, fmt: str = "auto", columns: dict[str, str] | None = None) -> str:
    """The format load_examples would use for `path` (the first row whose keys tell)."""
    if fmt != "auto":
        return fmt
    for obj in good_rows(path, columns):
        if detect_format(obj):
            return detect_format(obj)
    return "unknown"
