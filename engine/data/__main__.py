"""`python -m engine.data FILE [FILE ...]`: the data report (see engine/data/report.py; preference
pairs: engine/preference/data.py).

Bad input prints one line on stderr (file, line, field, why) and exits with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from engine.config import ConfigError, DataConfig
from engine.data.formats import DataError, load_examples
from engine.data.report import format_report
from engine.data.tokenized import load_dataset
from engine.model.build import load_tokenizer
from engine.preference.data import format_pair_report, is_pair_file, load_pair_dataset, load_pairs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.data", description="Report on training data.")
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="JSONL, .parquet, .csv or .arrow file(s), or datasets save_to_disk folder(s)")
    p.add_argument("--tokenizer", default="default",
                   help="HF model/tokenizer directory, a .gguf file, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--max-seq-len", type=int, default=DataConfig.max_seq_len)
    p.add_argument("--format", default="auto")
    p.add_argument("--loss-on", default="assistant")
    p.add_argument("--length-policy", default="truncate")
    p.add_argument("--on-bad-line", default="error")
    p.add_argument("--columns", default=None, help='column mapping as JSON, e.g. \'{"messages": "conversation"}\'')
    p.add_argument("--chat-template", default=None, help="a Jinja chat-template file to render with")
    p.add_argument("--no-train-on-reasoning", dest="train_on_reasoning", action="store_false",
                   help="reasoning traces are context only (data.train_on_reasoning=false)")
    p.add_argument("--cache", action="store_true", help="use (and fill) the tokenized-data cache")
    args = p.parse_args(argv)


    try:
        try:
            columns = json.loads(args.columns) if args.columns else None
        except json.JSONDecodeError as e:
            raise ConfigError(f"--columns: not valid JSON ({e})") from None
        cfg = DataConfig(train_path=args.paths[0], format=args.format, max_seq_len=args.max_seq_len,
                         loss_on=args.loss_on, length_policy=args.length_policy, on_bad_line=args.on_bad_line,
                         columns=columns, chat_template=args.chat_template,
                         train_on_reasoning=args.train_on_reasoning)
        for path in args.paths:  # fail fast on bad files, before loading a tokenizer
            dataclasses.replace(cfg, train_path=path).validate()
            if is_pair_file(path, cfg.columns):  # preference pairs (engine/preference/data.py)
                load_pairs(path, cfg.on_bad_line, columns=cfg.columns)
            else:
                load_examples(path, cfg.format, cfg.on_bad_line, columns=cfg.columns)
        tokenizer = _load_tokenizer(args.tokenizer)

        for i, path in enumerate(args.paths):
            if is_pair_file(path, cfg.columns):
                ds = load_pair_dataset(path, tokenizer, dataclasses.replace(cfg, train_path=path), cache=args.cache)
                print(("\n" if i else "") + format_pair_report(ds.stats, cfg.length_policy, args.tokenizer))
                continue
            ds = load_dataset(path, tokenizer, dataclasses.replace(cfg, train_path=path), cache=args.cache)
            examples = load_examples(path, cfg.format, cfg.on_bad_line, columns=cfg.columns)
            print(("\n" if i else "") + format_report(ds.stats, examples, args.tokenizer, cfg.length_policy))
    except (DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _load_tokenizer(spec: str):
    """'default' / a .gguf file / a model directory (engine.model.build.load_tokenizer), or a directory
    holding only tokenizer files (tokenizer.json + tokenizer_config.json)."""
    try:
        if os.path.isdir(spec) and not os.path.exists(os.path.join(spec, "config.json")):
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(spec)

        return load_tokenizer(spec)
    except Exception as e:  # missing path, missing package, unreadable files: one line, no traceback
        raise ConfigError(f"--tokenizer {spec!r}: cannot load ({type(e).__name__}: {e})") from None


if __name__ == "__main__":
    sys.exit(main())
