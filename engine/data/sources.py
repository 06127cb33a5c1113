"""Any data file -> rows: `(row number, dict)` in file order, whatever the file's format.

| source                     | read with                                   | row number                     |
|----------------------------|---------------------------------------------|--------------------------------|
| `.jsonl` / `.json` (lines) | line by line (json)                         | the 1-based line               |
| `.parquet`                 | pyarrow, one record batch at a time         | 1-based row                    |
| `.csv`                     | pyarrow's streaming CSV reader, every column as a string; a cell holding a JSON list or object (messages, tools, ...) is decoded where a list is expected (formats.py) | 1-based data row (the header is not a row) |
| `.arrow` / `.feather` / `.ipc` | pyarrow IPC, file or stream layout (told apart by the file's magic bytes) | 1-based row |
| a folder                   | a Hugging Face `datasets` `save_to_disk` folder: its `state.json` names the shards (`data-0000i-of-0000n.arrow`, IPC stream layout), read in that order | 1-based row over all shards |

Columnar files are read one record batch at a time, so a file larger than memory streams into
the tokenizer. pyarrow is the optional extra `engine[datasets]`; a JSONL source never needs it.

`data.columns` maps our field names onto a file's (`{messages: conversation, prompt: question}`):
`rename_columns` applies it to every row. Rows from Arrow structs carry `None` for the fields a
struct's other rows have (a user message gets `tool_calls: None`): `drop_nulls` removes null
values inside objects for every source alike, so a Parquet copy of a JSONL file reads back equal.

    for n, row in iter_rows("data.parquet", columns={"messages": "conversation"}):
        ...   # n: 1-based row, row: a dict; an unparseable JSONL line raises DataError

`parsed_rows(path, parse, on_bad_line=...)` (a generator; `read_rows`: the list) is the reader
the SFT examples (formats.py), the preference pairs (engine/preference/data.py) and prompt-only
data use: `parse(n, row)` per row, a `_BadLine` becomes a `file:row: field` DataError or a
counted skip.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Iterator, TypeVar

from engine.data.errors import DataError, _BadLine, data_error, decode_lines, parse_object, short_list

T = TypeVar("T")

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv", ".tsv")
ARROW_SUFFIXES = (".arrow", ".feather", ".ipc")
BATCH_ROWS = 1024
"""Rows per record batch read from a columnar file."""


def source_kind(path: str) -> str:
    """jsonl | parquet | csv | arrow | saved (a save_to_disk folder); DataError for anything else."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "state.json")):
            return "saved"
        if os.path.isfile(os.path.join(path, "dataset_dict.json")):
            splits = json.load(open(os.path.join(path, "dataset_dict.json"))).get("splits", [])
            raise DataError(f"{path}:0: field '(file)': a DatasetDict folder (splits {', '.join(splits)}): "
                            f"name one split's folder, e.g. {os.path.join(path, (splits or ['train'])[0])}")
        raise DataError(f"{path}:0: field '(file)': a folder without state.json (not a datasets save_to_disk folder)")
    if not os.path.isfile(path):
        raise DataError(f"{path}:0: field '(file)': does not exist")
    low = path.lower()
    for kind, suffixes in (("parquet", PARQUET_SUFFIXES), ("csv", CSV_SUFFIXES), ("arrow", ARROW_SUFFIXES)):
        if low.endswith(suffixes):
            return kind
    return "jsonl"  # .jsonl, .json and any other name: JSON lines, as before


