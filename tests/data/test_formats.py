"""JSONL formats -> examples, and every bad-input path's one-line message."""

import json

import pytest

from engine.data import DataError, load_examples


def test_chat_and_sharegpt(write_jsonl):
    path = write_jsonl([
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q2"},
                           {"from": "gpt", "value": "a2"}]},
    ])
    ex = load_examples(path)
    assert ex[0]["messages"] == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert ex[1]["messages"] == [{"role": "system", "content": "s"}, {"role": "user", "content": "q2"},
                                 {"role": "assistant", "content": "a2"}]
    assert [e["source_line"] for e in ex] == [1, 2]


def test_messages_per_line_grouping(write_jsonl):
    rows = [("system", "s1"), ("user", "u1"), ("assistant", "a1"), ("user", "u2"), ("assistant", "a2"),
            ("user", "u3"), ("assistant", "a3"), ("system", "s2"), ("assistant", "a4"), ("system", "s3"),
            ("user", "u5"), ("user", "u6"), ("assistant", "a5")]
    path = write_jsonl([{"role": r, "content": c} for r, c in rows[:3]] + [""] +  # a blank line is ignored
                       [{"role": r, "content": c} for r, c in rows[3:]])
    ex = load_examples(path)
    # new conversation at a system line, or at a user line after an assistant line
    assert [[m["content"] for m in e["messages"]] for e in ex] == [
        ["s1", "u1", "a1"], ["u2", "a2"], ["u3", "a3"], ["s2", "a4"], ["s3", "u5", "u6", "a5"]]
    assert [e["source_line"] for e in ex] == [1, 5, 7, 9, 11]
    assert ex[0]["message_lines"] == [1, 2, 3]


def test_seed_files_are_17_conversations(seed_file):
    ex = load_examples(seed_file)
    assert len(ex) == 17
    for i, e in enumerate(ex):
        assert [m["role"] for m in e["messages"]] == ["system", "user", "assistant"]
        assert e["source_line"] == 3 * i + 1 and e["message_lines"] == [3 * i + 1, 3 * i + 2, 3 * i + 3]


def test_prompt_completion_alpaca_text(write_jsonl):
    pc = load_examples(write_jsonl([{"prompt": "p", "completion": "c"}], "pc.jsonl"))
    assert pc[0]["messages"] == [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]
    al = load_examples(write_jsonl([{"instruction": "i", "input": "x", "output": "o"},
                                    {"instruction": "j", "output": "p"},
                                    {"instruction": "k", "input": "", "output": "q"}], "al.jsonl"))
    assert [e["messages"][0]["content"] for e in al] == ["i\n\nx", "j", "k"]
    assert [e["messages"][1] for e in al] == [{"role": "assistant", "content": c} for c in "opq"]
    tx = load_examples(write_jsonl([{"text": "hello"}], "t.jsonl"))
    assert tx == [{"text": "hello", "source_line": 1}]


def test_named_format_overrides_detection(write_jsonl):
    path = write_jsonl([{"text": "t", "prompt": "p", "completion": "c"}])
    assert "messages" in load_examples(path)[0]                  # auto: prompt/completion wins
    assert load_examples(path, fmt="text")[0]["text"] == "t"


BAD = [
    # (rows, line, field, words in the reason)
    ([{"text": "a"}, "{not json"], 2, "(line)", "not valid JSON"),
    ([{"text": "a"}, "[1, 2]"], 2, "(line)", "JSON object"),
    ([{"text": "a"}, {"txt": "b"}], 2, "text", "missing"),
    ([{"text": "a"}, {"text": 3}], 2, "text", "must be a string"),
    ([{"role": "system", "content": "s"}, {"role": "robot", "content": "x"}], 2, "role", "unknown role 'robot'"),
    ([{"role": "user", "content": "s"}, {"role": "assistant", "content": None}], 2, "content", "missing or null"),
    ([{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}], 1, "messages[1].role",
     "unknown role"),
    ([{"messages": [{"role": "user"}]}], 1, "messages[0].content", "missing"),
    ([{"messages": []}], 1, "messages", "non-empty list"),
    ([{"conversations": [{"from": "alien", "value": "x"}]}], 1, "conversations[0].from", "unknown role"),
    ([{"prompt": "p", "completion": 5}], 1, "completion", "must be a string"),
    ([{"instruction": "i", "output": "o"}, {"instruction": "i"}], 2, "output", "missing"),
    ([{"foo": 1}], 1, "(keys)", "cannot tell the format"),
    ([{"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}, {"type": "image_url", "image_url": {}}]}]}],
     1, "messages[0].content[1]", "content part of type 'image_url': only text parts"),
    ([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None,
                                                      "tool_calls": [{"type": "function"}]}]}],
     1, "messages[1].tool_calls[0].name", "missing or not a non-empty string"),
]


