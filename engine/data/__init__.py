"""Data pipeline: JSONL / Parquet / CSV / Arrow / saved-dataset sources -> conversations -> tokens + shifted labels -> packed/padded batches.

    examples = load_examples(path)                          # formats.py
    dataset  = load_dataset(path, tokenizer, cfg.data)       # render.py + tokenized.py (cached)
    loader   = make_loader(dataset, max_seq_len=..., micro_batch_size=..., packing=True,
                           seed=..., pad_token_id=tokenizer.pad_token_id)   # loader.py
    for batch in loader: ...                                 # forever, reshuffled every epoch
    for batch in loader.epoch_batches(): ...                 # one pass (evaluation)

`python -m engine.data FILE` prints the data report (report.py).
"""

from engine.data.formats import DataError, load_examples
from engine.data.loader import Loader, make_loader, pack_documents
from engine.data.render import CHATML_TEMPLATE, IGNORE_INDEX, read_chat_template
from engine.data.sources import iter_rows, read_rows
from engine.data.tokenized import DataStats, TokenizedDataset, load_dataset

__all__ = ["CHATML_TEMPLATE", "DataError", "DataStats", "IGNORE_INDEX", "Loader", "TokenizedDataset",
           "iter_rows", "load_dataset", "load_examples", "make_loader", "pack_documents", "read_chat_template",
           "read_rows"]
