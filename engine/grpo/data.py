"""GRPO prompts from any source engine/data reads (JSONL, Parquet, CSV, Arrow, save_to_disk folders;
data.columns renames), in TRL's two formats:

    {"prompt": "What is 2 + 2?", "answer": "4"}                                     standard
    {"prompt": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."}], "answer": "4"}
                                                                                    conversational

Every other column travels with the prompt and reaches the reward functions as a keyword argument
(a list, one value per completion), as in TRL's GRPOTrainer. A standard prompt is rendered as one
user turn of the chat template (what an instruct model expects); a conversational one is rendered
as it is, up to the assistant header. A bad line is a DataError naming the file, the line and the
field (or a counted skip with data.on_bad_line=skip).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from engine.data.errors import DataError, _BadLine
from engine.data.sources import read_rows
from engine.generate import encode_prompt

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Prompt:
    prompt: Any                     # str (standard) or list of {"role", "content"} (conversational)
    columns: dict[str, Any]         # every other column of the line, for the reward functions
    source: str                     # "file:line", named in errors about this prompt
    prompt_ids: list[int] = field(default_factory=list)

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)

    def messages(self) -> list[dict]:
        return self.prompt if self.conversational else [{"role": "user", "content": self.prompt}]


def _parse(path: str, lineno: int, row: dict) -> Prompt:
    """One row (a JSON object: engine/data/sources.py checks that) -> a Prompt, or _BadLine naming the field."""
    if "prompt" not in row:
        raise _BadLine("prompt", f"missing (fields: {', '.join(sorted(row)) or 'none'})", row)
    prompt = row["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise _BadLine("prompt", "is empty", prompt)
    elif isinstance(prompt, list):
        if not prompt:
            raise _BadLine("prompt", "is an empty list of messages", prompt)
        for i, m in enumerate(prompt):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise _BadLine(f"prompt[{i}]", "must be {\"role\": str, \"content\": str}", m)
            if m["role"] not in ROLES:
                raise _BadLine(f"prompt[{i}].role", f"{m['role']!r} is not one of {', '.join(ROLES)}", m)
        if prompt[-1]["role"] == "assistant":
            raise _BadLine(f"prompt[{len(prompt) - 1}].role", "the last message is the assistant's: "
                           "the completion would continue a finished turn", prompt[-1])
    else:
        raise _BadLine("prompt", f"must be a string or a list of messages, not {type(prompt).__name__}", prompt)
    return Prompt(prompt, {k: v for k, v in row.items() if k != "prompt"}, f"{path}:{lineno}")


def load_prompts(path: str, tokenizer, *, max_prompt_tokens: int, on_bad_line: str = "error",
                 announce: bool = True, columns: dict[str, str] | None = None) -> list[Prompt]:
    """The prompts of `path`, tokenized through the chat template (see the module docstring).
    A prompt longer than max_prompt_tokens is a DataError (or skipped), never cut silently."""
    skipped: list[int] = []
    prompts = read_rows(path, lambda n, row: _parse(path, n, row), on_bad_line=on_bad_line, skipped=skipped,
                        columns=columns)
    kept = []
    for p in prompts:
        p.prompt_ids = encode_prompt(tokenizer, p.messages())
        if len(p.prompt_ids) > max_prompt_tokens:
            if on_bad_line == "error":
                raise DataError(f"{p.source}: field 'prompt': {len(p.prompt_ids)} tokens after the chat template, "
                                f"more than data.max_seq_len - objective.max_completion_length = {max_prompt_tokens}")
            skipped.append(int(p.source.rsplit(":", 1)[1]))
            continue
        kept.append(p)
    if not kept:
        raise DataError(f"{path}:0: field 'prompt': no prompt fits in {max_prompt_tokens} tokens")
    if announce and skipped:
        print(f"{path}: {len(skipped)} line(s) skipped (data.on_bad_line=skip): {sorted(skipped)[:10]}", file=sys.stderr)
    return kept
