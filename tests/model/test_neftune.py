"""NEFTune (engine/model/neftune.py): each packed document's noise is scaled by alpha / sqrt(L_i * d)
with its own length; no noise in evaluation, under no_grad, or in generation."""

from __future__ import annotations

import math

import pytest
import torch

from engine.model.neftune import add_neftune, noise_scale
from engine.training.loss import per_token_losses
from tests.conftest import make_tiny_model, packed_batch

ALPHA = 5.0
DOCS = [[5, 11, 16], [32]]  # two rows of T = 32: three documents, then one


def captured_embeddings(model):
    """A pre-hook registered after NEFTune's: the decoder's inputs as the layers receive them."""
    seen = {}

    def hook(module, args, kwargs):
        seen.update(kwargs)
    model.get_decoder().register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def packed_inputs(vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 32), generator=g)
    return ids, packed_batch(ids, DOCS)


def test_scale_per_document_in_a_packed_row():
    _, batch = packed_inputs(100)
    scale = noise_scale(batch["packing"], 2, 32, ALPHA, 64, torch.device("cpu"))
    expected = torch.tensor([[ALPHA / math.sqrt(n * 64) for n in row for _ in range(n)] for row in DOCS])
    torch.testing.assert_close(scale.squeeze(-1), expected)
    # without a packing context every token gets the row's length (what the paper does)
    torch.testing.assert_close(noise_scale(None, 2, 32, ALPHA, 64, torch.device("cpu")),
                               torch.full((2, 32, 1), ALPHA / math.sqrt(32 * 64)))


def test_training_noise_has_each_documents_own_scale():
    model, tokenizer = make_tiny_model("llama")
    ids, batch = packed_inputs(len(tokenizer))
    add_neftune(model, ALPHA)
    seen = captured_embeddings(model)
    model.train()
    torch.manual_seed(1)
    model.get_decoder()(input_ids=ids, position_ids=batch["position_ids"], packing=batch["packing"], use_cache=False)
    d = model.config.hidden_size
    noise = (seen["inputs_embeds"] - model.get_input_embeddings()(ids)).detach()   # [B, T, d]
    assert seen.get("input_ids") is None
    for b, row in enumerate(DOCS):
        start = 0
        for n in row:
            doc = noise[b, start:start + n]
            bound = ALPHA / math.sqrt(n * d)
            # U(-1, 1) * bound: inside the bound, reaching close to it, std bound / sqrt(3)
            assert doc.abs().max() <= bound * (1 + 1e-5)
            assert doc.abs().max() >= 0.95 * bound
            assert doc.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)
            start += n
    row_scale = ALPHA / math.sqrt(32 * d)   # what a row-length scale would give the 5-token document
    assert noise[0, :5].abs().max() > 2 * row_scale


def test_no_noise_in_evaluation_or_without_gradients():
    model, tokenizer = make_tiny_model("llama")
    ids, batch = packed_inputs(len(tokenizer))
    batch["labels"] = ids.roll(-1, dims=1)
    clean = per_token_losses(model.eval(), batch)
    handle = add_neftune(model, ALPHA)
    seen = captured_embeddings(model)
    torch.testing.assert_close(per_token_losses(model.eval(), batch), clean, rtol=0, atol=0)
    assert seen.get("inputs_embeds") is None and seen["input_ids"] is ids
    model.train()
    with torch.no_grad():  # the DPO reference forward, a training-mode evaluation
        torch.testing.assert_close(per_token_losses(model, batch), clean, rtol=0, atol=0)
    noisy = per_token_losses(model, batch)  # training: gradients on
    assert not torch.equal(noisy.detach(), clean)
    handle.remove()
    torch.testing.assert_close(per_token_losses(model, batch).detach(), clean)


def test_generation_sees_no_noise():
    from engine.generate import generate_tokens

    model, tokenizer = make_tiny_model("llama")
    prompts = [tokenizer.encode("hello how are you"), tokenizer.encode("the quick brown fox")]
    kwargs = dict(max_new_tokens=6, batch_size=2, device=torch.device("cpu"), precision="fp32", stops=[])
    before = generate_tokens(model, tokenizer, prompts, **kwargs)
    add_neftune(model, 50.0)
    model.train()  # generation switches to eval itself
    assert generate_tokens(model, tokenizer, prompts, **kwargs) == before


def test_alpha_must_be_positive():
    model, _ = make_tiny_model("llama")
    with pytest.raises(ValueError, match="NEFTune alpha must be > 0"):
        add_neftune(model, 0.0)
