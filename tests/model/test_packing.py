"""engine/model/packing.py: the packing context the loader makes on the host."""

from __future__ import annotations

import pytest
import torch

from engine.model.packing import PackingContext, lengths_from_positions, packing_context


def test_the_context_of_a_packed_batch():
    labels = torch.tensor([[5, 6, -100, 7, -100, -100], [-100, 1, 2, 3, 4, -100]])
    ctx = packing_context(labels, [[3, 2, 1], [6]], num_tokens=11)
    assert ctx.label_index.tolist() == [0, 1, 3, 7, 8, 9, 10]           # flat b * T + t
    assert ctx.label_targets.tolist() == [5, 6, 7, 1, 2, 3, 4]
    assert ctx.num_loss_tokens == 7 and ctx.num_tokens == 11
    assert ctx.cu_seqlens.dtype == torch.int32 and ctx.cu_seqlens.device.type == "cpu"
    assert ctx.cu_seqlens.tolist() == [0, 3, 5, 6, 12] and (ctx.max_doc_length, ctx.min_doc_length) == (6, 1)
    assert ctx.has_several_documents
    assert not packing_context(labels, [[6], [6]], num_tokens=12).has_several_documents
    assert not packing_context(labels, [[3, 3], [6]], num_tokens=12, packed=False).has_several_documents


def test_lengths_that_do_not_fill_the_row_are_refused():
    with pytest.raises(ValueError, match=r"row 1: document lengths \[2, 3\] sum to 5, the row has 6 tokens"):
        packing_context(torch.full((2, 6), -100), [[6], [2, 3]], num_tokens=11)


def test_the_context_is_made_on_the_host():
    with pytest.raises(ValueError, match="built on the host"):
        packing_context(torch.full((1, 2), -100, device="meta"), [[2]], num_tokens=2)


def test_to_device_and_equality():
    ctx = packing_context(torch.tensor([[1, -100, 2]]), [[3]], num_tokens=3)
    same = packing_context(torch.tensor([[1, -100, 2]]), [[3]], num_tokens=3)
    assert ctx == same and ctx != packing_context(torch.tensor([[1, 3, 2]]), [[3]], num_tokens=3)
    assert ctx.to("cpu") is ctx
    moved = ctx.to("meta")
    assert isinstance(moved, PackingContext) and moved.label_index.device.type == "meta"
    assert moved.cu_seqlens.device.type == "meta"  # varlen kernels read it there: no host copy per layer
    assert moved.doc_lengths == [[3]] and moved.max_doc_length == 3 and moved.kernel_cache is not ctx.kernel_cache


def test_lengths_from_positions():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert lengths_from_positions(pos) == [[3, 2, 1], [6]]


def test_the_loader_hands_over_each_batch_with_its_context():
    from engine.data import make_loader

    docs = [{"input_ids": list(range(1, n + 1)), "labels": [-100] * (n - 2) + [7, -100]} for n in (5, 3, 4, 6)]
    loader = make_loader(docs, max_seq_len=9, micro_batch_size=2, packing=True, seed=0, pad_token_id=0)
    for batch in loader.one_pass():
        ctx = batch["packing"]
        B, T = batch["input_ids"].shape
        assert all(sum(row) == T for row in ctx.doc_lengths)
        assert ctx.num_loss_tokens == batch["num_loss_tokens"] == int((batch["labels"] != -100).sum())
        flat = batch["labels"].flatten()
        assert torch.equal(flat[ctx.label_index], ctx.label_targets)
        assert lengths_from_positions(batch["position_ids"]) == ctx.doc_lengths
