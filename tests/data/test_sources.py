"""Parquet / CSV / Arrow / save_to_disk sources: same tokens as the JSONL original, column mapping,
mixtures, and file:row: field errors."""

import json
import os

import pytest

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

from engine.config import ConfigError  # noqa: E402
from engine.data import DataError, iter_rows, load_dataset, load_examples  # noqa: E402
from tests.data.test_tools import think_chat, tool_chat  # noqa: E402

ROWS = [tool_chat(), think_chat(),
        {"messages": [{"role": "user", "content": "What is 7?"}, {"role": "assistant", "content": "42"}]},
        {"tools": [{"type": "function", "function": {"name": "lookup", "parameters": {
            "type": "object", "properties": {"q": {"type": "string"}, "n": {"type": "integer"}}}}}],
         "messages": [{"role": "user", "content": "Find fox."},
                      {"role": "assistant", "content": "Looking.", "tool_calls": [
                          {"type": "function", "function": {"name": "lookup", "arguments": {"q": "fox", "n": 2}}}]},
                      {"role": "tool", "content": "fox: a dog-like animal"},
                      {"role": "assistant", "content": "A dog-like animal.", "reasoning_content": "From the tool."}]}]


def write_copies(rows, tmp_path) -> dict:
    """The same rows as JSONL, Parquet, CSV (JSON text in the cells), Arrow file and stream, and a
    two-shard save_to_disk folder."""
    out = {"jsonl": str(tmp_path / "d.jsonl")}
    with open(out["jsonl"], "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    table = pa.Table.from_pylist(rows)
    out["parquet"] = str(tmp_path / "d.parquet")
    pq.write_table(table, out["parquet"], row_group_size=2)
    out["csv"] = str(tmp_path / "d.csv")
    pa.csv.write_csv(pa.Table.from_pylist([{k: json.dumps(v) if not isinstance(v, str) else v
                                            for k, v in r.items()} for r in rows]), out["csv"])
    out["arrow"] = str(tmp_path / "d.arrow")
    with pa.ipc.new_file(out["arrow"], table.schema) as w:
        w.write_table(table)
    out["arrow_stream"] = str(tmp_path / "stream.arrow")
    with pa.ipc.new_stream(out["arrow_stream"], table.schema) as w:
        w.write_table(table, max_chunksize=3)
    datasets = pytest.importorskip("datasets")
    out["saved"] = str(tmp_path / "saved")
    datasets.Dataset.from_list(rows).save_to_disk(out["saved"], num_shards=2)
    return out


import pyarrow.csv  # noqa: E402,F401


@pytest.mark.parametrize("train_on_reasoning", [True, False])
def test_every_copy_tokenizes_byte_identically(tool_tok, cfg, tmp_path, train_on_reasoning):
    copies = write_copies(ROWS, tmp_path)
    assert len(os.listdir(copies["saved"])) >= 4  # two shards + dataset_info.json + state.json
    ref = load_dataset(copies["jsonl"], tool_tok, cfg(train_on_reasoning=train_on_reasoning), cache=False)
    assert ref.stats.tool_call_turns == 2 and ref.stats.reasoning_turns == 2
    for kind, path in copies.items():
        ds = load_dataset(path, tool_tok, cfg(train_on_reasoning=train_on_reasoning), cache=False)
        assert ds.docs == ref.docs, kind
        assert ds.stats.loss_tokens_by_role == ref.stats.loss_tokens_by_role, kind


def test_cache_keys_on_content_not_name(tool_tok, cfg, tmp_path):
    copies = write_copies(ROWS[:3], tmp_path)
    first = load_dataset(copies["parquet"], tool_tok, cfg())
    assert not first.from_cache and load_dataset(copies["parquet"], tool_tok, cfg()).from_cache
    pq.write_table(pa.Table.from_pylist(ROWS[:2]), copies["parquet"])  # same name, new content
    again = load_dataset(copies["parquet"], tool_tok, cfg())
    assert not again.from_cache and len(again.docs) == 2


def test_column_mapping(tok, cfg, tmp_path, trained_text):
    path = str(tmp_path / "qa.parquet")
    pq.write_table(pa.Table.from_pylist([{"question": "Capital of France?", "answer": "Paris.", "id": 1}]), path)
    d = load_dataset(path, tok, cfg(columns={"prompt": "question", "completion": "answer"}), cache=False).docs[0]
    assert trained_text(tok, d) == "Paris.<|im_end|>"
    with pytest.raises(DataError, match=r"qa.parquet:1: field '\(keys\)': cannot tell the format.*data.columns"):
        load_dataset(path, tok, cfg(), cache=False)
    conv = str(tmp_path / "conv.parquet")
    pq.write_table(pa.Table.from_pylist([{"conversation": ROWS[2]["messages"]}]), conv)
    d = load_dataset(conv, tok, cfg(columns={"messages": "conversation"}), cache=False).docs[0]
    assert trained_text(tok, d) == "42<|im_end|>"
    assert next(iter_rows(conv, {"messages": "conversation"}))[1] == {"messages": ROWS[2]["messages"]}


def test_mixture_with_counts_and_shares(tok, cfg, tmp_path, write_jsonl):
    a = str(tmp_path / "a.parquet")
    pq.write_table(pa.Table.from_pylist([{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(5)]), a)
    b = write_jsonl([{"text": f"t{i}"} for i in range(3)], "b.jsonl")
    ds = load_dataset(None, tok, cfg(sources=[{"path": a, "count": 7}, {"path": b, "share": 0.34}]), cache=False)
    assert [(d["source"], d["source_line"]) for d in ds.docs] == [(0, i) for i in (1, 2, 3, 4, 5, 1, 2)] + [(1, 1)]
    assert [s["examples"] for s in ds.stats.sources] == [7, 1] and ds.stats.path == "data.sources"
    ds = load_dataset(None, tok, cfg(sources=[{"path": a, "count": 2}, {"path": b}]), cache=False)
    assert [(d["source"], d["source_line"]) for d in ds.docs] == [(0, 1), (0, 2), (1, 1), (1, 2), (1, 3)]
    with pytest.raises(ConfigError, match=r"'data.sources\[0\]': give count or share"):
        load_dataset(None, tok, cfg(sources=[{"path": a, "count": 1, "share": 1}]), cache=False)
    with pytest.raises(ConfigError, match=r"'data.sources\[1\].path'"):
        load_dataset(None, tok, cfg(sources=[{"path": a}, {"path": "missing.parquet"}]), cache=False)


def test_bad_rows_name_file_row_and_field(tmp_path):
    rows = [ROWS[2], ROWS[2], {"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "x"}]}]
    copies = write_copies(rows, tmp_path)
    for kind, path in copies.items():
        with pytest.raises(DataError, match=rf"^{path}:3: field 'messages\[1\]\.role': unknown role 'robot'"):
            load_examples(path)
        skipped = []
        assert len(load_examples(path, on_bad_line="skip", skipped=skipped)) == 2 and skipped == [3], kind
    csv = tmp_path / "bad.csv"
    csv.write_text('messages\n"[{""role"": ""user"", ""content"": ""q""}]"\n"[{""role"": ""user"", oops"\n')
    with pytest.raises(DataError, match=rf"^{csv}:2: field 'messages': holds text that is not valid JSON"):
        load_examples(str(csv))
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "x"}]).slice(0, 0), empty)
    with pytest.raises(DataError, match=r"file is empty \(no rows\)"):
        load_examples(str(empty))
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=rf"^{junk}:0: field '\(file\)': not a readable parquet file"):
        load_examples(str(junk))
    (tmp_path / "nostate").mkdir()
    with pytest.raises(DataError, match="not a datasets save_to_disk folder"):
        load_examples(str(tmp_path / "nostate"))


