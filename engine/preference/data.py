"""Preference pairs: rows in TRL's formats -> rendered, tokenized (chosen, rejected) pairs, cached.

Rows come from any source engine/data/sources.py reads (JSONL, Parquet, CSV with the
conversational lists as JSON text, Arrow, a save_to_disk folder), renamed per data.columns.

Two formats, told apart per line by the type of `prompt` (TRL's names):

| format           | one line holds                                                              |
|------------------|-----------------------------------------------------------------------------|
| `standard`       | `{"prompt": str, "chosen": str, "rejected": str}`                           |
| `conversational` | `{"prompt": [{"role", "content"}, ...], "chosen": [assistant turn(s)], "rejected": [...]}` |

Both are rendered with the model's chat template (a standard prompt is one user turn, a reply
one assistant turn): `prompt + chosen` and `prompt + rejected` become two documents whose loss
tokens are the reply turns only, end-of-turn included (engine/data/render.py finds them), so
the summed log-prob of a reply never counts a prompt token or padding. The length policy applies
to each side (a pair is dropped when either side is); a side with no trainable token drops the pair.

A pair document is `{"input_ids": chosen_ids + rejected_ids, "labels": chosen_labels +
rejected_labels, "split": len(chosen_ids), "source_line": n}` (labels shifted, so the chosen
side's last label is -100 and nothing crosses the split); the pair loader
(engine/preference/batches.py) puts the two sides into rows as separate documents.

Bad lines (missing field, empty reply, identical chosen and rejected, a prompt the template
cannot render, deep nesting, lone surrogates) are DataErrors naming file, line and field, raised
before anything trains; `on_bad_line=skip` counts them instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.config import DataConfig
from engine.data.errors import DataError, _BadLine, data_error
from engine.data.messages import decode_json_text, parse_message
from engine.data.sources import good_rows, read_rows
from engine.data.report import histogram
from engine.data.render import (IGNORE_INDEX, char_to_token, ensure_eos, fit_length, read_chat_template, render_chat,
                                resolve_template, template_features,
                                shift_labels, special_token_ids, token_mask)
from engine.data.tokenized import cache_key, default_cache_dir, encode_batch

log = logging.getLogger(__name__)

PAIR_FORMATS = ("standard", "conversational")
PAIR_CACHE_VERSION = "engine-pairs-v1"
PAIR_KEYS = ("prompt", "chosen", "rejected")


def is_pair_line(obj: Any) -> bool:
    """A JSON object in a preference format: it has `chosen` and `rejected`."""
    return isinstance(obj, dict) and "chosen" in obj and "rejected" in obj


def is_pair_file(path: str, columns: dict[str, str] | None = None) -> bool:
    """The first row of `path` (any source, engine/data/sources.py) that is an object is a preference pair."""
    try:
        return is_pair_line(next(good_rows(path, columns), None))
    except (OSError, DataError):
        return False


# ------------------------------------------------------------------------------------- parsing
def _messages(value: Any, key: str, *, assistant_only: bool) -> list[dict]:
    value = decode_json_text(value, key, list)
    if not isinstance(value, list) or not value:
        raise _BadLine(key, "must be a non-empty list of messages (conversational format)", value)
    out = []
    for i, m in enumerate(value):
        msg = parse_message(m, f"{key}[{i}]")
        if assistant_only and msg["role"] != "assistant":
            raise _BadLine(f"{key}[{i}].role", f"must be 'assistant' (chosen/rejected hold the reply turns), "
                           f"got {msg['role']!r}", m)
        out.append(msg)
    return out


def parse_pair(obj: dict) -> dict:
    """One JSON object -> {"format", "prompt": [msgs], "chosen": [msgs], "rejected": [msgs]} or _BadLine."""
    for key in PAIR_KEYS:
        if key not in obj:
            raise _BadLine(key, f"missing (a preference pair needs prompt, chosen and rejected; keys present: "
                           f"{', '.join(map(repr, obj)) or 'none'})", obj)
    prompt = obj["prompt"]
    if isinstance(prompt, str) and prompt.lstrip().startswith("[") and isinstance(obj["chosen"], str) \
            and obj["chosen"].lstrip().startswith("["):  # a CSV / string column holding the conversational lists
        obj = {k: decode_json_text(obj[k], k, list) for k in PAIR_KEYS}
        prompt = obj["prompt"]
    if isinstance(prompt, str):
        fmt = "standard"
        if not prompt.strip():
            raise _BadLine("prompt", "is empty", prompt)
        sides = {}
        for key in ("chosen", "rejected"):
            if not isinstance(obj[key], str):
                raise _BadLine(key, f"must be a string like the prompt (standard format), got {type(obj[key]).__name__}",
                               obj[key])
            sides[key] = [{"role": "assistant", "content": obj[key]}]
        prompt_msgs = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        fmt = "conversational"
        prompt_msgs = _messages(prompt, "prompt", assistant_only=False)
        sides = {key: _messages(obj[key], key, assistant_only=True) for key in ("chosen", "rejected")}
    else:
        raise _BadLine("prompt", f"must be a string (standard format) or a list of messages (conversational), "
                       f"got {type(prompt).__name__}", prompt)
    for key in ("chosen", "rejected"):
        if not any(m["content"].strip() for m in sides[key]):
            raise _BadLine(key, "is an empty reply", obj[key])
    if sides["chosen"] == sides["rejected"]:
        raise _BadLine("rejected", "is identical to chosen (the pair carries no preference)", obj["rejected"])
    return {"format": fmt, "prompt": prompt_msgs, "chosen": sides["chosen"], "rejected": sides["rejected"]}


def load_pairs(path: str, on_bad_line: str = "error", skipped: list[int] | None = None,
               columns: dict[str, str] | None = None) -> list[dict]:
    """Read preference pairs from any source (JSONL, Parquet, CSV, Arrow, a save_to_disk folder:
    engine/data/sources.py): [{"format", "prompt", "chosen", "rejected", "source_line"}].

    on_bad_line "error": DataError at the first bad row; "skip": its number goes to `skipped`.
    columns: {ours: theirs} (data.columns)."""
    return read_rows(path, lambda n, obj: dict(parse_pair(obj), source_line=n),
                     on_bad_line=on_bad_line, skipped=skipped, columns=columns)


# ------------------------------------------------------------------------------------- tokens
@dataclass
class PairStats:
    """What happened to a preference file on its way to tokens (line numbers 1-based)."""
    path: str = ""
    format: str = ""
    """standard, conversational or mixed."""
    max_seq_len: int = 0
    pairs: int = 0
    """Pairs parsed."""
    kept: int = 0
    """Pairs kept (after drops and no-trainable removals)."""
    tokens: int = 0
    """Tokens of both sides of the kept pairs."""
    chosen_loss_tokens: int = 0
    rejected_loss_tokens: int = 0
    truncated_lines: list[int] = field(default_factory=list)
    dropped_lines: list[int] = field(default_factory=list)
    skipped_lines: list[int] = field(default_factory=list)
    no_trainable_lines: list[int] = field(default_factory=list)
    eos_inserted: int = 0
    template_fallback: bool = False
    raw_lengths: list[int] = field(default_factory=list)
    """Tokens of each side (chosen, rejected, chosen, ...) before the length policy."""
    doc_lengths: list[int] = field(default_factory=list)
    """Tokens of each kept pair (both sides)."""
    tokenize_seconds: float = 0.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class PairDataset:
    """docs[i] = {"input_ids", "labels", "split", "source_line"} (module docstring)."""
    docs: list[dict]
    stats: PairStats
    from_cache: bool = False
    ref_table: object = None
    """[pairs, 2] reference log-probs (chosen, rejected), once a DPO evaluation has computed them."""

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> dict:
        return self.docs[i]


def _render_side(tokenizer, template, prompt: list[dict], reply: list[dict], special_texts) -> tuple[str, list, list]:
    """(text, reply spans, tail starts) of prompt + reply; spans of the reply turns only."""
    messages = prompt + reply
    reasoning_key = (template_features(tokenizer, template)["reasoning_key"]
                     if any("reasoning_content" in m for m in messages) else None)
    r = render_chat(tokenizer, template, messages, special_texts, reasoning_key=reasoning_key)
    return r.text, r.spans[len(r.spans) - len(reply):], r.tail_starts


def _tokenize(path: str, tokenizer, cfg: DataConfig, template: str, fallback: bool) -> tuple[list[dict], PairStats]:
    t0 = time.perf_counter()
    stats = PairStats(path=path, max_seq_len=cfg.max_seq_len, template_fallback=fallback)
    pairs = load_pairs(path, cfg.on_bad_line, skipped=stats.skipped_lines, columns=cfg.columns)
    stats.pairs = len(pairs)
    stats.format = "/".join(sorted({p["format"] for p in pairs})).replace("conversational/standard", "mixed")
    special = special_token_ids(tokenizer)
    special_texts = tuple(sorted({tokenizer.convert_ids_to_tokens(i) for i in special}, key=len, reverse=True))
    rendered = []  # (pair, [(text, spans, tails)] * 2)
    for p in pairs:
        try:
            sides = [_render_side(tokenizer, template, p["prompt"], p[k], special_texts) for k in ("chosen", "rejected")]
        except Exception as e:  # jinja TemplateError ("roles must alternate"...) or unfindable spans
            if cfg.on_bad_line == "skip":
                stats.skipped_lines.append(p["source_line"])
                continue
            raise data_error(path, p["source_line"], "prompt", f"chat template failed: {e}",
                             p["prompt"][0]["content"]) from None
        rendered.append((p, sides))
    encoded = encode_batch(tokenizer, [text for _, sides in rendered for text, _, _ in sides], False)
    docs = []
    for k, (p, sides) in enumerate(rendered):
        line, where = p["source_line"], f"{path}:{p['source_line']}"
        parts, status = [], set()
        for (text, spans, tails), (ids, offsets) in zip(sides, encoded[2 * k:2 * k + 2]):
            mask = token_mask(offsets, spans)
            ids, mask, inserted = ensure_eos(ids, mask, tokenizer.eos_token_id, special,
                                             char_to_token(offsets, spans[-1][1]))
            stats.eos_inserted += inserted
            stats.raw_lengths.append(len(ids))
            fitted = fit_length(ids, mask, cfg.max_seq_len, cfg.length_policy,
                                [char_to_token(offsets, c) for c in tails], where)
            status.add(fitted.status)
            parts.append((fitted.ids, shift_labels(fitted.ids, fitted.mask)))
        if "dropped" in status:
            stats.dropped_lines.append(line)
            continue
        counts = [int((labels != IGNORE_INDEX).sum()) for _, labels in parts]
        if min(counts) == 0:
            stats.no_trainable_lines.append(line)
            continue
        if status != {"fits"}:
            stats.truncated_lines.append(line)
        (c_ids, c_lab), (r_ids, r_lab) = parts
        docs.append({"input_ids": np.concatenate([c_ids, r_ids]).tolist(),
                     "labels": np.concatenate([c_lab, r_lab]).tolist(), "split": len(c_ids), "source_line": line})
        stats.tokens += len(c_ids) + len(r_ids)
        stats.chosen_loss_tokens += counts[0]
        stats.rejected_loss_tokens += counts[1]
        stats.doc_lengths.append(len(c_ids) + len(r_ids))
    stats.kept = len(docs)
    stats.tokenize_seconds = time.perf_counter() - t0
    return docs, stats


# ------------------------------------------------------------------------------------- cache
def pair_cache_key(path: str, tokenizer, template: str, cfg: DataConfig) -> str:
    h = hashlib.sha256(PAIR_CACHE_VERSION.encode())
    h.update(cache_key(path, tokenizer, template, cfg).encode())
    return h.hexdigest()[:32]


def _save_cache(file: str, docs: list[dict], stats: PairStats) -> None:
    from safetensors.numpy import save_file

    lengths = np.array([len(d["input_ids"]) for d in docs], dtype=np.int64)
    tensors = {"input_ids": np.concatenate([np.asarray(d["input_ids"], dtype=np.int32) for d in docs]),
               "labels": np.concatenate([np.asarray(d["labels"], dtype=np.int32) for d in docs]),
               "doc_offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
               "splits": np.array([d["split"] for d in docs], dtype=np.int64),
               "source_lines": np.array([d["source_line"] for d in docs], dtype=np.int64)}
    os.makedirs(os.path.dirname(file), exist_ok=True)
    tmp = f"{file}.tmp{os.getpid()}"
    save_file(tensors, tmp, metadata={"stats": json.dumps(stats.as_dict()), "version": PAIR_CACHE_VERSION})
    os.replace(tmp, file)


def _load_cache(file: str) -> tuple[list[dict], PairStats] | None:
    from safetensors import safe_open

    try:
        with safe_open(file, framework="np") as f:
            meta = f.metadata() or {}
            if meta.get("version") != PAIR_CACHE_VERSION:
                return None
            t = {k: f.get_tensor(k) for k in ("input_ids", "labels", "doc_offsets", "splits", "source_lines")}
        stats = PairStats(**json.loads(meta["stats"]))
    except Exception as e:  # a corrupt or foreign file: re-tokenize and overwrite it
        log.warning("ignoring unreadable tokenized pair cache %s (%s)", file, e)
        return None
    off, ids, labels = t["doc_offsets"], t["input_ids"].tolist(), t["labels"].tolist()
    docs = [{"input_ids": ids[off[i]:off[i + 1]], "labels": labels[off[i]:off[i + 1]], "split": int(t["splits"][i]),
             "source_line": int(line)} for i, line in enumerate(t["source_lines"])]
    return docs, stats


def load_pair_dataset(path: str, tokenizer, cfg: DataConfig, *, cache: bool = True) -> PairDataset:
    """Read, render, tokenize (or load from the cache) and length-fit a preference JSONL file.

    DataError (file, line, field) for a malformed line, and when no pair is left to train on."""
    if cfg.sources and (path in (None, "", "???") or path == cfg.train_path):
        raise DataError("data.sources:0: field 'data.sources': preference pairs are read from one source "
                        "(data.train_path: a JSONL, Parquet, CSV or Arrow file or a save_to_disk folder)")
    dataclasses.replace(cfg, train_path=path, eval_path=None, sources=None).validate()
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{path}:0: field '(tokenizer)': a fast tokenizer is required (offset mapping "
                        f"finds the reply tokens); got {type(tokenizer).__name__} — ")
    template, fallback = ((read_chat_template(cfg.chat_template), False) if cfg.chat_template
                          else resolve_template(tokenizer))
    file = None
    if cache:
        file = os.path.join(cfg.cache_dir or default_cache_dir(), pair_cache_key(path, tokenizer, template, cfg)
                            + ".pairs.safetensors")
        hit = _load_cache(file) if os.path.isfile(file) else None
        if hit is not None:
            docs, stats = hit
            stats.path = path
            _check_trainable(path, stats, docs)
            return PairDataset(docs, stats, from_cache=True)
    docs, stats = _tokenize(path, tokenizer, cfg, template, fallback)
    _check_trainable(path, stats, docs)
    if file is not None:
        _save_cache(file, docs, stats)
    return PairDataset(docs, stats)


def _check_trainable(path: str, stats: PairStats, docs: list[dict]) -> None:
    if not docs:
        raise DataError(f"{path}:0: field '(dataset)': no pair is left to train on ({stats.pairs} pairs, "
                        f"{len(stats.dropped_lines)} dropped as too long, {len(stats.no_trainable_lines)} with a side "
                        f"without a token carrying loss, {len(stats.skipped_lines)} lines skipped) — ")


def format_pair_report(stats: PairStats, length_policy: str, tokenizer_name: str) -> str:
    """The data report of a preference file (what `python -m engine.data PAIRS.jsonl` prints)."""
    short = lambda xs: (", ".join(map(str, xs[:30])) + (f", ... ({len(xs)} in all)" if len(xs) > 30 else "")) or "-"
    raw = stats.raw_lengths
    return "\n".join([
        f"data report: {stats.path}",
        f"  preference pairs ({stats.format}), tokenizer {tokenizer_name}, max_seq_len {stats.max_seq_len} per side, "
        f"length_policy {length_policy}" + (", ChatML fallback template" if stats.template_fallback else ""),
        f"pairs: {stats.pairs}; malformed lines skipped: {len(stats.skipped_lines)} [{short(stats.skipped_lines)}]",
        f"pairs kept: {stats.kept}",
        f"tokens: {stats.tokens:,} (both sides); carrying loss: chosen {stats.chosen_loss_tokens:,}, "
        f"rejected {stats.rejected_loss_tokens:,}",
        f"tokens per side before the length policy: min {min(raw, default=0)}, max {max(raw, default=0)}, "
        f"mean {sum(raw) / max(len(raw), 1):.0f}",
        f"truncated: {len(stats.truncated_lines)} [{short(stats.truncated_lines)}]",
        f"dropped (too long): {len(stats.dropped_lines)} [{short(stats.dropped_lines)}]",
        f"pairs with a side without a trainable token: {len(stats.no_trainable_lines)} [{short(stats.no_trainable_lines)}]",
        f"EOS inserted after replies: {stats.eos_inserted}",
        "length histogram (tokens per side, before the length policy):",
        *histogram(raw),
    ])
