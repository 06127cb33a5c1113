"""LoRA merged for a rollout (engine/layers/decode_merge.py, generate_rollouts' merge_lora): the
merged decode copies compute what the LoRA branch computes (logits within fp32 rounding; greedy
tokens identical per family, DoRA, dropout, fused blocks, both layouts), the model's own weights
are bit for bit what they were afterwards, and 4-bit bases stay unmerged unless asked."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.layers.decode_merge import decode_copy_bytes, lora_merged_for_decode
from engine.layers.inject import inject_lora
from engine.layers.lora import lora_modules
from engine.model.fused_blocks import set_fused_blocks
from tests.conftest import FAMILIES, make_tiny_model
from tests.grpo.test_rollout import PROMPT_LENGTHS, a_stop_inside, lora_model, random_prompts, rollouts


def dora_model(dropout: float = 0.0):
    model, tokenizer = make_tiny_model("llama")
    torch.manual_seed(1)
    inject_lora(model, "all-linear", r=4, alpha=8, use_dora=True, dropout=dropout)
    for m in lora_modules(model).values():
        nn.init.normal_(m.lora_B.weight, std=0.1)
        with torch.no_grad():
            m.lora_magnitude_vector.mul_(1.1)   # a trained magnitude: not the weight's own norms
    return model, tokenizer


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("kind", ["lora", "dora", "dropout", "bf16"])
def test_merged_logits_equal_the_lora_branch_and_weights_come_back_bit_for_bit(kind, layout):
    if kind == "lora":
        model, _ = lora_model("qwen2")                          # q/k/v biases
    elif kind == "bf16":
        model, _ = lora_model("llama")
        model.to(torch.bfloat16)
        for m in lora_modules(model).values():
            m.lora_A.float(), m.lora_B.float()
    else:
        model, _ = dora_model(dropout=0.1 if kind == "dropout" else 0.0)
    model.eval()
    ids = torch.tensor([random_prompts(model, (9,))[0]])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = logits(model, ids)
    with lora_merged_for_decode(model, layout=layout) as report:
        got = logits(model, ids)
        assert report.layers == len(lora_modules(model)) and not report.left
        assert report.bytes == decode_copy_bytes(model)
        assert all(m.decode_weight.is_contiguous() == (layout == "out_in") for m in lora_modules(model).values())
    # bf16: W + s*B@A rounded to bf16 once (as merge_lora stores it) against W x in bf16 plus an fp32 branch
    tolerance = dict(rtol=5e-2, atol=1e-1) if kind == "bf16" else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.float(), expected.float(), **tolerance)
    assert all(m.decode_weight is None for m in lora_modules(model).values())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    torch.testing.assert_close(logits(model, ids), expected, rtol=0, atol=0)   # the branch again, unchanged


@pytest.mark.parametrize("family", FAMILIES + ("gemma2",))
def test_merged_greedy_rollouts_equal_unmerged_ones_token_for_token(family):
    model, tokenizer = lora_model(family)
    prompts = random_prompts(model)
    stops = a_stop_inside(model, tokenizer, prompts)
    reference = rollouts(model, tokenizer, prompts, G=2, stops=stops, merge_lora=False)
    for layout in ("out_in", "in_out"):
        got = rollouts(model, tokenizer, prompts, G=2, stops=stops, merged_layout=layout)
        assert got.completion_ids == reference.completion_ids
        assert got.truncated == reference.truncated


def test_merged_sampled_rollouts_equal_unmerged_ones_under_the_same_generator():
    model, tokenizer = lora_model("llama")
    prompts = random_prompts(model)
    kw = dict(G=3, temperature=0.8, top_k=20, top_p=0.9)
    reference = rollouts(model, tokenizer, prompts, merge_lora=False, generator=torch.Generator().manual_seed(4), **kw)
    got = rollouts(model, tokenizer, prompts, generator=torch.Generator().manual_seed(4), **kw)
    assert got.completion_ids == reference.completion_ids


def test_fused_blocks_step_aside_for_the_merged_copies():
    """With the fused LoRA blocks swapped in, the merged layers run as plain linears (the fused
    Functions read A and B, not the decode copy): the same tokens as the unmerged fused model."""
    model, tokenizer = lora_model("llama")
    prompts = random_prompts(model)
    reference = rollouts(model, tokenizer, prompts, merge_lora=False)
    blocks = set_fused_blocks(model, True)
    assert blocks.mlps and blocks.groups
    try:
        assert rollouts(model, tokenizer, prompts).completion_ids == reference.completion_ids
        assert rollouts(model, tokenizer, prompts, merge_lora=False).completion_ids == reference.completion_ids
    finally:
        set_fused_blocks(model, False)


def test_four_bit_bases_stay_unmerged_unless_dequantized_copies_are_asked_for():
    model, tokenizer = lora_model("llama", four_bit=True)
    ids = torch.tensor([random_prompts(model, (7,))[0]])
    expected = logits(model, ids)
    packed = {k: v.clone() for k, v in model.state_dict().items() if "base_layer.weight" in k}
    with lora_merged_for_decode(model) as report:   # the layers' linears are 4-bit: every one stays a branch
        assert report.layers == 0 and report.left["4-bit base"] == len(lora_modules(model))
        assert all(m.decode_weight is None for m in lora_modules(model).values())
    with lora_merged_for_decode(model, dequantize_4bit=True) as report:
        assert report.layers == len(lora_modules(model)) and not report.left
        got = logits(model, ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)   # W_hat + s*B@A: what the 4-bit forward computes
    after = model.state_dict()
    assert all(torch.equal(packed[k], after[k]) for k in packed)
    prompts = random_prompts(model)
    assert (rollouts(model, tokenizer, prompts, dequantize_4bit=True).completion_ids
            == rollouts(model, tokenizer, prompts, merge_lora=False).completion_ids)


def test_adapters_switched_off_are_not_merged_and_a_bad_layout_is_refused():
    from engine.layers.lora import adapters_disabled

    model, _ = lora_model("llama")
    ids = torch.tensor([random_prompts(model, PROMPT_LENGTHS[:1])[0]])
    with adapters_disabled(model):
        base = logits(model, ids)
        with lora_merged_for_decode(model) as report:
            assert report.layers == 0 and report.left["merged or switched off"] == len(lora_modules(model))
            torch.testing.assert_close(logits(model, ids), base, rtol=0, atol=0)
    with pytest.raises(ValueError, match="layout must be one of"):
        with lora_merged_for_decode(model, layout="column"):
            pass
    assert all(m.decode_weight is None for m in lora_modules(model).values())
