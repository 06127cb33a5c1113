"""Bad data and the one-line message that names it: `<file>:<line or row>: field '<field>': <why> — <excerpt>`,
and the JSON-line primitives every reader shares (decode a file's lines, parse one line)."""

from __future__ import annotations

import json
import re
from typing import Any


class DataError(ValueError):
    """Bad training data; the one-line message names the file, the line and the field."""


def excerpt(value: Any, width: int = 60) -> str:
    """A short single-line rendering of a value or raw line for error messages."""
    # default=str: rows from Arrow may hold dates or bytes, which JSON cannot write
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    text = text.replace("\n", "\\n").replace("\r", "\\r")
    return text if len(text) <= width else text[:width] + "..."


def data_error(path: str, line: int, field: str, why: str, value: Any = "") -> DataError:
    """`path:line: field 'x': why — excerpt` (no dash without an excerpt)."""
    shown = "" if isinstance(value, str) and value == "" else excerpt(value)
    return DataError(f"{path}:{line}: field '{field}': {why}" + (f" — {shown}" if shown else ""))


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


def decode_lines(path: str, f):
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


def short_list(xs: list[int], limit: int = 20) -> str:
    head = ", ".join(map(str, xs[:limit]))
    return head + (f", ... ({len(xs)} in all)" if len(xs) > limit else "")


