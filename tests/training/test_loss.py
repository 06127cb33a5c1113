"""engine.training.loss: summed fp32 cross-entropy, chunked == plain, masking, empty batches, memory."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import LlamaConfig, LlamaForCausalLM

from engine.training.loss import causal_lm_loss, lm_head_loss, logit_transform, per_token_losses

VOCAB = 97


class LoRAHead(nn.Module):
    """A frozen linear plus a trainable low-rank update: stands in for a LoRA-targeted lm_head."""

    def __init__(self, base: nn.Linear, r: int = 4):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features) * 0.1)
        self.lora_B = nn.Parameter(torch.randn(base.out_features, r) * 0.1)

    def forward(self, x):
        return self.base(x) + x @ self.lora_A.T @ self.lora_B.T


def tiny_model(lora_head: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).float()
    if lora_head:
        model.lm_head.weight.requires_grad_(False)
        model.lm_head = LoRAHead(model.lm_head)
    return model


def packed_batch() -> dict:
    """Two packed rows of documents; labels already shifted, -100 on prompts, doc ends, padding."""
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (2, 20), generator=g)
    position_ids = torch.tensor([list(range(8)) + list(range(12)),
                                 list(range(15)) + list(range(5))])
    labels = torch.full((2, 20), -100)
    labels[0, 2:7] = input_ids[0, 3:8]    # doc 1: positions 2..6 predict 3..7; last token -100
    labels[0, 10:19] = input_ids[0, 11:20]
    labels[1, 0:14] = input_ids[1, 1:15]  # row 2: then 5 "padding" positions with -100
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels,
            "num_loss_tokens": int((labels != -100).sum())}


def loss_and_grads(model, batch, chunk_size):
    model.zero_grad(set_to_none=True)
    loss, n = causal_lm_loss(model, batch, chunk_size=chunk_size)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), n, grads


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 28, 1024])  # N = 28 labelled tokens
def test_chunked_equals_plain_loss_and_grads(chunk_size):
    model, batch = tiny_model(), packed_batch()
    ref_loss, ref_n, ref_grads = loss_and_grads(model, batch, None)
    loss, n, grads = loss_and_grads(model, batch, chunk_size)
    assert n == ref_n == 28
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    assert {"lm_head.lora_A", "lm_head.lora_B", "model.embed_tokens.weight"} <= grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_plain_loss_matches_hf_and_uses_position_ids():
    model, batch = tiny_model(lora_head=False), packed_batch()
    loss, n = causal_lm_loss(model, batch, chunk_size=None)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                   use_cache=False).logits
    expected = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum")
    torch.testing.assert_close(loss, expected)
    # the restarted position_ids matter: a contiguous 0..T-1 row gives another loss
    other = dict(batch, position_ids=torch.arange(20).expand(2, 20))
    assert not torch.allclose(causal_lm_loss(model, other, chunk_size=None)[0], loss)


def test_padded_batch_matches_hf_mean_loss():
    """HF shifts unshifted labels itself; our shifted labels summed / n equal its mean."""
    model = tiny_model(lora_head=False)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    hf_labels = ids.masked_fill(mask == 0, -100)
    shifted = torch.full_like(ids, -100)
    shifted[:, :-1] = hf_labels[:, 1:]
    batch = {"input_ids": ids, "attention_mask": mask, "labels": shifted}
    hf = model(input_ids=ids, attention_mask=mask, labels=hf_labels, use_cache=False).loss
    for chunk in (None, 5):
        loss, n = causal_lm_loss(model, batch, chunk_size=chunk)
        assert n == 11 + 8
        torch.testing.assert_close(loss / n, hf, rtol=1e-5, atol=1e-6)


def test_masked_positions_get_no_loss_and_no_gradient():
    torch.manual_seed(3)
    head = nn.Linear(8, 11, bias=False)
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    labels = torch.tensor([[1, -100, 3, -100, -100, 5], [-100, 2, 2, 7, -100, -100]])
    keep = labels != -100
    for chunk in (None, 2):
        hidden.grad = None
        loss = lm_head_loss(hidden, labels, head, chunk_size=chunk)
        loss.backward()
        manual = F.cross_entropy(head(hidden[keep]), labels[keep], reduction="sum")
        torch.testing.assert_close(loss, manual)
        assert torch.all(hidden.grad[~keep] == 0)
        assert torch.all(hidden.grad[keep].abs().sum(-1) > 0)
        # the labels at masked positions are never read
        assert lm_head_loss(hidden, labels.masked_fill(~keep, -100), head, chunk_size=chunk) == loss


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_batch_without_labels_gives_zero_and_finite_zero_grads(chunk_size):
    model, batch = tiny_model(), packed_batch()
    batch["labels"] = torch.full_like(batch["labels"], -100)
    batch.pop("num_loss_tokens")
    loss, n = causal_lm_loss(model, batch, chunk_size=chunk_size)
    assert n == 0 and loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads, "the zero loss must be connected to the graph"
    assert all(torch.all(g == 0) for g in grads)


def test_logit_transform_softcap_and_scale():
    assert logit_transform(LlamaConfig()) is None
    cfg = SimpleNamespace(final_logit_softcapping=2.0, logit_scale=0.5)
    torch.manual_seed(4)
    head = nn.Linear(8, 13, bias=False)
    hidden = torch.randn(1, 5, 8) * 10
    labels = torch.tensor([[0, 4, -100, 12, 7]])
    z = head(hidden) * 0.5
    z = 2.0 * torch.tanh(z / 2.0)
    expected = F.cross_entropy(z[0], labels[0], reduction="sum")
    for chunk in (None, 2):
        got = lm_head_loss(hidden, labels, head, transform=logit_transform(cfg), chunk_size=chunk)
        torch.testing.assert_close(got, expected)
    # the gradient through the transform (chunked: softmax - onehot pushed back through tanh and
    # the scales) equals autograd's on the plain expression
    h = hidden.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(F.cross_entropy((2.0 * torch.tanh(head(h) * 0.5 / 2.0))[0], labels[0],
                                                  reduction="sum"), h)
    h2 = hidden.clone().requires_grad_(True)
    lm_head_loss(h2, labels, head, transform=logit_transform(cfg), chunk_size=2).backward()
    torch.testing.assert_close(h2.grad, want)
    granite = logit_transform(SimpleNamespace(logits_scaling=4.0))
    torch.testing.assert_close(granite(torch.tensor([8.0])), torch.tensor([2.0]))


def test_chunked_under_autocast_computes_ce_in_fp32():
    model, batch = tiny_model(), packed_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, _ = causal_lm_loss(model, batch, chunk_size=None)
        chunked, _ = causal_lm_loss(model, batch, chunk_size=5)
    assert plain.dtype == chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, plain, rtol=1e-3, atol=1e-3)
    chunked.backward()
    assert model.lm_head.lora_A.grad.dtype == torch.float32
    assert torch.isfinite(model.lm_head.lora_A.grad).all()


def test_scaled_backward_and_no_grad_mode():
    model, batch = tiny_model(), packed_batch()
    _, _, ref = loss_and_grads(model, batch, 4)
    model.zero_grad(set_to_none=True)
    loss, _ = causal_lm_loss(model, batch, chunk_size=4)
    (loss * 8.0).backward()  # e.g. a GradScaler's scale: the stored grads must be scaled
    torch.testing.assert_close(model.lm_head.lora_B.grad, 8.0 * ref["lm_head.lora_B"])
    torch.testing.assert_close(model.model.embed_tokens.weight.grad, 8.0 * ref["model.embed_tokens.weight"])
    with torch.no_grad():
        plain, _ = causal_lm_loss(model, batch, chunk_size=None)
        chunked, _ = causal_lm_loss(model, batch, chunk_size=4)
    assert not chunked.requires_grad
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)


def test_per_token_losses():
    model, batch = tiny_model(), packed_batch()
    losses = per_token_losses(model, batch)
    assert losses.shape == (2, 20)
    assert torch.all(losses[batch["labels"] == -100] == 0)
    assert torch.all(losses[batch["labels"] != -100] > 0)
    torch.testing.assert_close(losses.sum(), causal_lm_loss(model, batch, chunk_size=None)[0])


def test_errors_name_the_problem():
    head = nn.Linear(4, 5)
    with pytest.raises(ValueError, match="train.loss_chunk_size"):
        lm_head_loss(torch.randn(1, 3, 4), torch.zeros(1, 3, dtype=torch.long), head, chunk_size=0)
    with pytest.raises(ValueError, match=r"hidden states \(1, 3, 4\) do not match labels \(1, 2\)"):
        lm_head_loss(torch.randn(1, 3, 4), torch.zeros(1, 2, dtype=torch.long), head, chunk_size=2)
    with pytest.raises(KeyError, match="batch needs 'input_ids' and 'labels'"):
        causal_lm_loss(tiny_model(), {"input_ids": torch.zeros(1, 3, dtype=torch.long)}, chunk_size=2)


class PeakMemory(TorchDispatchMode):
    """Peak bytes of live tensors created by aten ops in the region (forward and backward).

    Each new storage an op outputs is tracked with a weak reference and counts until it is
    freed. Tensors created before the region (weights, inputs) are not counted."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # views and in-place results share an input's storage: not a new allocation
        inputs = {a.untyped_storage()._cdata for a in tree_flatten((args, kwargs))[0]
                  if isinstance(a, torch.Tensor)}
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs:
                storage = t.untyped_storage()
                self.storages.setdefault(storage._cdata, (StorageWeakRef(storage), storage.nbytes()))
                self.largest = max(self.largest, storage.nbytes())
        self.peak = max(self.peak, self.live())
        return out

    def live(self) -> int:
        self.storages = {k: v for k, v in self.storages.items() if not v[0].expired()}
        return sum(nbytes for _, nbytes in self.storages.values())


