"""Activation offload (engine/speed/offload.py): same losses and LoRA grads with and without it, and the
hooks really see (and round-trip) one checkpoint per decoder block."""

from __future__ import annotations

import copy

import pytest
import torch

from engine.config import ModelConfig, PeftConfig
from engine.training.loss import causal_lm_loss
from engine.layers.lora import lora_state_dict
from engine.model.build import build_model, enable_activation_checkpointing
from engine.speed.offload import OffloadCheckpoints, install_offload, offloaded_checkpoint
from tests.conftest import make_tiny_model_dir


def _packed_batch(vocab: int) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, 24), generator=g)
    labels = torch.randint(0, vocab, (2, 24), generator=g)
    labels[:, :5] = -100
    positions = torch.cat([torch.arange(10), torch.arange(14)]).repeat(2, 1)  # two documents per row
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def _loss_and_grads(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    loss, _ = causal_lm_loss(model, batch, chunk_size=7)
    loss.backward()
    return loss.detach(), {k: v.grad.clone() for k, v in lora_state_dict(model).items()}


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_offload_gives_the_same_loss_and_grads(tmp_path, family):
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(path=str(make_tiny_model_dir(tmp_path, family)), attn_implementation="sdpa"),
                           PeftConfig(r=4, alpha=8.0), "cpu", torch.float32)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.normal_(0, 0.1)
    batch = _packed_batch(model.config.vocab_size)
    plain_loss, plain_grads = _loss_and_grads(model, batch)

    checkpointed = copy.deepcopy(model)
    enable_activation_checkpointing(checkpointed)
    ckpt_loss, ckpt_grads = _loss_and_grads(checkpointed, batch)

    offloaded = copy.deepcopy(model)
    enable_activation_checkpointing(offloaded)
    offloader = install_offload(offloaded, use_reentrant=False)
    assert isinstance(offloader, OffloadCheckpoints)
    offloader.min_bytes, offloader.copy_on_cpu = 0, True  # tiny tensors: force the copy round trip
    off_loss, off_grads = _loss_and_grads(offloaded, batch)

    layers = model.config.num_hidden_layers
    # exactly one checkpoint per decoder block went through the hooks, and each came back
    assert offloader.stats["offloaded"] == layers, offloader.stats
    assert offloader.stats["unpacked"] == layers, offloader.stats
    assert offloader.stats["offloaded_bytes"] == layers * 2 * 24 * model.config.hidden_size * 4
    torch.testing.assert_close(off_loss, plain_loss, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(ckpt_loss, plain_loss, atol=1e-5, rtol=1e-6)
    for key, grad in plain_grads.items():
        assert grad.abs().sum() > 0, key
        torch.testing.assert_close(off_grads[key], grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ckpt_grads[key], grad, atol=1e-6, rtol=1e-5)


def test_offload_copy_is_what_backward_reads():
    """The recompute must read the offloaded copy, not the original: corrupting the copy changes
    the gradient (so the test above cannot pass by ignoring the hooks)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8)

    def grad_with(offloader):
        lin.zero_grad()
        out = offloaded_checkpoint(lambda t: torch.tanh(lin(t)), x, offloader=offloader, use_reentrant=False)
        out.sum().backward()
        return lin.weight.grad.clone()

    good = grad_with(OffloadCheckpoints(min_bytes=0, copy_on_cpu=True))

    class Corrupting(OffloadCheckpoints):
        def _unpack(self, packed):
            return super()._unpack(packed) * 2.0

    bad = grad_with(Corrupting(min_bytes=0, copy_on_cpu=True))
    assert not torch.allclose(good, bad)


def test_offload_without_checkpointing_is_an_error(tmp_path):
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(path=str(make_tiny_model_dir(tmp_path, "llama"))),
                           PeftConfig(r=4, alpha=8.0), "cpu", torch.float32)
    with pytest.raises(ValueError, match="train.offload_activations needs train.activation_checkpointing=true"):
        install_offload(model)
    with pytest.raises(ValueError, match="use_reentrant=False"):
        offloaded_checkpoint(lambda t: t, torch.ones(1), offloader=OffloadCheckpoints(), use_reentrant=True)


def test_small_tensors_and_parameters_stay_in_place():
    hooks = OffloadCheckpoints(min_bytes=1024, copy_on_cpu=True)
    small, param = torch.ones(4), torch.nn.Parameter(torch.ones(1024))
    for t in (small, param):
        packed = hooks._pack(t)
        assert packed[0] == "kept" and hooks._unpack(packed) is t
    assert hooks.stats == {"packed": 2, "offloaded": 0, "offloaded_bytes": 0, "unpacked": 0}