def test_csv_cells_stay_text(tok, cfg, tmp_path, trained_text):
    path = tmp_path / "pc.csv"
    path.write_text("prompt,completion\nHow many?,42\nEmpty?,\n")
    ex = load_examples(str(path))
    assert ex[0]["messages"][1]["content"] == "42" and ex[1]["messages"][1]["content"] == ""


def test_preference_pairs_from_parquet(tmp_path):
    from engine.preference.data import is_pair_file, load_pairs

    path = str(tmp_path / "pairs.parquet")
    pq.write_table(pa.Table.from_pylist([{"prompt": "q", "chosen": "good", "rejected": "bad"},
                                         {"prompt": "q", "chosen": "same", "rejected": "same"}]), path)
    assert is_pair_file(path)
    with pytest.raises(DataError, match=rf"^{path}:2: field 'rejected': is identical to chosen"):
        load_pairs(path)


def test_sources_and_columns_from_the_command_line(tmp_path):
    """Hydra overrides: data.sources replaces the default train_path; data.columns is a mapping."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from engine.config import CONF_DIR, from_dict, register_configs

    a = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist([{"q": "x", "a": "y"}]), a)
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        dcfg = compose(config_name="config", overrides=[f"data.sources=[{{path: {a}, count: 5}}]",
                                                        "data.columns={prompt: q, completion: a}"])
    cfg = from_dict(OmegaConf.to_container(dcfg, resolve=True)).validate()
    assert cfg.data.sources == [{"path": str(a), "count": 5}] and cfg.data.columns == {"prompt": "q", "completion": "a"}
    from engine.data.tokenized import source_list

    assert source_list(cfg.data.train_path, cfg.data) == [{"path": str(a), "count": 5}]
    assert source_list(cfg.data.eval_path, cfg.data) == [{"path": cfg.data.eval_path}]


def test_sequence_of_dicts_stored_as_a_struct_of_lists(tool_tok, cfg, tmp_path):
    """`datasets`' Sequence({"role", "content"}) is Arrow struct<role: list, content: list>."""
    msgs = ROWS[2]["messages"]
    path = str(tmp_path / "seq.parquet")
    pq.write_table(pa.Table.from_pylist([{"messages": {"role": [m["role"] for m in msgs],
                                                       "content": [m["content"] for m in msgs]}}]), path)
    jsonl = tmp_path / "seq.jsonl"
    jsonl.write_text(json.dumps(ROWS[2]) + "\n")
    assert load_dataset(path, tool_tok, cfg(), cache=False).docs == load_dataset(str(jsonl), tool_tok, cfg(),
                                                                                 cache=False).docs