@pytest.mark.parametrize("rows,line,field,why", BAD)
def test_bad_line_message_names_file_line_field(write_jsonl, rows, line, field, why):
    path = write_jsonl(rows)
    with pytest.raises(DataError) as e:
        load_examples(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:{line}: field '{field}': ") and why in msg and " — " in msg
    assert "\n" not in msg


def test_empty_file_and_blank_file(tmp_path):
    for name, content in (("empty.jsonl", ""), ("blank.jsonl", "\n  \n")):
        path = tmp_path / name
        path.write_text(content)
        with pytest.raises(DataError, match=rf"^{path}:0: field '\(file\)': file is empty"):
            load_examples(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_examples(str(tmp_path / "nope.jsonl"))


def test_non_utf8_line(tmp_path):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: field '\(line\)': not valid UTF-8"):
        load_examples(str(path))


def test_non_utf8_first_line_is_named_when_detecting_the_format(tmp_path):
    from engine.data.formats import format_of

    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"^{path}:1: field '\(line\)': not valid UTF-8"):
        format_of(str(path))


def test_utf8_byte_order_mark_is_dropped_at_the_start_only(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n{"text": "b"}\n')
    assert [e["text"] for e in load_examples(str(path))] == ["a", "b"]
    path.write_bytes(b'{"text": "a"}\n\xef\xbb\xbf{"text": "b"}\n')  # mid-file: not a BOM, a bad line
    with pytest.raises(DataError, match=rf"^{path}:2: field '\(line\)': not valid JSON"):
        load_examples(str(path))


def test_openai_text_content_parts_are_joined(write_jsonl):
    path = write_jsonl([{"messages": [{"role": "user", "content": [{"type": "text", "text": "a "},
                                                                    {"type": "text", "text": "b"}]},
                                      {"role": "assistant", "content": [{"type": "text", "text": "c"}]}]}])
    assert [m["content"] for m in load_examples(path)[0]["messages"]] == ["a b", "c"]


def test_long_line_excerpt_is_short(write_jsonl):
    path = write_jsonl([{"text": "a"}, "{" + "x" * 5000])
    msg = str(pytest.raises(DataError, load_examples, path).value)
    assert len(msg) < len(path) + 200


def test_skip_counts_and_lists_lines(write_jsonl):
    path = write_jsonl(["garbage", {"text": "a"}, {"text": 1}, {"text": "b"}, "{"])
    skipped = []
    ex = load_examples(path, on_bad_line="skip", skipped=skipped)
    assert [e["text"] for e in ex] == ["a", "b"] and [e["source_line"] for e in ex] == [2, 4]
    assert skipped == [1, 3, 5]


def test_all_lines_skipped_is_an_error(write_jsonl):
    path = write_jsonl(["x", "y"])
    with pytest.raises(DataError, match=r"every line was malformed and skipped \(lines 1, 2\)"):
        load_examples(path, on_bad_line="skip")


def test_bad_option_values(write_jsonl):
    path = write_jsonl([{"text": "a"}])
    with pytest.raises(DataError, match="field 'format'"):
        load_examples(path, fmt="csv")
    with pytest.raises(DataError, match="field 'on_bad_line'"):
        load_examples(path, on_bad_line="ignore")


def test_examples_are_json_serialisable(seed_file):
    ex = load_examples(seed_file)
    json.dumps(ex)