def test_chunked_loss_never_holds_full_logits_for_128k_vocab():
    vocab, n_tokens, chunk = 128256, 48, 8
    torch.manual_seed(5)
    head = nn.Linear(16, vocab, bias=False).requires_grad_(False)
    hidden = torch.randn(1, 64, 16, requires_grad=True)
    labels = torch.randint(0, vocab, (1, 64))
    labels[0, n_tokens:] = -100
    full_logits = n_tokens * vocab * 4   # bytes of the [N, V] fp32 logits (24.6 MB)
    chunk_logits = chunk * vocab * 4     # bytes of one chunk's logits (4.1 MB)

    with PeakMemory() as chunked_mem:
        loss = lm_head_loss(hidden, labels, head, chunk_size=chunk)
        # what forward leaves alive for backward: the [N, H] grad of the hidden states (+ the
        # [N, H] selection and small index tensors), no logits
        assert chunked_mem.live() <= 4 * n_tokens * 16 * 4 + 4096
        loss.backward()
    # never an [N, V] tensor; at most one chunk's logits and their gradient alive at once
    assert chunked_mem.largest <= chunk_logits
    assert chunked_mem.peak <= 2.5 * chunk_logits < full_logits

    grad_chunked, hidden.grad = hidden.grad, None
    with PeakMemory() as plain_mem:
        lm_head_loss(hidden, labels, head, chunk_size=None).backward()
    assert plain_mem.largest >= 64 * vocab * 4  # the plain path materialises [B*T, V]
    assert plain_mem.peak >= 2 * full_logits
    torch.testing.assert_close(grad_chunked, hidden.grad, rtol=1e-5, atol=1e-6)
