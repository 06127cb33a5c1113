"""Examples -> tokenized documents (input_ids + shifted labels), tokenized once and cached on disk.

`load_dataset(path, tokenizer, cfg)` reads the JSONL file (formats.py), renders conversations with
the chat template (render.py), tokenizes every rendered text in batches with the fast tokenizer
(FIELD.md bug 11: no per-example Python tokenization loop), applies the length policy, and caches
the result as one safetensors file keyed by

    sha256(CACHE_VERSION, file bytes, tokenizer serialization, chat template, special ids,
           format, max_seq_len, loss_on, length_policy, on_bad_line)

so a second run loads the tokens without tokenizing, and any change to the file, the tokenizer,
the template or those config fields misses the cache. Never pickle: tensors in safetensors, the
stats as JSON in its metadata.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from engine.config import DataConfig
from engine.data.formats import DataError, data_error, format_of, iter_examples
from engine.data.masks import ROLE_INDEX, conversation_mask, count_by_role, token_roles
from engine.data.render import (char_to_token, ensure_eos, fit_length, read_chat_template, render_chat,
                                resolve_template, shift_labels, special_token_ids, template_features, IGNORE_INDEX)
from engine.data.sources import source_fingerprint

log = logging.getLogger(__name__)

CACHE_VERSION = "engine-data-v2"
ENCODE_BATCH = 128  # texts per fast-tokenizer call (the Rust side parallelises within a batch)
RENDER_CHUNK = 1024  # examples rendered, tokenized and masked together (bounds the rendered text held)


@dataclass
class DataStats:
    """What happened to a file on its way to tokens. Line numbers are 1-based source lines."""
    path: str = ""
    format: str = ""
    max_seq_len: int = 0
    loss_on: str = ""
    examples: int = 0
    """Examples parsed (conversations + texts)."""
    conversations: int = 0
    documents: int = 0
    """Documents kept (after drops and no-trainable removals)."""
    tokens: int = 0
    """Tokens in the kept documents (after truncation)."""
    loss_tokens: int = 0
    """Labels != -100 in the kept documents."""
    truncated_lines: list[int] = field(default_factory=list)
    """Every example the length policy shortened (prompt middle cut, answer cut or text cut)."""
    answer_truncated_lines: list[int] = field(default_factory=list)
    """Subset of truncated_lines whose final answer itself was cut (prompt minimum did not fit)."""
    dropped_lines: list[int] = field(default_factory=list)
    """Examples longer than max_seq_len left out (length_policy=drop)."""
    skipped_lines: list[int] = field(default_factory=list)
    """Malformed lines left out (on_bad_line=skip)."""
    no_trainable_lines: list[int] = field(default_factory=list)
    """Examples with no token carrying loss (e.g. no assistant reply); left out."""
    eos_inserted: int = 0
    """Final replies whose template did not close them with a special token: an EOS was inserted."""
    template_fallback: bool = False
    """The tokenizer had no chat template; the ChatML fallback was used."""
    tool_call_turns: int = 0
    """Assistant turns that call tools."""
    reasoning_turns: int = 0
    """Assistant turns with a reasoning trace."""
    train_on_reasoning: bool = True
    loss_tokens_by_role: dict = field(default_factory=dict)
    """Labels != -100 per role of the token they predict: system, user, assistant, tool, reasoning
    (assistant traces), text, (template) (what no message renders: tool schemas, headers)."""
    sources: list = field(default_factory=list)
    """Per source (data.sources or the one file): {path, rows, formats, examples, tool_call_turns,
    reasoning_turns, loss_tokens_by_role, skipped, dropped, truncated, documents}."""
    raw_lengths: list[int] = field(default_factory=list)
    """Token count of every tokenized example before the length policy."""
    doc_lengths: list[int] = field(default_factory=list)
    """Token count of every kept document."""
    tokenize_seconds: float = 0.0

    @property
    def truncated(self) -> int:
        return len(self.truncated_lines)

    @property
    def answer_truncated(self) -> int:
        return len(self.answer_truncated_lines)

    @property
    def dropped(self) -> int:
        return len(self.dropped_lines)

    @property
    def skipped(self) -> int:
        return len(self.skipped_lines)

    @property
    def no_trainable(self) -> int:
        return len(self.no_trainable_lines)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TokenizedDataset:
    """docs[i] = {"input_ids": [int], "labels": [int] (shifted, -100 = no loss), "source_line": int}."""
    docs: list[dict]
    stats: DataStats
    from_cache: bool = False

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> dict:
        return self.docs[i]

    @property
    def lengths(self) -> list[int]:
        return [len(d["input_ids"]) for d in self.docs]


# ---------------------------------------------------------------------------------------------
# Cache



def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full serialization (vocab, merges, normalizer, added tokens)."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id,
                         sorted(special_token_ids(tokenizer))]).encode())
    return h.hexdigest()


def cache_key(path, tokenizer, template: str, cfg: DataConfig) -> str:
    """Keyed on the content of every file read (not its name or date), the tokenizer, the template
    and every config field that changes the tokens. `path`: a source or the list of data.sources."""
    h = hashlib.sha256()
    parts = [CACHE_VERSION]
    for src in source_list(path, cfg):
        parts += [source_fingerprint(src["path"]), json.dumps({k: v for k, v in src.items() if k != "path"},
                                                              sort_keys=True)]
    parts += [tokenizer_fingerprint(tokenizer), template, cfg.format, str(cfg.max_seq_len), cfg.loss_on,
              cfg.length_policy, cfg.on_bad_line, json.dumps(cfg.columns or {}, sort_keys=True),
              str(cfg.train_on_reasoning)]
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


def source_list(path, cfg: DataConfig) -> list[dict]:
    """[{path, count?, share?}]: `path` itself (a file or folder), or data.sources when `path` is
    unset (None / "???") or is that list."""
    if isinstance(path, (list, tuple)):
        return [dict(s) for s in path]
    if cfg.sources and _is_train(path, cfg):
        return [dict(s) for s in cfg.sources]
    if path in (None, "", "???"):
        raise DataError(f"{path}:0: field 'data.train_path': not set (and no data.sources)")
    return [{"path": path}]


def _is_train(path, cfg: DataConfig) -> bool:
    """`path` is the training data (so data.sources, when set, replaces it)."""
    return path in (None, "", "???") or path == cfg.train_path


def _label(path, cfg: DataConfig) -> str:
    return "data.sources" if isinstance(path, (list, tuple)) or (cfg.sources and _is_train(path, cfg)) else str(path)


def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "engine", "tokenized")


def _save_cache(file: str, docs: list[dict], stats: DataStats) -> None:
    from safetensors.numpy import save_file

    lengths = np.array([len(d["input_ids"]) for d in docs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    cat = (lambda key: np.concatenate([np.asarray(d[key], dtype=np.int32) for d in docs])
           if docs else np.zeros(0, dtype=np.int32))
    tensors = {"input_ids": cat("input_ids"), "labels": cat("labels"), "doc_offsets": offsets,
               "source_lines": np.array([d["source_line"] for d in docs], dtype=np.int64),
               "sources": np.array([d.get("source", 0) for d in docs], dtype=np.int64)}
    os.makedirs(os.path.dirname(file), exist_ok=True)
    tmp = f"{file}.tmp{os.getpid()}"
    save_file(tensors, tmp, metadata={"stats": json.dumps(stats.as_dict()), "version": CACHE_VERSION})
    os.replace(tmp, file)  # atomic: a crash never leaves a half-written cache entry


def _load_cache(file: str) -> tuple[list[dict], DataStats] | None:
    from safetensors import safe_open

    try:
        with safe_open(file, framework="np") as f:
            meta = f.metadata() or {}
            if meta.get("version") != CACHE_VERSION:
                return None
            t = {k: f.get_tensor(k) for k in ("input_ids", "labels", "doc_offsets", "source_lines", "sources")}
        stats = DataStats(**json.loads(meta["stats"]))
    except Exception as e:  # a corrupt or foreign file: re-tokenize and overwrite it
        log.warning("ignoring unreadable tokenized cache %s (%s)", file, e)
        return None
    off = t["doc_offsets"]
    ids, labels = t["input_ids"].tolist(), t["labels"].tolist()
    docs = [{"input_ids": ids[off[i]:off[i + 1]], "labels": labels[off[i]:off[i + 1]],
             "source_line": int(line), "source": int(t["sources"][i])} for i, line in enumerate(t["source_lines"])]
    return docs, stats


# ---------------------------------------------------------------------------------------------
# Tokenization


def encode_batch(tokenizer, texts: list[str], add_special_tokens: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """Batched fast-tokenizer call -> [(ids [n] int64, offsets [n, 2] int64)] per text."""
    out = []
    for i in range(0, len(texts), ENCODE_BATCH):
        enc = tokenizer(texts[i:i + ENCODE_BATCH], add_special_tokens=add_special_tokens,
                        return_offsets_mapping=True, return_attention_mask=False, verbose=False)
        for ids, offs in zip(enc["input_ids"], enc["offset_mapping"]):
            out.append((np.asarray(ids, dtype=np.int64), np.asarray(offs, dtype=np.int64).reshape(-1, 2)))
    return out


def mixed_examples(path: str, src: dict, cfg: DataConfig, skipped: list[int], first_pass: list[int]) -> Iterator[dict]:
    """A source's share of the mixture, streamed: every example; or `count` examples (its first
    ones; more than it has reads it again from the start); or `share` x its examples (a first
    pass counts them). `first_pass`: [examples read in the first pass] (for the report)."""
    def read(skips: list[int]) -> Iterator[dict]:
        return iter_examples(path, cfg.format, cfg.on_bad_line, skips, cfg.columns)

    want = src.get("count")
    if want is None and src.get("share") is not None:
        n = sum(1 for _ in read([]))
        want = max(1, round(src["share"] * n))
    given, passes = 0, 0
    while want is None or given < want:
        for ex in read(skipped if passes == 0 else []):
            if want is not None and given == want:
                break
            if passes == 0:
                first_pass[0] += 1
            given += 1
            yield ex
        passes += 1
        if want is None:
            return


def _check_template_features(path: str, examples: list[dict], features) -> None:
    """A template that cannot render the data's tool calls or tool schemas is refused here, at
    the first example that has them (a SmolLM2-like plain ChatML template drops both silently)."""
    for ex in examples:
        for i, m in enumerate(ex.get("messages", ())):
            if "tool_calls" in m and not features()["tool_calls"]:
                raise data_error(path, ex["source_line"], f"messages[{i}].tool_calls",
                                 "the chat template cannot render tool calls (a probe call's name does not appear in "
                                 "its rendering); give one that does: data.chat_template=path/to/template.jinja",
                                 m["tool_calls"][0]["function"]["name"])
        if ex.get("tools") and not features()["tools"]:
            raise data_error(path, ex["source_line"], "tools", "the chat template cannot render tool schemas "
                             "(apply_chat_template(..., tools=...) leaves them out); give one that does: "
                             "data.chat_template=path/to/template.jinja", ex["tools"][0])


def _tokenize(path, tokenizer, cfg: DataConfig, template: str, fallback: bool) -> tuple[list[dict], DataStats]:
    t0 = time.perf_counter()
    sources = source_list(path, cfg)
    stats = DataStats(path=_label(path, cfg), format="/".join(sorted({format_of(s["path"], cfg.format, cfg.columns)
                                                                 for s in sources})),
                      max_seq_len=cfg.max_seq_len, loss_on=cfg.loss_on, template_fallback=fallback,
                      train_on_reasoning=cfg.train_on_reasoning)
    special = special_token_ids(tokenizer)
    special_texts = tuple(sorted({tokenizer.convert_ids_to_tokens(i) for i in special}, key=len, reverse=True))
    probed = {}
    features = lambda: probed.setdefault("f", template_features(tokenizer, template))  # noqa: E731
    docs = []
    for index, src in enumerate(sources):
        where = src["path"]
        skipped: list[int] = []
        first_pass = [0]
        per = {"path": where, "rows": 0, "formats": {}, "examples": 0, "tool_call_turns": 0, "reasoning_turns": 0,
               "loss_tokens_by_role": {}, "skipped": 0, "dropped": 0, "truncated": 0, "documents": 0}
        stream = mixed_examples(where, src, cfg, skipped, first_pass)
        while chunk := list(itertools.islice(stream, RENDER_CHUNK)):  # rows stream; tokens accumulate
            _check_template_features(where, chunk, features)
            per["examples"] += len(chunk)
            docs += _tokenize_chunk(chunk, where, index, tokenizer, cfg, template, special, special_texts,
                                    features, stats, per)
        per["rows"] = first_pass[0] + len(skipped)
        per["skipped"] += len(skipped)
        per["formats"][format_of(where, cfg.format, cfg.columns)] = first_pass[0]
        stats.skipped_lines += skipped
        stats.sources.append(per)
    stats.documents = len(docs)
    stats.tokenize_seconds = time.perf_counter() - t0
    return docs, stats


def _tokenize_chunk(examples, path, index, tokenizer, cfg, template, special, special_texts, features,
                    stats: DataStats, per: dict) -> list[dict]:
    """Render, tokenize, mask and length-fit a chunk of one source's examples -> documents."""
    rendered: list[tuple[dict, object]] = []
    for ex in examples:
        stats.examples += 1
        if "messages" not in ex:
            rendered.append((ex, None))
            continue
        stats.conversations += 1
        for m in ex["messages"]:
            per["tool_call_turns"] += "tool_calls" in m
            per["reasoning_turns"] += "reasoning_content" in m
        try:
            reasoning_key = features()["reasoning_key"] if any("reasoning_content" in m for m in ex["messages"]) else None
            rendered.append((ex, render_chat(tokenizer, template, ex["messages"], special_texts,
                                             tools=ex.get("tools"), reasoning_key=reasoning_key)))
        except Exception as e:  # jinja TemplateError ("roles must alternate"...) or unfindable spans
            if cfg.on_bad_line == "skip":
                stats.skipped_lines.append(ex["source_line"])
                per["skipped"] += 1
                continue
            raise data_error(path, ex["source_line"], "messages", f"chat template failed: {e}",
                             ex["messages"][0]["content"]) from None
    chat_idx = [i for i, (_, r) in enumerate(rendered) if r is not None]
    text_idx = [i for i, (_, r) in enumerate(rendered) if r is None]
    encoded: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    # Rendered chats already hold the template's BOS/control tokens: no extra special tokens.
    for i, enc in zip(chat_idx, encode_batch(tokenizer, [rendered[i][1].text for i in chat_idx], False)):
        encoded[i] = enc
    for i, enc in zip(text_idx, encode_batch(tokenizer, [rendered[i][0]["text"] for i in text_idx], True)):
        encoded[i] = enc

    docs = []
    for i, (ex, r) in enumerate(rendered):
        ids, offsets = encoded[i]
        line = ex["source_line"]
        if r is None:  # text: loss on every token; end with EOS so documents learn to stop
            mask = np.ones(len(ids), dtype=bool)
            roles = token_roles(None, None, offsets)
            if tokenizer.eos_token_id is not None and (len(ids) == 0 or ids[-1] != tokenizer.eos_token_id):
                ids, mask = np.append(ids, tokenizer.eos_token_id), np.append(mask, True)
                roles = np.append(roles, roles[-1:] if len(roles) else [ROLE_INDEX["text"]]).astype(np.int8)
            tail_tokens: list[int] = []
        else:
            try:
                mask = conversation_mask(r, ex["messages"], offsets, cfg.loss_on, cfg.train_on_reasoning)
            except ValueError as e:
                raise data_error(path, line, "messages", str(e), ex["messages"][0]["content"]) from None
            roles = token_roles(r, ex["messages"], offsets)
            tail_tokens = [char_to_token(offsets, c) for c in r.tail_starts]
            if r.spans:
                end = char_to_token(offsets, r.spans[-1][1])
                n = len(ids)
                ids, mask, inserted = ensure_eos(ids, mask, tokenizer.eos_token_id, special, end)
                if len(ids) > n:
                    roles = np.insert(roles, end, ROLE_INDEX["assistant"])
                stats.eos_inserted += inserted
        stats.raw_lengths.append(len(ids))
        fitted = fit_length(ids, mask, cfg.max_seq_len, cfg.length_policy, tail_tokens, f"{path}:{line}")
        if fitted.status == "dropped":
            stats.dropped_lines.append(line)
            per["dropped"] += 1
            continue
        if fitted.status != "fits":
            stats.truncated_lines.append(line)
            per["truncated"] += 1
        if fitted.status == "answer_truncated":
            stats.answer_truncated_lines.append(line)
        labels = shift_labels(fitted.ids, fitted.mask)
        n_loss = int((labels != IGNORE_INDEX).sum())
        if n_loss == 0:
            stats.no_trainable_lines.append(line)
            continue
        docs.append({"input_ids": fitted.ids.tolist(), "labels": labels.tolist(), "source_line": line,
                     "source": index})
        kept_roles = roles[fitted.keep]
        count_by_role(kept_roles, fitted.mask, per["loss_tokens_by_role"])
        count_by_role(kept_roles, fitted.mask, stats.loss_tokens_by_role)
        per["documents"] += 1
        stats.tokens += len(fitted.ids)
        stats.loss_tokens += n_loss
        stats.doc_lengths.append(len(fitted.ids))
    return docs


