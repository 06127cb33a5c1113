"""engine.plot: loss.png, overlays and bar charts from metrics.jsonl, and the no-matplotlib path."""

import importlib
import json
import math
import sys

import pytest

pytest.importorskip("matplotlib")

from engine import plot  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(run_dir, steps=100, eval_every=20, tail=""):
    """A realistic metrics.jsonl: cosine lr, decaying loss, eval at 0 and every `eval_every` steps."""
    run_dir.mkdir(parents=True, exist_ok=True)
    records = [{"step": 0, "eval_loss": 2.3, "eval_ppl": math.exp(2.3)}]
    for s in range(1, steps + 1):
        records.append({"step": s, "loss": 1.0 + 1.4 * math.exp(-s / 25), "lr": 1e-4 * (1 + math.cos(math.pi * s / steps)),
                        "grad_norm": 0.5, "tokens": 4096 * s, "tokens_per_s": 2400.0, "loss_scale": 1.0,
                        "peak_mem_gib": 3.2})
        if eval_every and s % eval_every == 0:
            records.append({"step": s, "eval_loss": 1.1 + 1.2 * math.exp(-s / 30), "eval_ppl": 3.0})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return records


def assert_png(path):
    assert path.is_file() and path.read_bytes()[:8] == PNG_MAGIC
    assert not path.with_name(path.name + ".tmp").exists()


def test_plot_run_writes_loss_png(tmp_path):
    run = tmp_path / "run_a"
    write_metrics(run)
    out = plot.plot_run(run)
    assert out == run / "loss.png"
    assert_png(out)


def test_read_metrics_splits_train_and_eval(tmp_path):
    write_metrics(tmp_path, steps=100, eval_every=20)
    train, evals = plot.read_metrics(tmp_path)
    assert [r["step"] for r in train] == list(range(1, 101))
    assert [r["step"] for r in evals] == [0, 20, 40, 60, 80, 100]


def test_truncated_last_line_is_ignored(tmp_path):
    # The loop may be appending when the plot is drawn: a half-written last record is skipped.
    write_metrics(tmp_path, steps=3, eval_every=0, tail='{"step": 4, "loss": 1.2')
    train, _ = plot.read_metrics(tmp_path)
    assert [r["step"] for r in train] == [1, 2, 3]
    assert_png(plot.plot_run(tmp_path))


def test_corrupt_line_in_the_middle_names_file_and_line(tmp_path):
    write_metrics(tmp_path, steps=3, eval_every=0)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    lines[2] = "{oops"
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:3: not a JSON record"):
        plot.read_metrics(tmp_path)


@pytest.mark.parametrize("steps,eval_every", [(0, 0), (1, 0), (1, 1), (5, 0)])
def test_sparse_metrics_still_plot(tmp_path, steps, eval_every):
    """No train records yet, a single step, no evaluations: a picture, not an exception."""
    write_metrics(tmp_path, steps=steps, eval_every=eval_every)
    assert_png(plot.plot_run(tmp_path))


def test_empty_metrics_file_plots(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    assert plot.read_metrics(tmp_path) == ([], [])
    assert_png(plot.plot_run(tmp_path))


def test_missing_metrics_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        plot.plot_run(tmp_path / "nope")


def test_title_names_run_and_losses(tmp_path):
    write_metrics(tmp_path / "my_run", steps=40, eval_every=20)
    train, evals = plot.read_metrics(tmp_path / "my_run")
    title = plot._title("my_run", train, evals)
    assert title.startswith("my_run") and "step 40" in title and "held-out 2.3000 →" in title


def test_overlay_cli_default_and_out(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    write_metrics(a)
    write_metrics(b, steps=50, eval_every=10)
    assert plot.main([str(a), str(b)]) == 0
    assert_png(a / "overlay.png")
    assert plot.main([str(a), str(b), "-o", str(tmp_path / "x" / "cmp.png")]) == 0
    assert_png(tmp_path / "x" / "cmp.png")
    assert plot.main([str(a)]) == 0  # one run: redraw its loss.png
    assert_png(a / "loss.png")


def test_cli_missing_run_dir_exits_2(tmp_path, capsys):
    assert plot.main([str(tmp_path / "missing"), str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_run_labels_disambiguate_same_names(tmp_path):
    dirs = [tmp_path / "x" / "run", tmp_path / "y" / "run"]
    assert plot._run_labels(dirs) == [str(d) for d in dirs]
    assert plot._run_labels([tmp_path / "p", tmp_path / "q"]) == ["p", "q"]


def test_bar_chart(tmp_path):
    rows = [{"config": "HF + PEFT", "tokens_per_s": 139.0}, {"config": "engine packed", "tokens_per_s": 2413},
            {"config": "engine 16k ctx", "tokens_per_s": None}]
    out = plot.bar_chart(rows, "tokens_per_s", tmp_path / "bars.png", "Throughput", "useful tokens / s")
    assert_png(out)
    assert plot._bar_text(None) == "n/a" and plot._bar_text(2413) == "2,413" and plot._bar_text(0.1234) == "0.123"


@pytest.mark.parametrize("rows,match", [
    ([], "no rows"),
    ([{"config": "a", "tps": 1.0}], "no row has a value for 'tokens_per_s' \\(columns: config, tps\\)"),
    ([{"config": "a", "tokens_per_s": "fast"}], "row 'a' has 'tokens_per_s' = 'fast'"),
    ([{"config": "a", "tokens_per_s": -1}], "number >= 0"),
])
def test_bar_chart_bad_rows(tmp_path, rows, match):
    with pytest.raises(ValueError, match=match):
        plot.bar_chart(rows, "tokens_per_s", tmp_path / "b.png", "t", "y")


def test_import_without_matplotlib_names_the_extra(monkeypatch):
    # A None entry makes `import X` raise ImportError; submodules already imported must be hidden
    # too, since `from matplotlib.figure import Figure` finds them in sys.modules directly.
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "engine.plot", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'engine\[plot\]'"):
        importlib.import_module("engine.plot")
