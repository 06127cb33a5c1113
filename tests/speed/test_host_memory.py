"""speed.retain_host_memory (engine/speed/host_memory.py) and the loss chunks it bounds.

glibc's thresholds are a process setting without undo: what they do to page faults is measured in
fresh interpreters; the in-process tests only flip the module's flag (reset after every test by
conftest's autouse fixture)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from engine.config import SpeedConfig
from engine.speed import host_memory
from engine.speed import plan as speed_plan
from engine.training.loss import StepKernels, chunk_bounds, lm_head_loss

GLIBC = host_memory.unavailable_reason() is None
ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]

# A training step in miniature: a "forward" keeps activations of a few MB per layer (their sizes
# change with every row length), a "backward" frees them all; minor faults counted over the last
# steps. glibc gives the freed heap top back to the kernel and the next step faults it in again.
FAULTS_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[2])
from engine.speed import host_memory
if sys.argv[1] == "retain":
    host_memory.retain()
lengths = (1024, 998, 921, 977, 1003, 950)
def step(n):
    t = lengths[n % len(lengths)]
    saved = []
    for layer in range(24):
        h = torch.ones(t, 1536, dtype=torch.bfloat16)
        saved += [h * 2, torch.ones(t, 576)]
    return sum(float(s[0, 0]) for s in saved)
for n in range(6):
    step(n)
f0 = host_memory.minor_faults()
for n in range(6, 18):
    step(n)
print(json.dumps({"faults_per_step": (host_memory.minor_faults() - f0) / 12}))
"""


def faults_per_step(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, mode, str(ROOT)], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["faults_per_step"]


@pytest.mark.skipif(not GLIBC, reason="glibc only (mallopt)")
def test_retained_memory_stops_the_page_faults_of_changing_sizes():
    default, retained = faults_per_step("default"), faults_per_step("retain")
    # the default C library gives the freed heap top back to the kernel and faults it in again
    # thousands of faults); retained, the process reuses its own heap
    assert default > 500, default  # thousands on an idle machine; fewer under load
    assert retained < default / 8, (retained, default)


def _retains(mode, device="cpu") -> bool:
    return speed_plan.resolve(SpeedConfig(retain_host_memory=mode), device=torch.device(device),
                              precision="fp32").retain_host_memory


def test_the_plan_decides_per_device(monkeypatch):
    assert _retains(False) is False
    assert _retains("auto", "cuda") is False      # a GPU's activations are CUDA's
    monkeypatch.setattr(host_memory, "_glibc", lambda: object())
    assert _retains("auto") is True
    assert _retains(True, "cuda") is True
    assert speed_plan.resolve(SpeedConfig(mode="off"), device=torch.device("cpu"),
                              precision="fp32").retain_host_memory is False


def test_without_glibc_auto_says_so_and_true_is_an_error(monkeypatch):
    monkeypatch.setattr(host_memory, "_glibc", lambda: None)
    plan = speed_plan.resolve(SpeedConfig(), device=torch.device("cpu"), precision="fp32")
    assert not plan.retain_host_memory
    assert "retain_host_memory off: the C library is not glibc" in plan.describe()
    plan = speed_plan.resolve(SpeedConfig(retain_host_memory=True), device=torch.device("cpu"), precision="fp32")
    with pytest.raises(host_memory.HostMemoryError, match="retain_host_memory=true: the C library is not glibc"):
        speed_plan.apply(plan, nn.Linear(2, 2))
    assert not host_memory.is_retained()


@pytest.mark.skipif(not GLIBC, reason="glibc only (mallopt)")
def test_retain_sets_the_flag_and_the_plan_caps_the_loss_chunks():
    assert not host_memory.is_retained()
    plan = speed_plan.resolve(SpeedConfig(), device=torch.device("cpu"), precision="fp32")
    kernels = speed_plan.apply(plan, nn.Linear(2, 2))   # this test process keeps glibc's fixed thresholds (harmless)
    assert host_memory.is_retained() and kernels.max_chunk_bytes == 32 * 2**20


def test_chunk_bounds():
    limit = 32 * 2**20
    assert chunk_bounds(0, 1024, 100) == []
    assert chunk_bounds(403, 1024, 98304) == [(0, 403)]                          # no cap: chunk_size only
    assert chunk_bounds(1000, 300, 4) == [(0, 250), (250, 500), (500, 750), (750, 1000)]  # equal chunks
    assert chunk_bounds(403, 1024, 49152 * 2, limit) == [(0, 201), (201, 403)]   # 40 MB -> two under 32 MiB
    assert chunk_bounds(5, 1024, 2**30, limit) == [(i, i + 1) for i in range(5)]  # at least one row a chunk
    assert chunk_bounds(5, 1024, 0, limit) == [(0, 5)]                           # unknown vocab: no cap
    bounds = chunk_bounds(1001, 1024, 49152 * 4, limit)
    assert bounds[0][0] == 0 and bounds[-1][1] == 1001 and all(b - a <= 170 for a, b in bounds)
    assert all(x[1] == y[0] for x, y in zip(bounds, bounds[1:]))


@pytest.mark.parametrize("autocast", [False, True])
def test_loss_split_under_the_heap_limit_is_the_same(monkeypatch, autocast):
    """The chunks the heap limit forces give the same loss and gradients as one chunk."""
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=False)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :3] = -100

    def run(kernels=StepKernels()):
        hidden.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = lm_head_loss(hidden, labels, head, chunk_size=1024, kernels=kernels)
        loss.backward()
        return loss.detach(), hidden.grad.clone()

    ref = run()
    calls = []
    original = head.forward
    monkeypatch.setattr(head, "forward", lambda x: calls.append(x.shape[0]) or original(x))
    split = run(StepKernels(max_chunk_bytes=4 * 50 * 4))   # 4 fp32 rows of 50 logits
    assert calls == [3, 4, 4, 4]                                        # 15 labelled rows
    torch.testing.assert_close(split[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split[1], ref[1], rtol=1e-5, atol=1e-5)


def test_a_refused_mallopt_is_an_error_naming_the_option(monkeypatch):
    class Libc:
        def mallopt(self, option, value):
            return 0                                        # glibc's answer to a value it rejects

    monkeypatch.setattr(host_memory, "_glibc", lambda: Libc())
    with pytest.raises(host_memory.HostMemoryError, match=r"mallopt\(-3, 33554432\) was refused by glibc"):
        host_memory.retain()
    assert not host_memory.is_retained()
