"""Does this model keep the documents of a packed row apart? A two-document probe.

Packed rows (engine/data/loader.py) rely on the model reading `position_ids`: positions restart at
each document, and transformers derives a block-diagonal causal mask from the restarts (or the
engine's packed attention splits at them). Most decoder families do (Llama, Mistral, Qwen, Phi,
Gemma, GPT-NeoX, Falcon, MoE models, ...). Some do not: OPT computes its learned positions from
the attention mask, BLOOM's ALiBi mask ignores position_ids. There a packed document attends to
the ones before it and sees shifted positions: training on such rows is silently wrong.

The probe runs the model's decoder (the training forward: `engine.training.loss.decoder_hidden`, no KV
cache) on three packed rows of 9 random tokens that hold the same document b after different
neighbours, and once with b's first token changed:

    row 1  [ a (5) | b (4) ]            position_ids [0 1 2 3 4 | 0 1 2 3]
    row 2  [ c (3) | b (4) | e (2) ]    position_ids [0 1 2 | 0 1 2 3 | 0 1]
    row 3  [ c (3) | b' (4) | e (2) ]   b' = b with another first token
    leak    = max |h_1(b) - h_2(b)|            (what the documents before b do to it: their
                                                tokens through attention, their length through
                                                positions computed from the row instead of position_ids)
    context = max |h_2(b)[1:] - h_3(b')[1:]|    (what one token of b's own does to the rest of b)
    ratio   = leak / max(context, 1e-3 max |h_2(b)|)

Every row is packed and 9 tokens long, so b takes the same kernels in all three (the engine's
per-document attention, the same GEMM shapes): an isolated model gives a leak of exactly 0 or
rounding noise even in bf16. (Comparing with b alone would pit the packed path's kernels against
the unpacked one's: in bf16 on a trained model that kernel difference alone measured a ratio of
0.26 on SmolLM2, with ShortCausalAttention vs SDPA.) A leaking model lets the foreign tokens move b
about as much as one of its own: a ratio of O(1), whatever the weights' scale (a randomly
initialised model's attention barely moves its hidden states, a trained one's a lot; the ratio
measures against that). Three forwards of 9 tokens, run once before training (and by
`engine.evaluate`).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from engine.model.attention import PackedAttentionError
from engine.model.packing import PackingContext, packing_context
from engine.training import amp
from engine.training.loss import decoder_hidden

LEAK_TOLERANCE = 0.1  # ratio; isolated models measure 0 or rounding noise, leaking ones O(1)


@torch.no_grad()
def packing_leak(model: nn.Module, *, precision: str = "fp32") -> float:
    """The ratio of the module docstring for `model` (on its device, under `precision`'s autocast)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout: the forwards must differ only by what the row holds
    try:
        with amp.autocast(precision, device):
            first, second, other = (decoder_hidden(model, batch)[0].float() for batch in probe_batches(model))
    finally:
        model.train(was_training)
    b_first, b_second, b_other = first[5:9], second[3:7], other[3:7]
    leak = (b_first - b_second).abs().max()
    context = (b_second[1:] - b_other[1:]).abs().max()
    return (leak / torch.maximum(context, 1e-3 * b_second.abs().max()).clamp_min(1e-30)).item()


def probe_batches(model: nn.Module) -> list[dict]:
    """The probe's three packed rows (module docstring) as batches on the model's device (the fp16
    guard's first probe runs on them too, before this probe)."""
    device = next(model.parameters()).device
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    g = torch.Generator().manual_seed(0)
    a, b, c, e = (torch.randint(0, config.vocab_size, (1, n), generator=g) for n in (5, 4, 3, 2))
    b2 = b.clone()
    b2[0, 0] = (b[0, 0] + 1) % config.vocab_size
    rows = [(torch.cat([a, b], 1), (5, 4)), (torch.cat([c, b, e], 1), (3, 4, 2)),
            (torch.cat([c, b2, e], 1), (3, 4, 2))]
    return [_probe_batch(ids, lengths, device) for ids, lengths in rows]


def _probe_batch(ids: torch.Tensor, lengths: tuple[int, ...], device) -> dict:
    """A packed one-row batch as the loader makes it: restarted positions and the packing context."""
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = torch.full_like(ids, -100)
    return {"input_ids": ids.to(device), "position_ids": position_ids.to(device),
            "packing": packing_context(labels, [list(lengths)], num_tokens=ids.shape[1]).to(device)}


@torch.no_grad()
def tree_leak(model: nn.Module, *, precision: str = "fp32") -> float:
    """Does `model` honour tree documents (engine/model/prefix_tree.py)? The ratio of the module
    docstring for one tree row against the same tokens as plain documents:

        tree    [ a (4) | b (3) | c (2) ]    position_ids [0 1 2 3 | 4 5 6 | 4 5]
        alone   [ a (4) | c (2) ]            position_ids [0 1 2 3 4 5]
        other   [ a (4) | c' (2) ]           c' = c with another first token
        leak    = max |h_tree(a, c) - h_alone(a, c)|      (b must not reach c; a is a itself)
        context = max |h_alone(c)[1:] - h_other(c')[1:]|

    A model whose attention never receives the packing context (it reads the restarts of
    position_ids) or has a layer that mixes neighbouring tokens by their place in the row fails it;
    one that refuses tree documents (PackedAttentionError) gives inf."""
    device = next(model.parameters()).device
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.randint(0, config.vocab_size, (1, n), generator=g) for n in (4, 3, 2))
    c2 = c.clone()
    c2[0, 0] = (c[0, 0] + 1) % config.vocab_size
    tree = {"input_ids": torch.cat([a, b, c], 1).to(device),
            "position_ids": torch.tensor([[0, 1, 2, 3, 4, 5, 6, 4, 5]], device=device),
            "packing": PackingContext([[9]], torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 9, 0,
                                      trees=[[(4, (3, 2))]]).to(device)}
    was_training = model.training
    model.eval()
    try:
        with amp.autocast(precision, device):
            try:
                h_tree = decoder_hidden(model, tree)[0].float()
            except PackedAttentionError:
                return float("inf")
            h_alone, h_other = (decoder_hidden(model, _probe_batch(torch.cat([a, x], 1), (6,), device))[0].float()
                                for x in (c, c2))
    finally:
        model.train(was_training)
    mine = torch.cat([h_tree[:4], h_tree[7:]])
    leak = (mine - h_alone).abs().max()
    context = (h_alone[5:] - h_other[5:]).abs().max()
    return (leak / torch.maximum(context, 1e-3 * h_alone.abs().max()).clamp_min(1e-30)).item()


def packing_is_safe(model: nn.Module, *, precision: str = "fp32") -> tuple[bool, float]:
    """(ratio <= LEAK_TOLERANCE, ratio)."""
    ratio = packing_leak(model, precision=precision)
    return ratio <= LEAK_TOLERANCE, ratio


def packing_for(model: nn.Module, requested: bool, *, precision: str = "fp32", announce: bool = True) -> bool:
    """data.packing as it can be honoured: `requested` unless the probe finds that this model lets
    packed documents see each other; then False (padded rows), said once on stderr."""
    if not requested:
        return False
    safe, ratio = packing_is_safe(model, precision=precision)
    if not safe and announce:
        print(f"note: {type(model).__name__} lets the documents of a packed row see each other (probe ratio "
              f"{ratio:.2f}, engine/model/isolation.py): using padded rows instead (as data.packing=false)",
              file=sys.stderr)
    return safe