def source_files(path: str) -> list[str]:
    """The data files a source reads, in order (a save_to_disk folder: its shards per state.json)."""
    if source_kind(path) != "saved":
        return [path]
    try:
        with open(os.path.join(path, "state.json"), encoding="utf-8") as f:
            shards = [d["filename"] for d in json.load(f)["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}/state.json:0: field '_data_files': cannot read the shard list ({e})") from None
    files = [os.path.join(path, s) for s in shards]
    for f in files:
        if not os.path.isfile(f):
            raise DataError(f"{f}:0: field '(file)': shard named in state.json does not exist")
    return files


def source_fingerprint(path: str) -> str:
    """sha256 of the content of every file the source reads (and its kind): the cache key part."""
    h = hashlib.sha256(source_kind(path).encode())
    for file in source_files(path):
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


# ------------------------------------------------------------------------------------- rows
def drop_nulls(value: Any) -> Any:
    """Objects without their null-valued keys, recursively (list items stay, nulls included)."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def rename_columns(row: dict, columns: dict[str, str] | None) -> dict:
    """`columns` = {ours: theirs}: the row with each `theirs` key renamed to `ours`."""
    if not columns:
        return row
    out = {k: v for k, v in row.items() if k not in columns.values()}
    for ours, theirs in columns.items():
        if theirs in row:
            out[ours] = row[theirs]
    return out


def _pyarrow(path: str):
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise DataError(f"{path}:0: field '(file)': reading this format needs pyarrow: "
                        "pip install 'engine[datasets]' (or pip install pyarrow)") from None


def _record_batches(path: str, kind: str) -> Iterator[Any]:
    """pyarrow RecordBatches of one columnar file, BATCH_ROWS rows or fewer at a time."""
    _pyarrow(path)
    import pyarrow as pa

    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            yield from pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS)
        elif kind == "csv":
            yield from _csv_batches(path)
        else:  # Arrow IPC: the file layout starts with b"ARROW1", the stream layout does not
            with open(path, "rb") as f:
                magic = f.read(6)
            source = pa.memory_map(path)
            if magic == b"ARROW1":
                reader = pa.ipc.open_file(source)
                for i in range(reader.num_record_batches):
                    yield from _split(reader.get_batch(i))
            else:
                for batch in pa.ipc.open_stream(source):
                    yield from _split(batch)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as e:
        raise DataError(f"{path}:0: field '(file)': not a readable {kind} file ({e})") from None


def _split(batch) -> Iterator[Any]:
    for start in range(0, batch.num_rows, BATCH_ROWS):
        yield batch.slice(start, BATCH_ROWS)


def _csv_batches(path: str) -> Iterator[Any]:
    """Every column read as a string (a reply "42" stays the text "42"; an empty cell is "")."""
    import csv

    import pyarrow as pa
    import pyarrow.csv as pcsv

    delimiter = "\t" if path.lower().endswith(".tsv") else ","
    with open(path, encoding="utf-8-sig", newline="") as f:
        header = next(csv.reader(f, delimiter=delimiter), None)
    if not header:
        raise DataError(f"{path}:0: field '(file)': file is empty (no header row)")
    yield from pcsv.open_csv(
        path, read_options=pcsv.ReadOptions(block_size=1 << 24),  # a row must fit in one block
        parse_options=pcsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
        convert_options=pcsv.ConvertOptions(column_types={name: pa.string() for name in header},
                                            strings_can_be_null=False))


def _raw_rows(path: str) -> Iterator[tuple[int, dict | _BadLine]]:
    """(row number, dict or the _BadLine saying why the row is not one) for every row of a source."""
    kind = source_kind(path)
    if kind == "jsonl":
        with open(path, "rb") as f:
            for lineno, raw in enumerate(decode_lines(path, f), start=1):
                if not raw.strip():
                    continue
                try:
                    yield lineno, parse_object(raw)
                except _BadLine as bad:
                    yield lineno, bad
        return
    n = 0
    for file in source_files(path):
        for batch in _record_batches(file, "arrow" if kind == "saved" else kind):
            for row in batch.to_pylist():
                n += 1
                yield n, row


def iter_rows(path: str, columns: dict[str, str] | None = None) -> Iterator[tuple[int, dict]]:
    """(1-based row number, row dict) of every row of any source (module docstring), columns
    renamed per `columns` ({ours: theirs}) and null values inside objects dropped. A JSONL line
    that is not a JSON object raises DataError naming the file, line and why. For any reader
    of rows (SFT, preference pairs, GRPO prompts)."""
    for n, row in _raw_rows(path):
        if isinstance(row, _BadLine):
            raise data_error(path, n, row.field, row.why, row.value)
        yield n, rename_columns(drop_nulls(row), columns)


def parsed_rows(path: str, parse: Callable[[int, dict], T], *, on_bad_line: str = "error",
                skipped: list[int] | None = None, columns: dict[str, str] | None = None) -> Iterator[T]:
    """`parse(n, row)` of every row of `path` (iter_rows), in order, as they are read (a columnar
    file one record batch at a time: it need not fit in memory). A row that is not a JSON
    object, or whose parse raises _BadLine, is a DataError naming the file, row and field
    (on_bad_line="error") or is left out with its number appended to `skipped` ("skip"). A missing
    file, an empty one, and one with nothing parsed, are DataErrors too (raised at the end)."""
    if on_bad_line not in ("error", "skip"):
        raise DataError(f"{path}:0: field 'on_bad_line': must be 'error' or 'skip' — {on_bad_line!r}")
    skipped = skipped if skipped is not None else []
    parsed = rows = 0
    for n, row in _raw_rows(path):
        rows += 1
        try:
            if isinstance(row, _BadLine):
                raise row
            out = parse(n, rename_columns(drop_nulls(row), columns))
        except _BadLine as bad:
            if on_bad_line == "error":
                raise data_error(path, n, bad.field, bad.why, bad.value) from None
            skipped.append(n)
            continue
        parsed += 1
        yield out
    unit = "line" if source_kind(path) == "jsonl" else "row"
    if rows == 0:
        raise DataError(f"{path}:0: field '(file)': file is empty (no {'JSON lines' if unit == 'line' else 'rows'})")
    if not parsed:
        raise DataError(f"{path}:0: field '(file)': every {unit} was malformed and skipped ({unit}s {short_list(skipped)})")


def read_rows(path: str, parse: Callable[[int, dict], T], *, on_bad_line: str = "error",
              skipped: list[int] | None = None, columns: dict[str, str] | None = None) -> list[T]:
    """parsed_rows as a list."""
    return list(parsed_rows(path, parse, on_bad_line=on_bad_line, skipped=skipped, columns=columns))


def good_rows(path: str, columns: dict[str, str] | None = None) -> Iterator[dict]:
    """The rows of a source that are JSON objects (a malformed JSONL line is passed over)."""
    for _, row in _raw_rows(path):
        if not isinstance(row, _BadLine):
            yield rename_columns(drop_nulls(row), columns)
