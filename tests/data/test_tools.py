"""Tool calls, reasoning traces and per-message loss flags: exactly which tokens carry loss."""

import json

import pytest

from engine.data import DataError, load_dataset
from tests.data.conftest import CHATML

IM_END = "<|im_end|>"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def _call(name="get_weather", args=None, as_text=False):
    args = {"city": "Paris"} if args is None else args
    return {"type": "function", "id": "c1", "function": {"name": name, "arguments": json.dumps(args) if as_text else args}}


def tool_chat(as_text=False):
    return {"tools": TOOLS, "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [_call(as_text=as_text)]},
        {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "sunny, 21 C"},
        {"role": "assistant", "content": "It is sunny."}]}


CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_tool_call_mask_is_exactly_the_assistant_turns(tool_tok, write_jsonl, cfg, trained_text):
    ds = load_dataset(write_jsonl([tool_chat()]), tool_tok, cfg(), cache=False)
    d = ds.docs[0]
    assert trained_text(tool_tok, d) == f"{CALL_TEXT}{IM_END}It is sunny.{IM_END}"
    text = tool_tok.decode(d["input_ids"])
    assert '"description": "Weather now"' in text and "sunny, 21 C" in text  # schema and result are context
    assert ds.stats.tool_call_turns == 1
    roles = ds.stats.loss_tokens_by_role
    assert set(roles) == {"assistant"} and roles["assistant"] == ds.stats.loss_tokens


def test_arguments_as_json_text_render_like_objects(tool_tok, write_jsonl, cfg):
    a = load_dataset(write_jsonl([tool_chat()], "obj.jsonl"), tool_tok, cfg(), cache=False).docs
    b = load_dataset(write_jsonl([tool_chat(as_text=True)], "txt.jsonl"), tool_tok, cfg(), cache=False).docs
    assert a == b


def test_loss_on_all_counts_every_role(tool_tok, write_jsonl, cfg):
    ds = load_dataset(write_jsonl([tool_chat()]), tool_tok, cfg(loss_on="all"), cache=False)
    roles = ds.stats.loss_tokens_by_role
    assert {"system", "user", "assistant", "tool"} <= set(roles)
    assert sum(roles.values()) == ds.stats.loss_tokens


def test_template_without_tools_is_refused_with_the_line_and_a_hint(tool_tok, write_jsonl, cfg, tmp_path, trained_text):
    tool_tok.chat_template = CHATML  # SmolLM2's kind: plain ChatML, tool calls silently dropped
    path = write_jsonl([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
                        tool_chat()])
    with pytest.raises(DataError, match=rf"^{path}:2: field 'messages\[2\]\.tool_calls': the chat template cannot "
                                        r"render tool calls.*data\.chat_template="):
        load_dataset(path, tool_tok, cfg(), cache=False)
    no_calls = tool_chat()
    no_calls["messages"] = no_calls["messages"][:2] + no_calls["messages"][-1:]
    with pytest.raises(DataError, match=r":1: field 'tools': the chat template cannot render tool schemas"):
        load_dataset(write_jsonl([no_calls], "schemas.jsonl"), tool_tok, cfg(), cache=False)
    # data.chat_template replaces the tokenizer's template
    from tests.data.conftest import CHATML_TOOLS

    template = tmp_path / "tools.jinja"
    template.write_text(CHATML_TOOLS)
    d = load_dataset(path, tool_tok, cfg(chat_template=str(template)), cache=False).docs[1]
    assert trained_text(tool_tok, d) == f"{CALL_TEXT}{IM_END}It is sunny.{IM_END}"


def test_bad_tool_calls_name_the_field(tool_tok, write_jsonl):
    from engine.data import load_examples

    bad = tool_chat()
    bad["messages"][2]["tool_calls"] = [{"type": "function", "function": {"name": "f", "arguments": "{not json"}}]
    path = write_jsonl([tool_chat(), bad])
    with pytest.raises(DataError, match=rf"^{path}:2: field 'messages\[2\]\.tool_calls\[0\]\.function\.arguments': "
                                        "is a string but not valid JSON"):
        load_examples(path)
    bad["messages"][2]["tool_calls"] = [{"type": "function", "function": {"arguments": {}}}]
    with pytest.raises(DataError, match=r"field 'messages\[2\]\.tool_calls\[0\]\.function\.name'"):
        load_examples(write_jsonl([bad], "b.jsonl"))
    bad = tool_chat()
    bad["messages"][1]["tool_calls"] = [_call()]
    with pytest.raises(DataError, match=r"field 'messages\[1\]\.tool_calls': only assistant messages call tools"):
        load_examples(write_jsonl([bad], "c.jsonl"))
    bad = tool_chat()
    bad["tools"] = [{"type": "function", "function": {"description": "no name"}}]
    with pytest.raises(DataError, match=r"field 'tools\[0\]\.function\.name'"):
        load_examples(write_jsonl([bad], "d.jsonl"))


