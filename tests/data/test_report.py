"""The data report and `python -m engine.data`: output, degenerate-sample detection, error exits."""

import os
import subprocess
import sys

import pytest

from engine.data.__main__ import main
from engine.data.report import degenerate_reason, find_degenerate, histogram
from tests.data.conftest import SEED_TEST, SEED_TRAIN

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_degenerate_detection():
    assert degenerate_reason("The answer is 30 hours, as clause 9.5 says. " * 2) is None
    why = degenerate_reason("The answer is " + "agos" * 30)
    assert "'agos' repeated" in why or "'agosagos' repeated" in why
    assert degenerate_reason("x" + " " * 300) is None  # whitespace runs are not flagged by the repeat rule
    varied = "".join(f"related {'to ' if i % 3 else ''}intellectual property; b. " for i in range(40))
    assert "compression ratio" in degenerate_reason(varied)
    prose = open(SEED_TEST).read()[:3000]
    assert degenerate_reason(prose) is None


def test_seed_train_degenerate_lines():
    from engine.data import load_examples

    found = find_degenerate(load_examples(SEED_TRAIN))
    assert [line for line, _, _ in found] == [3, 6, 18, 21, 45]
    assert all(role == "assistant" for _, role, _ in found)
    assert find_degenerate(load_examples(SEED_TEST)) == []


def test_histogram():
    out = histogram([100, 120, 300, 900])
    assert sum(int(line.split()[-1]) for line in out) == 4


def test_cli_report(tok, tmp_path, write_jsonl, capsys):
    tok.save_pretrained(tmp_path / "tok")
    path = write_jsonl([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a " * k}]}
                        for k in (1, 5, 60)] + [{"messages": [{"role": "user", "content": "only"}]}])
    rc = main([path, "--tokenizer", str(tmp_path / "tok"), "--max-seq-len", "64"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "examples: 4 (4 conversations)" in out
    assert "truncated: 1 [3]; of which the answer itself was cut: 1 [3]" in out
    assert "examples with no trainable token: 1 [4]" in out
    assert "packing at max_seq_len 64" in out and "length histogram" in out


def test_cli_bad_line_exits_nonzero_without_traceback(write_jsonl, capsys):
    path = write_jsonl([{"text": "ok"}, "{broken"])
    assert main([path]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path}:2: field '(line)': not valid JSON") and "\n" not in err


def test_cli_bad_option_and_tokenizer(write_jsonl, tmp_path, capsys):
    path = write_jsonl([{"text": "ok"}])
    assert main([path, "--loss-on", "nothing"]) == 2
    assert "config key 'data.loss_on'" in capsys.readouterr().err
    assert main([path, "--tokenizer", str(tmp_path / "missing")]) == 2
    assert "--tokenizer" in capsys.readouterr().err


def test_cli_subprocess_exit_code(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = subprocess.run([sys.executable, "-m", "engine.data", str(empty)], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert f"{empty}:0: field '(file)': file is empty" in r.stderr and "Traceback" not in r.stderr


def test_cli_report_per_source_with_tools_and_reasoning(tmp_path, capsys):
    """A Parquet file of tool-calling and reasoning conversations: the report's per-source line."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from tests.data.conftest import CHATML_TOOLS, build_tiny_tokenizer
    from tests.data.test_tools import think_chat, tool_chat

    tok = build_tiny_tokenizer()
    tok.chat_template = CHATML_TOOLS
    tok.save_pretrained(tmp_path / "tok")
    path = str(tmp_path / "agent.parquet")
    pq.write_table(pa.Table.from_pylist([tool_chat(), think_chat(), tool_chat()]), path)
    assert main([path, "--tokenizer", str(tmp_path / "tok"), "--max-seq-len", "512", "--no-train-on-reasoning"]) == 0
    out = capsys.readouterr().out
    assert "tool-call turns: 2; reasoning turns: 1 (train_on_reasoning false)" in out
    assert f"  {path}: 3 rows (chat 3), 3 examples used, 3 documents; tool-call turns 2, reasoning turns 1" in out
    assert "loss tokens per role: assistant" in out and "reasoning" not in out.split("per role:")[1].split("\n")[0]
