"""The data report: what a data source becomes in tokens, and what looks wrong in it.

Per source (a file, a save_to_disk folder, or each entry of data.sources): rows, the formats
found, tool-call turns, reasoning turns, tokens carrying loss per role (the role of the token a
label predicts: system, user, assistant, tool, reasoning, text, (template) for what no message
renders), and the rows skipped, dropped and truncated.

Degenerate samples: a reply that loops (`agosagosagos...`, "the Effective on the Effective on...")
teaches the model to loop. Two cheap detectors over the raw text of assistant replies (and texts):
- a repeated run: some unit of 2..64 characters (with a letter or digit) repeated back to back at
  least 5 times and covering at least 64 characters (regex `(.{2,64}?)\\1{4,}`);
- a low compression ratio: zlib-compressed size / raw size < 0.2 for texts of at least 500
  characters (natural prose and legal text compress to about 0.3-0.5).
"""

from __future__ import annotations

import math
import re
import zlib

from engine.data.loader import pack_documents
from engine.data.tokenized import DataStats

REPEAT = re.compile(r"(.{2,64}?)\1{4,}", re.S)
MIN_RUN_CHARS = 64
MIN_RATIO = 0.2
MIN_RATIO_CHARS = 500


def compression_ratio(text: str) -> float:
    raw = text.encode("utf-8")
    return len(zlib.compress(raw, 6)) / max(len(raw), 1)


def longest_repeat(text: str) -> tuple[str, int] | None:
    """(unit, run length in chars) of the longest back-to-back repetition, or None."""
    best = None
    for m in REPEAT.finditer(text):
        unit, run = m.group(1), len(m.group(0))
        if run >= MIN_RUN_CHARS and any(c.isalnum() for c in unit) and (best is None or run > best[1]):
            best = (unit, run)
    return best


def degenerate_reason(text: str) -> str | None:
    """Why a text looks degenerate, or None."""
    reasons = []
    rep = longest_repeat(text)
    if rep is not None:
        unit, run = rep
        reasons.append(f"{unit!r} repeated {run // len(unit)}x back to back ({run} chars)")
    ratio = compression_ratio(text)
    if len(text) >= MIN_RATIO_CHARS and ratio < MIN_RATIO:
        reasons.append(f"compression ratio {ratio:.2f} < {MIN_RATIO}")
    return "; ".join(reasons) or None


def find_degenerate(examples: list[dict]) -> list[tuple[int, str, str]]:
    """[(line, role, reason)] for assistant replies and texts that look degenerate."""
    found = []
    for ex in examples:
        if "text" in ex:
            items = [(ex["source_line"], "text", ex["text"])]
        else:
            lines = ex.get("message_lines") or [ex["source_line"]] * len(ex["messages"])
            items = [(ln, m["role"], m["content"]) for ln, m in zip(lines, ex["messages"]) if m["role"] == "assistant"]
        for line, role, text in items:
            why = degenerate_reason(text)
            if why:
                found.append((line, role, why))
    return found


def histogram(lengths: list[int], bins: int = 12, width: int = 40) -> list[str]:
    """Text histogram of token lengths with round bin edges."""
    if not lengths:
        return ["(no examples)"]
    step = max(16, 2 ** math.ceil(math.log2(max(max(lengths), 1) / bins)))
    lo = min(lengths) // step * step
    counts: dict[int, int] = {}
    for n in lengths:
        counts[(n - lo) // step] = counts.get((n - lo) // step, 0) + 1
    top = max(counts.values())
    out = []
    for b in range(max(counts) + 1):
        c = counts.get(b, 0)
        a = lo + b * step
        out.append(f"  [{a:>6}, {a + step:>6})  {'#' * math.ceil(c / top * width) if c else '':<{width}}  {c}")
    return out


def _lines(xs: list[int], limit: int = 30) -> str:
    if not xs:
        return "-"
    return ", ".join(map(str, xs[:limit])) + (f", ... ({len(xs)} in all)" if len(xs) > limit else "")


def _roles(counts: dict) -> str:
    return ", ".join(f"{role} {n:,}" for role, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "-"


def _source_lines(sources: list[dict]) -> list[str]:
    out = [f"sources: {len(sources)}"]
    for s in sources:
        formats = ", ".join(f"{fmt} {n}" for fmt, n in s["formats"].items())
        out.append(f"  {s['path']}: {s['rows']} rows ({formats}), {s['examples']} examples used, "
                   f"{s['documents']} documents; tool-call turns {s['tool_call_turns']}, reasoning turns "
                   f"{s['reasoning_turns']}; skipped {s['skipped']}, dropped {s['dropped']}, truncated "
                   f"{s['truncated']}; loss tokens per role: {_roles(s['loss_tokens_by_role'])}")
    return out


def format_report(stats: DataStats, examples: list[dict], tokenizer_name: str, length_policy: str) -> str:
    """The report as plain text (markdown-friendly)."""
    L = stats.max_seq_len
    pct = lambda a, b: f"{100.0 * a / b:.1f}%" if b else "n/a"
    lines = [
        f"data report: {stats.path}",
        f"  format {stats.format}, tokenizer {tokenizer_name}, max_seq_len {L}, loss_on {stats.loss_on}, "
        f"length_policy {length_policy}" + (", ChatML fallback template" if stats.template_fallback else ""),
        f"examples: {stats.examples} ({stats.conversations} conversations); malformed lines skipped: "
        f"{stats.skipped} [{_lines(stats.skipped_lines)}]",
        f"documents kept: {stats.documents}",
        f"tokens: {stats.tokens:,} in kept documents; carrying loss: {stats.loss_tokens:,} "
        f"({pct(stats.loss_tokens, stats.tokens)})",
        f"tokens before the length policy: {sum(stats.raw_lengths):,} (min {min(stats.raw_lengths, default=0)}, "
        f"max {max(stats.raw_lengths, default=0)}, mean {sum(stats.raw_lengths) / max(len(stats.raw_lengths), 1):.0f})",
        f"truncated: {stats.truncated} [{_lines(stats.truncated_lines)}]; of which the answer itself was cut: "
        f"{stats.answer_truncated} [{_lines(stats.answer_truncated_lines)}]",
        f"dropped (too long): {stats.dropped} [{_lines(stats.dropped_lines)}]",
        f"examples with no trainable token: {stats.no_trainable} [{_lines(stats.no_trainable_lines)}]",
        f"EOS inserted after final replies: {stats.eos_inserted}",
        f"tool-call turns: {stats.tool_call_turns}; reasoning turns: {stats.reasoning_turns} "
        f"(train_on_reasoning {str(stats.train_on_reasoning).lower()})",
        f"tokens carrying loss per role: {_roles(stats.loss_tokens_by_role)}",
        *_source_lines(stats.sources),
        "length histogram (tokens per example, before the length policy):",
        *histogram(stats.raw_lengths),
    ]
    docs = stats.doc_lengths
    if docs:
        rows = pack_documents(docs, L)
        lines.append(f"packing at max_seq_len {L}: {len(docs)} documents -> {len(rows)} rows, "
                     f"{pct(sum(docs), len(rows) * L)} non-pad tokens (one document per max_seq_len row: "
                     f"{pct(sum(docs), len(docs) * L)})")
    degenerate = find_degenerate(examples)
    lines.append(f"degenerate samples (repeated runs >= {MIN_RUN_CHARS} chars or zlib ratio < {MIN_RATIO}): "
                 f"{len(degenerate)}")
    for line, role, why in degenerate:
        lines.append(f"  line {line} ({role}): {why}")
    return "\n".join(lines)
