"""engine.tracking.tensorboard: the metrics.jsonl records mirrored as TensorBoard scalars, and the not-installed path."""

import sys
import types

import pytest

from engine.tracking import tensorboard as tb

TRAIN = {"step": 3, "loss": 1.5, "lr": 1e-4, "grad_norm": float("nan"), "tokens": 300, "tokens_per_s": 99.5,
         "loss_scale": 1.0, "peak_mem_gib": 0.25}
EVAL = {"step": 3, "eval_loss": 1.25, "eval_ppl": 3.49}


@pytest.fixture
def no_tensorboard(monkeypatch):
    """Pretend tensorboard is not installed (whether or not it is)."""
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setattr(tb, "_said_missing", False)


class FakeSummaryWriter:
    """Records add_scalar calls; stands in for torch.utils.tensorboard.SummaryWriter."""

    def __init__(self, log_dir, purge_step=None):
        self.log_dir, self.purge_step, self.scalars, self.flushes, self.texts = log_dir, purge_step, [], 0, []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def add_text(self, tag, text, step):
        self.texts.append((tag, text, step))

    def flush(self):
        self.flushes += 1

    def close(self):
        pass


@pytest.fixture
def fake_tensorboard(monkeypatch):
    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = FakeSummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)


def test_not_installed_returns_none_and_says_once(no_tensorboard, tmp_path, capsys):
    assert tb.maybe_tensorboard(tmp_path, enabled=True) is None
    assert tb.maybe_tensorboard(tmp_path, enabled=True) is None
    err = capsys.readouterr().err
    assert err.count("tensorboard is not installed") == 1 and "engine[tensorboard]" in err


def test_writer_without_tensorboard_names_the_extra(no_tensorboard, tmp_path):
    with pytest.raises(ImportError, match=r"pip install 'engine\[tensorboard\]'"):
        tb.TensorBoardWriter(tmp_path)


def test_disabled_is_silent(tmp_path, capsys):
    assert tb.maybe_tensorboard(tmp_path, enabled=False) is None
    assert capsys.readouterr().err == ""


def test_records_become_tagged_scalars(fake_tensorboard, tmp_path):
    writer = tb.maybe_tensorboard(tmp_path, enabled=True, purge_step=3)
    writer.write(TRAIN)
    writer.write(EVAL)
    fake = writer._writer
    assert fake.log_dir == str(tmp_path) and fake.purge_step == 3
    assert fake.scalars == [("train/loss", 1.5, 3), ("train/lr", 1e-4, 3), ("train/tokens", 300, 3),
                            ("train/tokens_per_s", 99.5, 3), ("train/loss_scale", 1.0, 3),
                            ("train/peak_mem_gib", 0.25, 3),  # NaN grad_norm left out
                            ("eval/loss", 1.25, 3), ("eval/ppl", 3.49, 3)]
    assert fake.flushes == 2  # every record reaches the disk without a close()


def test_real_event_files_hold_the_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = tb.TensorBoardWriter(tmp_path)
    for step in (1, 2):
        writer.write({**TRAIN, "step": step, "loss": 2.0 / step})
    writer.write(EVAL)
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("train/loss")] == [(1, 2.0), (2, 1.0)]
    assert [(e.step, round(e.value, 6)) for e in events.Scalars("eval/loss")] == [(3, 1.25)]
    assert "train/grad_norm" not in events.Tags()["scalars"]


# ---------------------------------------------------------------- as the run's logger (engine/tracking/runs.py)
def test_tracker_logs_records_generations_and_summary(fake_tensorboard, tmp_path):
    from engine.config import LoggerConfig, RunConfig

    tracker = tb.TensorBoardTracker(RunConfig(logger=LoggerConfig(tensorboard=True)), {"train": {"lr": 1e-4}},
                                    tmp_path, previous=None, resume_step=4, logged_through=6)
    fake = tracker._writer
    assert fake.purge_step == 5  # events of the interrupted run past step 4 are hidden, then written again
    tracker.log_metrics({**TRAIN, "step": 5})
    tracker.log_table("generations", [{"index": 0, "adapter": "a|b", "scores": {"adapter": {"exact_match": 1.0}}}], 5)
    tracker.log_summary({"steps": 5, "eval_loss_after": 0.5})
    assert ("train/loss", 1.5, 5) in fake.scalars
    tags = [t for t, _, _ in fake.texts]
    assert tags == ["config", "generations", "summary"]
    table = fake.texts[1][1]
    assert "| index | adapter | scores.adapter.exact_match |" in table and "a\\|b" in table


def test_logger_choice_when_tensorboard_is_missing(no_tensorboard, tmp_path, capsys):
    from engine.config import LoggerConfig, RunConfig
    from engine.tracking import LoggerError, open_trackers

    with pytest.raises(LoggerError, match=r"logger=tensorboard needs the tensorboard package: pip install 'engine\[tensorboard\]'"):
        with open_trackers(RunConfig(logger=LoggerConfig(tensorboard=True)), is_main=True):
            pass
    with open_trackers(RunConfig(logger=LoggerConfig(tensorboard="auto")), is_main=True) as trackers:
        assert trackers.factories == {}  # the default: off, said once, as before the logger group
    assert "tensorboard is not installed" in capsys.readouterr().err
