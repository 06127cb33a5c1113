"""One chat message as people bring it -> the one shape the renderer takes.

    {"role": "system" | "user" | "assistant" | "tool",
     "content": str,                                   # "" for a turn that only calls tools
     "tool_calls": [{"type": "function", "id"?: str,   # assistant only
                     "function": {"name": str, "arguments": dict}}],
     "tool_call_id": str, "name": str,                 # tool results (both optional)
     "reasoning_content": str,                         # assistant only
     "train": bool}                                    # only when the message sets it

Accepted on the way in:
- content: a string, OpenAI content parts `[{"type": "text", "text": ...}]` (joined), or null /
  absent on an assistant turn that calls tools; a tool result's object content becomes its JSON.
- tool_calls: OpenAI's `{"type": "function", "function": {"name", "arguments"}}` or a bare
  `{"name", "arguments"}`; arguments an object or a JSON string holding one (parsed: a JSONL file
  with objects and a Parquet / CSV copy with strings render the same).
- reasoning: `reasoning_content`, `thinking` or `reasoning` on an assistant message, or a
  `<think>...</think>` block opening its content (split off, as Qwen3's template does).
- loss control: `"train": true | false`, or `"weight": 0 | 1` (axolotl / ShareGPT style).
- ShareGPT (`from` / `value`): human, gpt, system, plus LLaMA-Factory's `function_call` (value:
  the JSON of one call or a list of calls -> an assistant turn calling them) and `observation`
  (-> a tool result).

Every malformed field is a `_BadLine(field path, why, value)`: the caller names file and row.
"""

from __future__ import annotations

import json
from typing import Any

from engine.data.errors import _BadLine

ROLES = ("system", "user", "assistant", "tool")
# other names for a tool's result: OpenAI's legacy function role, Llama 3's ipython
ROLE_ALIASES = {**{r: r for r in ROLES}, "function": "tool", "ipython": "tool"}
# ShareGPT speaker names -> chat roles (the chat names are accepted verbatim too).
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user",
                  "assistant": "assistant", "tool": "tool", "function_call": "assistant",
                  "observation": "tool"}
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def decode_json_text(value: Any, field: str, want: type) -> Any:
    """A value that should be a list / object but arrived as its JSON text (a CSV cell, an Arrow
    string column): decoded. A list that arrived as a dict of equal-length lists (a `datasets`
    Sequence of dicts, stored as a struct of lists): turned back into a list of dicts. Anything
    else is returned as it is."""
    if want is list and isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
        lengths = {len(v) for v in value.values()}
        if len(lengths) == 1:
            n = lengths.pop()
            return [{k: v[i] for k, v in value.items() if v[i] is not None} for i in range(n)]
    if isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
        try:
            decoded = json.loads(value)
        except json.JSONDecodeError as e:
            raise _BadLine(field, f"holds text that is not valid JSON ({e.msg} at column {e.colno})", value) from None
        if isinstance(decoded, want):
            return decoded
    return value


def role_of(raw: Any, field: str, mapping: dict) -> str:
    if not isinstance(raw, str):
        raise _BadLine(field, f"must be a string, got {type(raw).__name__}", raw)
    if raw not in mapping:
        raise _BadLine(field, f"unknown role {raw!r} (expected one of {', '.join(sorted(set(mapping)))})", raw)
    return mapping[raw]


def content_text(m: dict, key: str, where: str, *, optional: bool = False) -> str:
    """A message's text: a string or OpenAI-style text parts (joined); "" when absent and optional."""
    value = m.get(key)
    if value is None:
        if optional:
            return ""
        raise _BadLine(where, f"missing or null (keys present: {', '.join(map(repr, m)) or 'none'}; only an "
                       "assistant turn that calls tools may have no text)", m)
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _BadLine(f"{where}[{j}]", f"content part of type {kind!r}: only text parts "
                               "({\"type\": \"text\", \"text\": ...}) are supported", part)
            texts.append(part["text"])
        return "".join(texts)
    if not isinstance(value, str):
        raise _BadLine(where, f"must be a string, got {type(value).__name__}", value)
    return value


