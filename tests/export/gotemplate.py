"""A renderer for the subset of Go's text/template that engine/export/modelfile.py emits.

Actions: {{ range .Messages }} ... {{ end }}, {{ if eq .Role "x" }} ... {{ else if eq .Role "y" }} ...
{{ else }} ... {{ end }}, {{ .Role }}, {{ .Content }}; "{{-" / "-}}" trim the whitespace before /
after the action, as in Go. Anything else raises, so a template that uses more fails the test.
"""

from __future__ import annotations

import re

_ACTION = re.compile(r"{{(-?)\s*(.*?)\s*(-?)}}", re.S)


def _tokens(template: str) -> list[tuple[str, str]]:
    """[("text", s) | ("action", s)] with Go's trim markers applied."""
    out, pos = [], 0
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        out.append(["text", text])
        out.append(["action", m.group(2), bool(m.group(3))])
        pos = m.end()
    out.append(["text", template[pos:]])
    for i, token in enumerate(out):  # "-}}" trims the text after the action
        if token[0] == "action" and token[2] and i + 1 < len(out):
            out[i + 1][1] = out[i + 1][1].lstrip(" \t\r\n")
    return [(t[0], t[1]) for t in out]


def _parse(tokens, i, stop=("end",)):
    """-> (nodes, index of the stopping action, its text)."""
    nodes = []
    while i < len(tokens):
        kind, value = tokens[i]
        if kind == "text":
            nodes.append(("text", value))
            i += 1
        elif value == "end" or value == "else" or value.startswith("else if "):
            return nodes, i, value
        elif value == ".Messages" or value.startswith("range "):
            if value != "range .Messages":
                raise ValueError(f"unsupported range: {value!r}")
            body, i, closing = _parse(tokens, i + 1)
            if closing != "end":
                raise ValueError("range without end")
            nodes.append(("range", body))
            i += 1
        elif value.startswith("if "):
            branches = []
            condition = value[3:]
            while True:
                body, i, closing = _parse(tokens, i + 1)
                branches.append((condition, body))
                if closing == "end":
                    break
                condition = closing[8:] if closing.startswith("else if ") else None
            nodes.append(("if", branches))
            i += 1
        elif value in (".Role", ".Content"):
            nodes.append(("field", value[1:]))
            i += 1
        else:
            raise ValueError(f"unsupported action: {value!r}")
    return nodes, i, None


def _condition(text: str | None, message: dict) -> bool:
    if text is None:
        return True
    m = re.fullmatch(r'eq \.Role "([^"]*)"', text)
    if not m:
        raise ValueError(f"unsupported condition: {text!r}")
    return message["role"] == m.group(1)


def _render(nodes, messages, message) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "field":
            out.append(message["role" if node[1] == "Role" else "content"])
        elif node[0] == "range":
            out.extend(_render(node[1], messages, m) for m in messages)
        else:
            for condition, body in node[1]:
                if _condition(condition, message):
                    out.append(_render(body, messages, message))
                    break
    return "".join(out)


def render(template: str, messages: list[dict]) -> str:
    nodes, _, closing = _parse(_tokens(template), 0)
    if closing is not None:
        raise ValueError(f"unbalanced {closing!r}")
    return _render(nodes, messages, None)