def test_sharegpt_function_call_and_observation(tool_tok, write_jsonl, cfg, trained_text):
    row = {"tools": json.dumps(TOOLS), "conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": "sunny, 21 C"}, {"from": "gpt", "value": "It is sunny."}]}
    d = load_dataset(write_jsonl([row]), tool_tok, cfg(), cache=False).docs[0]
    assert trained_text(tool_tok, d) == f"{CALL_TEXT}{IM_END}It is sunny.{IM_END}"


# ----------------------------------------------------------------------------- reasoning
def think_chat(inline=False):
    answer = {"role": "assistant", "content": "The answer is 4.", "reasoning_content": "Add two and two."}
    if inline:
        answer = {"role": "assistant", "content": "<think>\nAdd two and two.\n</think>\n\nThe answer is 4."}
    return {"messages": [{"role": "user", "content": "2+2?"}, answer]}


@pytest.mark.parametrize("field", ["reasoning_content", "thinking"])
def test_reasoning_masks_per_train_on_reasoning(think_tok, write_jsonl, cfg, trained_text, field):
    row = think_chat()
    row["messages"][1][field] = row["messages"][1].pop("reasoning_content")
    path = write_jsonl([row])
    on = load_dataset(path, think_tok, cfg(), cache=False)
    assert trained_text(think_tok, on.docs[0]) == f"<think>\nAdd two and two.\n</think>\n\nThe answer is 4.{IM_END}"
    assert on.stats.reasoning_turns == 1 and on.stats.loss_tokens_by_role["reasoning"] > 0
    off = load_dataset(path, think_tok, cfg(train_on_reasoning=False), cache=False)
    assert trained_text(think_tok, off.docs[0]) == f"\n\nThe answer is 4.{IM_END}"
    assert "Add two and two." in think_tok.decode(off.docs[0]["input_ids"])  # context, not target
    assert "reasoning" not in off.stats.loss_tokens_by_role


def test_inline_think_block_equals_the_reasoning_field(think_tok, write_jsonl, cfg):
    for train in (True, False):
        a = load_dataset(write_jsonl([think_chat()], "f.jsonl"), think_tok, cfg(train_on_reasoning=train), cache=False)
        b = load_dataset(write_jsonl([think_chat(inline=True)], "i.jsonl"), think_tok,
                         cfg(train_on_reasoning=train), cache=False)
        assert a.docs == b.docs


def test_earlier_turns_whose_trace_the_template_drops(think_tok, write_jsonl, cfg, trained_text):
    row = {"messages": [{"role": "user", "content": "q1"},
                        {"role": "assistant", "content": "First.", "reasoning_content": "Think one."},
                        {"role": "user", "content": "q2"},
                        {"role": "assistant", "content": "Second.", "reasoning_content": "Think two."}]}
    d = load_dataset(write_jsonl([row]), think_tok, cfg(), cache=False).docs[0]
    assert "Think one." not in think_tok.decode(d["input_ids"])
    assert trained_text(think_tok, d) == f"First.{IM_END}<think>\nThink two.\n</think>\n\nSecond.{IM_END}"


def test_template_without_reasoning_gets_an_inline_think_block(tok, write_jsonl, cfg, trained_text):
    path = write_jsonl([think_chat()])
    on = load_dataset(path, tok, cfg(), cache=False).docs[0]
    assert trained_text(tok, on) == f"<think>\nAdd two and two.\n</think>\n\nThe answer is 4.{IM_END}"
    off = load_dataset(path, tok, cfg(train_on_reasoning=False), cache=False).docs[0]
    assert trained_text(tok, off).endswith(f"The answer is 4.{IM_END}") and "Add" not in trained_text(tok, off)