def _arguments(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as e:
            raise _BadLine(where, f"is a string but not valid JSON ({e.msg} at column {e.colno})", value) from None
    if not isinstance(value, dict):
        raise _BadLine(where, f"must be an object (or a JSON string holding one), got {type(value).__name__}", value)
    return value


def tool_call(call: Any, where: str) -> dict:
    """One tool call -> {"type": "function", "function": {"name", "arguments": dict}} (+ "id")."""
    call = decode_json_text(call, where, dict)
    if not isinstance(call, dict):
        raise _BadLine(where, f"must be an object, got {type(call).__name__}", call)
    fn, fn_where = call, where
    if "function" in call:
        fn, fn_where = call["function"], f"{_at(where)}function"
        if not isinstance(fn, dict):
            raise _BadLine(fn_where, f"must be an object with name and arguments, got {type(fn).__name__}", fn)
    if call.get("type", "function") != "function":
        raise _BadLine(f"{_at(where)}type", f"only function calls are supported, got {call['type']!r}", call)
    name = fn.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _BadLine(f"{fn_where}.name", "missing or not a non-empty string", fn)
    out = {"type": "function", "function": {"name": name, "arguments": _arguments(fn.get("arguments"),
                                                                                  f"{fn_where}.arguments")}}
    if call.get("id") is not None:
        out["id"] = str(call["id"])
    return out


def _train_flag(m: dict, where: str) -> bool | None:
    if "train" in m:
        if not isinstance(m["train"], bool):
            raise _BadLine(f"{_at(where)}train", f"must be true or false, got {m['train']!r}", m["train"])
        return m["train"]
    if "weight" in m:
        w = m["weight"]
        if isinstance(w, bool) or (isinstance(w, (int, float)) and w in (0, 1)):
            return bool(w)
        raise _BadLine(f"{_at(where)}weight", f"must be 0 or 1 (the message is trained or not; fractional "
                       f"loss weights are not supported), got {w!r}", w)
    return None


def _split_think(content: str) -> tuple[str | None, str]:
    """(reasoning, answer) of a content that opens with a <think>...</think> block, else (None, content)."""
    stripped = content.lstrip()
    if not stripped.startswith(THINK_OPEN) or THINK_CLOSE not in stripped:
        return None, content
    inner, _, rest = stripped[len(THINK_OPEN):].partition(THINK_CLOSE)
    return inner.strip("\n"), rest.lstrip("\n")


def parse_message(m: Any, where: str, *, sharegpt: bool = False) -> dict:
    """One message (module docstring) -> the normalized dict, or _BadLine naming the field."""
    if not isinstance(m, dict):
        raise _BadLine(where, f"must be an object, got {type(m).__name__}", m)
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    if role_key not in m:
        raise _BadLine(f"{_at(where)}{role_key}", "missing", m)
    raw_role = m[role_key]
    role = role_of(raw_role, f"{_at(where)}{role_key}", SHAREGPT_ROLES if sharegpt else ROLE_ALIASES)
    out: dict = {"role": role}
    calls = m.get("tool_calls")
    if sharegpt and raw_role == "function_call":  # LLaMA-Factory: the value is the call(s) as JSON
        calls = decode_json_text(m.get(content_key), f"{_at(where)}{content_key}", (list, dict))
        if isinstance(calls, dict):
            calls = [calls]
        if not isinstance(calls, list):
            raise _BadLine(f"{_at(where)}{content_key}", "a function_call turn must hold the call's JSON "
                           "({\"name\", \"arguments\"} or a list of them)", m.get(content_key))
        out["content"] = ""
    elif role == "tool" and isinstance(m.get(content_key), (dict, list)) and not _is_text_parts(m[content_key]):
        out["content"] = json.dumps(m[content_key], ensure_ascii=False)
    else:
        out["content"] = content_text(m, content_key, f"{_at(where)}{content_key}", optional=bool(calls))
    if calls is not None:
        calls = decode_json_text(calls, f"{_at(where)}tool_calls", list)
        if role != "assistant":
            raise _BadLine(f"{_at(where)}tool_calls", f"only assistant messages call tools (role {role!r})", calls)
        if not isinstance(calls, list):
            raise _BadLine(f"{_at(where)}tool_calls", f"must be a list of calls, got {type(calls).__name__}", calls)
        if calls:
            out["tool_calls"] = [tool_call(c, f"{_at(where)}tool_calls[{j}]") for j, c in enumerate(calls)]
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if m.get(key) is not None:
                if not isinstance(m[key], (str, int)):
                    raise _BadLine(f"{_at(where)}{key}", f"must be a string, got {type(m[key]).__name__}", m[key])
                out[key] = str(m[key])
    reasoning = next(((k, m[k]) for k in REASONING_KEYS if m.get(k) is not None), None)
    if reasoning is not None:
        key, value = reasoning
        if role != "assistant":
            raise _BadLine(f"{_at(where)}{key}", f"only assistant messages carry reasoning (role {role!r})", value)
        if not isinstance(value, str):
            raise _BadLine(f"{_at(where)}{key}", f"must be a string, got {type(value).__name__}", value)
        if value.strip():
            out["reasoning_content"] = value
    elif role == "assistant":
        think, answer = _split_think(out["content"])
        if think is not None:
            out["reasoning_content"], out["content"] = think, answer
    flag = _train_flag(m, where)
    if flag is not None:
        out["train"] = flag
    return out


def _at(where: str) -> str:
    """The field-path prefix inside a message: "messages[2]." (or "" for a whole-line message)."""
    return f"{where}." if where else ""


def _is_text_parts(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value)


def parse_messages(value: Any, key: str, *, sharegpt: bool = False) -> list[dict]:
    """A non-empty list of messages (or its JSON text) -> normalized messages."""
    value = decode_json_text(value, key, list)
    if not isinstance(value, list) or not value:
        raise _BadLine(key, "must be a non-empty list of messages", value)
    return [parse_message(m, f"{key}[{i}]", sharegpt=sharegpt) for i, m in enumerate(value)]


def parse_tools(value: Any, key: str = "tools") -> list[dict] | None:
    """The example-level `tools` list of JSON schemas (or its JSON text; items may be JSON text
    too) -> a list of objects, each OpenAI's {"type": "function", "function": {...}} or a bare
    function schema {"name", ...}; None when absent or empty."""
    if value is None:
        return None
    value = decode_json_text(value, key, list)
    if isinstance(value, str) and not value.strip():
        return None
    if not isinstance(value, list):
        raise _BadLine(key, f"must be a list of tool schemas, got {type(value).__name__}", value)
    tools = []
    for i, t in enumerate(value):
        t = decode_json_text(t, f"{key}[{i}]", dict)
        if not isinstance(t, dict):
            raise _BadLine(f"{key}[{i}]", f"must be an object (a JSON schema), got {type(t).__name__}", t)
        fn = t.get("function", t)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _BadLine(f"{key}[{i}].function.name" if "function" in t else f"{key}[{i}].name",
                           "missing: a tool schema names its function", t)
        tools.append(t)
    return tools or None
