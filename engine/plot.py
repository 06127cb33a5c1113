"""Pictures of a run: `loss.png` (loss, held-out loss, learning rate, tokens/s vs step), an overlay of
several runs, and bar charts for benchmark tables.

    python -m engine.plot RUN_DIR               # redraw RUN_DIR/loss.png
    python -m engine.plot RUN_A RUN_B [-o out]  # overlay runs -> RUN_A/overlay.png (or out)

Figures are drawn on matplotlib's Agg canvas directly (no pyplot): no display is needed and the
process-wide backend is left alone, so the training loop can redraw while it runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator
except ImportError as e:  # the training loop catches this and says once that plots are off
    raise ImportError("engine.plot needs matplotlib: pip install 'engine[plot]' (the `plot` extra)") from e

FIGSIZE, DPI = (9, 6), 120


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) from RUN_DIR/metrics.jsonl, each sorted by step.

    The loop may be appending while we read: a last line without its newline, or one that is not
    yet valid JSON, is ignored. A bad line anywhere else is an error naming the file and line."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics.jsonl (is {run_dir} a run directory?)")
    lines = path.read_text().split("\n")  # the last item is '' when the file ends with a newline
    train, evals = [], []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # being written right now
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON record: {line[:80]!r}") from None
        if "eval_loss" in record or ("loss" not in record and any(k.startswith("eval_") for k in record)):
            evals.append(record)  # GRPO's evaluations have a held-out reward and no loss
        elif "loss" in record:
            train.append(record)
    return sorted(train, key=lambda r: r["step"]), sorted(evals, key=lambda r: r["step"])


def _series(records: list[dict], key: str) -> tuple[list, list]:
    """Steps and values of `key`, skipping records without it (None stays out, NaN stays as a gap)."""
    pairs = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _marker(xs: list) -> str | None:
    # A line through one point draws nothing: show sparse series as dots.
    return "o" if len(xs) <= 2 else None


def _new_figure() -> tuple[Figure, object, object]:
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    top.set_ylabel("loss (nats / token)")
    top.grid(alpha=0.3)
    bottom.set_ylabel("tokens / s")
    bottom.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.10g}"))  # 2,500 not 2500.0
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))  # steps are whole numbers
    bottom.set_xlabel("optimizer step")
    bottom.grid(alpha=0.3)
    return fig, top, bottom


def _title(name: str, train: list[dict], evals: list[dict]) -> str:
    parts = [name]
    if train:
        parts.append(f"step {train[-1]['step']}, train loss {train[-1]['loss']:.4f}")
    for key, what in (("eval_loss", "held-out"), ("eval_reward", "held-out reward")):
        xs, ys = _series(evals, key)
        if ys:
            parts.append(f"{what} {ys[0]:.4f} → {ys[-1]:.4f}" if len(ys) > 1 else f"{what} {ys[-1]:.4f}")
    return "  |  ".join(parts)


def plot_run(run_dir: str | Path, out_path: str | Path | None = None) -> Path:
    """Draw RUN_DIR/loss.png (or `out_path`) from RUN_DIR/metrics.jsonl and return its path.

    Top: training loss per logged step, held-out loss at each evaluation, learning rate on the
    right axis. Bottom: training throughput (tokens/s over each logging window)."""
    run_dir = Path(run_dir)
    train, evals = read_metrics(run_dir)
    fig, top, bottom = _new_figure()
    fig.suptitle(_title(run_dir.resolve().name, train, evals))

    xs, ys = _series(train, "loss")
    handles = top.plot(xs, ys, color="C0", lw=1.2, marker=_marker(xs), label="train loss")
    xs, ys = _series(evals, "eval_loss")
    handles += top.plot(xs, ys, color="C3", lw=1.5, marker="o", ms=5, label="held-out loss")

    lr_axis = top.twinx()
    xs, ys = _series(train, "lr")
    handles += lr_axis.plot(xs, ys, color="0.45", lw=1, ls="--", marker=_marker(xs), label="learning rate")
    lr_axis.set_ylabel("learning rate", color="0.35")
    lr_axis.yaxis.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 5, 10]))
    lr_axis.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.1e}" if v else "0"))
    lr_axis.set_ylim(bottom=0)
    top.legend(handles=handles, loc="upper right", framealpha=0.9)

    xs, ys = _series(train, "tokens_per_s")
    bottom.plot(xs, ys, color="C2", lw=1.2, marker=_marker(xs), label="tokens/s")
    bottom.set_ylim(bottom=0)  # from zero: step-to-step noise should not look like a trend
    if any("reward_accuracy" in r for r in train) or any("eval_preference_accuracy" in r for r in evals):
        _preference_axis(bottom, train, evals)  # DPO / ORPO runs (engine/preference/)
        top.set_ylabel("loss (per pair)")
    elif any("eval_reward" in r for r in evals) or any("reward" in r for r in train):
        _reward_axis(bottom, train, evals)      # GRPO runs (engine/grpo/)
    if not (train or evals):
        top.text(0.5, 0.5, "no metrics yet", transform=top.transAxes, ha="center", va="center", color="0.4")
        for ax in (top, bottom, lr_axis):
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)

    out = Path(out_path) if out_path else run_dir / "loss.png"
    _save(fig, out)
    return out


def _preference_axis(bottom, train: list[dict], evals: list[dict]) -> None:
    """Right axis of the bottom panel: training reward accuracy and held-out preference accuracy."""
    axis = _right_axis(bottom, "accuracy", (
        (train, "reward_accuracy", "reward accuracy", dict(color="C1", lw=1)),
        (evals, "eval_reward_accuracy", "eval reward accuracy", dict(color="C4", lw=1.5, marker="o", ms=4)),
        (evals, "eval_preference_accuracy", "eval preference accuracy", dict(color="C3", lw=1.5, marker="s", ms=4))))
    axis.set_ylim(0, 1.02)


def _reward_axis(bottom, train: list[dict], evals: list[dict]) -> None:
    """Right axis of the bottom panel: the rollouts' mean reward and the held-out mean reward
    (greedy, on the eval prompts: at the start, each evaluation and the end)."""
    axis = _right_axis(bottom, "mean reward", (
        (train, "reward", "reward (rollouts)", dict(color="C1", lw=1)),
        (evals, "eval_reward", "held-out reward", dict(color="C3", lw=1.5, marker="o", ms=4))))
    axis.set_ylim(bottom=0)


def _right_axis(bottom, ylabel: str, lines) -> object:
    """A right axis on the bottom panel with one line per (records, key, label, style) that has
    values, and their legend; returned for its limits."""
    axis = bottom.twinx()
    handles = []
    for records, key, label, style in lines:
        xs, ys = _series(records, key)
        if xs:
            handles += axis.plot(xs, ys, label=label, **style)
    axis.set_ylabel(ylabel)
    axis.legend(handles=handles, loc="lower right", framealpha=0.9, fontsize="small")
    return axis


def _run_labels(run_dirs: list[Path]) -> list[str]:
    """Directory names, or the paths as given when two runs share a name."""
    names = [d.resolve().name for d in run_dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in run_dirs]


def plot_overlay(run_dirs: list[str | Path], out_path: str | Path | None = None) -> Path:
    """Overlay several runs (one colour each): train loss (line), held-out loss (dots, dashed),
    tokens/s. Writes `out_path` or FIRST_RUN/overlay.png and returns its path."""
    if not run_dirs:
        raise ValueError("plot_overlay: no run directories given")
    run_dirs = [Path(d) for d in run_dirs]
    fig, top, bottom = _new_figure()
    fig.suptitle(f"{len(run_dirs)} runs: solid = train loss, dashed dots = held-out loss")
    for i, (run_dir, label) in enumerate(zip(run_dirs, _run_labels(run_dirs))):
        train, evals = read_metrics(run_dir)
        colour = f"C{i % 10}"
        xs, ys = _series(train, "loss")
        top.plot(xs, ys, color=colour, lw=1.2, alpha=0.85, marker=_marker(xs), label=label)
        xs, ys = _series(evals, "eval_loss")
        top.plot(xs, ys, color=colour, lw=1.2, ls="--", marker="o", ms=4)
        xs, ys = _series(train, "tokens_per_s")
        bottom.plot(xs, ys, color=colour, lw=1.2, marker=_marker(xs), label=label)
    bottom.set_ylim(bottom=0)
    top.legend(loc="upper right", framealpha=0.9, title="run")
    out = Path(out_path) if out_path else run_dirs[0] / "overlay.png"
    _save(fig, out)
    return out


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _bar_text(value) -> str:
    if _missing(value):
        return "n/a"
    if isinstance(value, float) and abs(value) < 100:
        return f"{value:.3g}"
    return f"{value:,.0f}"


def bar_chart(rows: list[dict], metric: str, out_path: str | Path, title: str, ylabel: str,
              label_key: str | None = None) -> Path:
    """One horizontal bar per table row (in table order, top to bottom), value written on the bar.

    `label_key` names the column holding each row's name (default: each row's first column).
    A row whose `metric` is missing, None or NaN (e.g. out of memory) gets no bar and the text "n/a".
    `ylabel` names the metric and its unit; it labels the value axis."""
    if not rows:
        raise ValueError(f"bar_chart({metric!r}): no rows to draw")
    labels = [str(r[label_key] if label_key else next(iter(r.values()))) for r in rows]
    values = [r.get(metric) for r in rows]
    if all(v is None for v in values):
        raise ValueError(f"bar_chart: no row has a value for {metric!r} (columns: {', '.join(rows[0])})")
    for label, v in zip(labels, values):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
            raise ValueError(f"bar_chart: row {label!r} has {metric!r} = {v!r}; bars need a number >= 0")
    heights = [0.0 if _missing(v) else float(v) for v in values]

    fig = Figure(figsize=(FIGSIZE[0], 1.4 + 0.45 * len(rows)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ys = list(range(len(rows)))
    ax.barh(ys, heights, color="C0", height=0.6)
    ax.set_yticks(ys, labels)
    ax.invert_yaxis()  # first row at the top, as in the table
    ax.set_xlabel(ylabel)  # the value axis is horizontal here
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.10g}"))
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    top = max(heights) if max(heights) > 0 else 1.0
    ax.set_xlim(0, top * 1.15)  # room for the value text right of the longest bar
    for y, h, v in zip(ys, heights, values):
        ax.text(h + top * 0.01, y, _bar_text(v), va="center", fontsize=9)
    out = Path(out_path)
    _save(fig, out)
    return out


def _save(fig: Figure, out: Path) -> None:
    """Write to a temporary name, then rename: a viewer never sees a half-written PNG."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories (each holds metrics.jsonl)")
    parser.add_argument("-o", "--out", type=Path, default=None,
                        help="output PNG (default: RUN_DIR/loss.png for one run, FIRST_RUN/overlay.png for several)")
    args = parser.parse_args(argv)
    try:
        if len(args.run_dirs) == 1:
            out = plot_run(args.run_dirs[0], args.out)
        else:
            out = plot_overlay(args.run_dirs, args.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