# ----------------------------------------------------------------------------- per-message flags
def _turns(*pairs):
    return {"messages": [dict(m) for m in pairs]}


def test_per_message_train_flags(tok, write_jsonl, cfg, trained_text):
    row = _turns({"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1", "train": False},
                 {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"})
    d = load_dataset(write_jsonl([row]), tok, cfg(), cache=False).docs[0]
    assert trained_text(tok, d) == f"a2{IM_END}"
    row = _turns({"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1", "weight": 1},
                 {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"})
    d = load_dataset(write_jsonl([row], "w.jsonl"), tok, cfg(loss_on="last_assistant"), cache=False).docs[0]
    assert trained_text(tok, d) == f"a1{IM_END}a2{IM_END}"
    row = _turns({"role": "user", "content": "q1", "train": True}, {"role": "assistant", "content": "a1"})
    ds = load_dataset(write_jsonl([row], "u.jsonl"), tok, cfg(), cache=False)
    # the user turn from its header on (its first token, the document's first, is never a target)
    assert trained_text(tok, ds.docs[0]) == f"user\nq1{IM_END}a1{IM_END}"
    assert ds.stats.loss_tokens_by_role["user"] > 0
    row = _turns({"role": "user", "content": "q1", "train": False}, {"role": "assistant", "content": "a1"})
    d = load_dataset(write_jsonl([row], "a.jsonl"), tok, cfg(loss_on="all"), cache=False).docs[0]
    assert trained_text(tok, d) == f"\n<|im_start|>assistant\na1{IM_END}\n"  # all but the user's turn


@pytest.mark.parametrize("flag,why", [({"train": "yes"}, "must be true or false"), ({"weight": 0.5}, "must be 0 or 1")])
def test_bad_flags_name_the_field(write_jsonl, flag, why):
    from engine.data import load_examples

    path = write_jsonl([_turns({"role": "user", "content": "q"}, {"role": "assistant", "content": "a", **flag})])
    with pytest.raises(DataError, match=rf"^{path}:1: field 'messages\[1\]\.{next(iter(flag))}': {why}"):
        load_examples(path)


# ----------------------------------------------------------------------------- real templates
def _trl_template(name: str) -> str:
    import os

    trl = pytest.importorskip("trl")
    path = os.path.join(os.path.dirname(trl.__file__), "chat_templates", f"{name}.jinja")
    if not os.path.isfile(path):
        pytest.skip(f"trl ships no {name}.jinja")
    with open(path, encoding="utf-8") as f:
        return f.read()


def test_qwen2_5_tool_mask_matches_the_generation_markers(tool_tok, write_jsonl, cfg, trained_text):
    """Qwen2.5's real template; the oracle is TRL's copy with {% generation %} markers (our span
    finder needs none). Equal up to the newlines around the turns, which TRL's markers include."""
    tool_tok.chat_template = _trl_template("qwen2_5")
    d = load_dataset(write_jsonl([tool_chat()]), tool_tok, cfg(), cache=False).docs[0]
    ours = trained_text(tool_tok, d)
    row = tool_chat()
    row["messages"][2]["content"] = ""
    out = tool_tok.apply_chat_template(row["messages"], tools=row["tools"], chat_template=_trl_template("qwen2_5_training"),
                                       tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    theirs = tool_tok.decode([t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m])
    assert ours == f"{CALL_TEXT}{IM_END}It is sunny.{IM_END}"
    assert ours.replace("\n", "") == theirs.replace("\n", "")


def test_qwen3_real_template_tools_and_reasoning(think_tok, write_jsonl, cfg, trained_text):
    think_tok.chat_template = _trl_template("qwen3")
    row = tool_chat()
    row["messages"][-1]["reasoning_content"] = "The tool says sunny."
    d = load_dataset(write_jsonl([row]), think_tok, cfg(), cache=False).docs[0]
    assert trained_text(think_tok, d) == (f"{CALL_TEXT}{IM_END}<think>\nThe tool says sunny.\n</think>\n\n"
                                          f"It is sunny.{IM_END}")
    d = load_dataset(write_jsonl([row], "off.jsonl"), think_tok, cfg(train_on_reasoning=False), cache=False).docs[0]
    assert trained_text(think_tok, d) == f"{CALL_TEXT}{IM_END}\n\nIt is sunny.{IM_END}"