def load_dataset(path, tokenizer, cfg: DataConfig, *, cache: bool = True) -> TokenizedDataset:
    """Read, render, tokenize (or load from the cache) and length-fit a dataset: `path` is a
    JSONL / Parquet / CSV / Arrow file or a save_to_disk folder (sources.py), or unset (None /
    "???") to read the mixture data.sources.

    Raises DataError (one line: file, line or row, field, why, excerpt) for malformed input, and
    when no example carries a trainable token (FIELD.md bug 4) — before any training starts.
    """
    label = _label(path, cfg)
    if label == "data.sources":
        dataclasses.replace(cfg, eval_path=None).validate()  # ConfigError on bad fields
    else:
        dataclasses.replace(cfg, train_path=path, eval_path=None, sources=None).validate()
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{label}:0: field '(tokenizer)': a fast tokenizer is required (offset mapping "
                        f"finds the assistant tokens); got {type(tokenizer).__name__}")
    if cfg.chat_template:
        template, fallback = read_chat_template(cfg.chat_template), False
    elif _has_chats(path, cfg):
        template, fallback = resolve_template(tokenizer)
    else:
        template, fallback = "", False
    file = None
    if cache:
        file = os.path.join(cfg.cache_dir or default_cache_dir(), cache_key(path, tokenizer, template, cfg) + ".safetensors")
        if os.path.isfile(file):
            hit = _load_cache(file)
            if hit is not None:
                docs, stats = hit
                stats.path = label
                log.info("loaded %d tokenized documents from cache %s", len(docs), file)
                _check_trainable(label, stats, docs)
                return TokenizedDataset(docs, stats, from_cache=True)
    docs, stats = _tokenize(path, tokenizer, cfg, template, fallback)
    stats.tool_call_turns = sum(p["tool_call_turns"] for p in stats.sources)
    stats.reasoning_turns = sum(p["reasoning_turns"] for p in stats.sources)
    _check_trainable(label, stats, docs)
    if file is not None:
        _save_cache(file, docs, stats)
    return TokenizedDataset(docs, stats)


def _has_chats(path, cfg: DataConfig) -> bool:
    return any(format_of(s["path"], cfg.format, cfg.columns) != "text" for s in source_list(path, cfg))


def _check_trainable(path: str, stats: DataStats, docs: list[dict]) -> None:
    if docs:
        return
    raise DataError(
        f"{path}:0: field '(dataset)': no example has a trainable token (loss_on={stats.loss_on}; "
        f"{stats.examples} examples, {stats.dropped} dropped as too long, {stats.no_trainable} without "
        f"a token carrying loss, {stats.skipped} lines skipped)")
