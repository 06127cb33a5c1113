"""engine/speed/measure.py: the dispatch modes that count attention kernel calls and allocated bytes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.speed.measure import AllocatedBytes, AttentionCalls, is_attention_op


def test_attention_calls_count_forward_and_backward_launches():
    q = torch.randn(1, 2, 8, 4, requires_grad=True)
    with AttentionCalls() as calls:
        for _ in range(3):
            F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
        torch.matmul(q, q.transpose(-1, -2))  # not an attention kernel
    assert (calls.forward, calls.backward) == (3, 3)
    assert is_attention_op("torch_attn::_varlen_attn") and is_attention_op("aten::_efficient_attention_forward")
    assert not is_attention_op("aten::bmm")


def test_allocated_bytes_peak_counts_live_storage_made_inside_only():
    outside = torch.zeros(1000)                    # 4000 bytes, made before: never counted
    with AllocatedBytes() as mem:
        a = torch.ones(1000)                       # +4000
        b = a * 2                                  # +4000 -> 8000 alive
        view = b.view(10, 100)                     # a view: nothing new
        view.add_(outside.view(10, 100))           # in place: nothing new
        del a                                      # -4000
        c = torch.ones(500, dtype=torch.float64)   # +4000 -> 8000 again
    assert mem.peak == 8000 and mem.live == 8000
    del b, view, c
    assert mem.live == 0


def test_aten_ops_counts_every_op_forward_and_backward_by_name():
    from engine.speed.measure import AtenOps

    x = torch.randn(4, 3, requires_grad=True)
    with AtenOps() as ops:
        y = (x * 2).sum()
        y.backward()
    assert ops.by_name["mul.Tensor"] >= 2 and ops.by_name["sum"] == 1  # forward mul, backward mul
    assert ops.total == sum(ops.by_name.values()) and ops.total >= 4


def test_kernel_time_counts_gemms_and_attention_and_times_only_them():
    from engine.speed.measure import KernelTime

    a = torch.randn(64, 64, requires_grad=True)
    q = torch.randn(1, 2, 16, 8, requires_grad=True)
    with KernelTime() as kt:
        (a @ a).relu().sum().backward()  # mm forward, two mm in backward
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
    assert kt.calls["gemm"] == 3 and kt.calls["attention"] == 2
    assert kt.seconds["gemm"] > 0 and kt.seconds["attention"] > 0
    assert set(kt.calls) == {"gemm", "attention"}  # relu, sum, the casts: not timed
