"""Atomic checkpoints: round trip, manifest verification, partial/corrupt ones skipped, pruning."""

import json
import random

import numpy as np
import pytest
import torch

from engine.training.checkpoint import (CheckpointError, capture_rng, find_resume_checkpoint, load_checkpoint,
                               restore_rng, save_checkpoint, verify_checkpoint)


def _state(seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-3)
    lin(torch.randn(2, 4)).sum().backward()
    opt.step()
    return lin, opt, {"optimizer": opt.state_dict(), "step": 3, "loader": {"epoch": 1, "index": 7},
                      "counters": {"tokens": 123, "eval_loss_before": None}, "rng": capture_rng()}


def _save(root, step, keep_last=2):
    lin, opt, state = _state(step)
    return save_checkpoint(root, step, state=state, trainable={"w": lin.weight},
                           write_adapter=lambda d: d.mkdir(), keep_last=keep_last), lin, opt


def test_round_trip_is_exact(tmp_path):
    path, lin, opt = _save(tmp_path / "ck", 3)
    state, trainable = load_checkpoint(path)
    assert torch.equal(trainable["w"], lin.weight)
    assert state["loader"] == {"epoch": 1, "index": 7} and state["counters"]["eval_loss_before"] is None
    opt2 = torch.optim.AdamW(torch.nn.Linear(4, 3).parameters(), lr=1e-3)
    opt2.load_state_dict(state["optimizer"])  # int-keyed optimizer state survives JSON
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(v, opt2.state_dict()["state"][0][k])


def test_rng_restore_replays_the_same_numbers(tmp_path):
    snap = capture_rng()
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    path = save_checkpoint(tmp_path, 1, state={"rng": snap}, trainable={}, write_adapter=lambda d: d.mkdir())
    state, _ = load_checkpoint(path)
    restore_rng(state["rng"])
    got = (random.random(), float(np.random.rand()), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_partial_checkpoint_is_reported_and_skipped(tmp_path):
    good, *_ = _save(tmp_path, 2)
    newer, *_ = _save(tmp_path, 4)
    (newer / "manifest.json").unlink()  # as if killed before the manifest was written
    with pytest.raises(CheckpointError, match=r"step-4 is incomplete: no manifest.json"):
        verify_checkpoint(newer)
    with pytest.warns(UserWarning, match="step-4"):
        assert find_resume_checkpoint(tmp_path) == good


def test_corrupt_checkpoint_is_reported_and_skipped(tmp_path):
    good, *_ = _save(tmp_path, 2)
    newer, *_ = _save(tmp_path, 4)
    data = bytearray((newer / "trainable.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (newer / "trainable.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="trainable.safetensors does not match its checksum"):
        load_checkpoint(newer)
    with pytest.warns(UserWarning, match="corrupt"):
        assert find_resume_checkpoint(tmp_path) == good


def test_unfinished_tmp_dir_is_ignored(tmp_path):
    (tmp_path / ".tmp-step-9").mkdir()
    with pytest.warns(UserWarning, match=".tmp-step-9"):
        assert find_resume_checkpoint(tmp_path) is None


def test_keep_last_prunes_old_checkpoints(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-3", "step-4"]
    assert json.loads((tmp_path / "step-4" / "manifest.json").read_text())["step"] == 4


def test_unsupported_state_value_names_its_path(tmp_path):
    with pytest.raises(TypeError, match=r"\.bad"):
        save_checkpoint(tmp_path, 1, state={"bad": object()}, trainable={}, write_adapter=lambda d: d.mkdir())
