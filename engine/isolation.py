"""Does this model keep the documents of a packed row apart? A two-document probe.

Packed rows (engine/data/loader.py) rely on the model reading `position_ids`: positions restart at
each document, and transformers derives a block-diagonal causal mask from the restarts (or the
engine's packed attention splits at them). Most decoder families do (Llama, Mistral, Qwen, Phi,
Gemma, GPT-NeoX, Falcon, MoE models, ...). Some do not: OPT computes its learned positions from
the attention mask, BLOOM's ALiBi mask ignores position_ids. There a packed document attends to
the ones before it and sees shifted positions: training on such rows is silently wrong.

The probe runs the model's decoder (the training forward: `engine.loss.decoder_hidden`, no KV
cache) on a row holding two short random documents, on the second document alone, and on the
second document with its first token changed:

    packed row  [ a (5 tokens) | b (4 tokens) ]   position_ids [0 1 2 3 4 | 0 1 2 3]
    alone       [ b ]  and  [ b' ] (b with another first token), position_ids [0 1 2 3]
    leak    = max |h_packed(b) - h_alone(b)|          (what a does to b across the boundary)
    context = max |h_alone(b)[1:] - h_alone(b')[1:]|  (what one token of b's own does to the rest)
    ratio   = leak / max(context, 1e-3 max |h_alone(b)|)

An isolated model gives a leak of rounding noise, a ratio ~1e-5 in fp32 (0 where the kernels
are exact per row); a leaking one lets five foreign tokens move b about as much as one of its
own: a ratio of O(1), whatever the weights' scale (a randomly initialised model's attention
barely moves its hidden states, a trained one's a lot; the ratio measures against that).
Three forwards of at most 9 tokens, run once before training (and by `engine.evaluate`).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

LEAK_TOLERANCE = 0.1  # ratio; isolated models measure ~1e-5 or 0, leaking ones O(1)


@torch.no_grad()
def packing_leak(model: nn.Module, *, precision: str = "fp32") -> float:
    """The ratio of the module docstring for `model` (on its device, under `precision`'s autocast)."""
    from engine import amp
    from engine.loss import decoder_hidden

    device = next(model.parameters()).device
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, config.vocab_size, (1, n), generator=g) for n in (5, 4))
    b2 = b.clone()
    b2[0, 0] = (b[0, 0] + 1) % config.vocab_size
    rows = [(torch.cat([a, b], 1), torch.cat([torch.arange(5), torch.arange(4)])), (b, torch.arange(4)),
            (b2, torch.arange(4))]
    was_training = model.training
    model.eval()  # no dropout: the forwards must differ only by what the row holds
    try:
        with amp.autocast(precision, device):
            packed, alone, other = (decoder_hidden(model, {"input_ids": ids.to(device),
                                                           "position_ids": pos[None].to(device)})[0].float()
                                    for ids, pos in rows)
    finally:
        model.train(was_training)
    leak = (packed[5:] - alone).abs().max()
    context = (alone[1:] - other[1:]).abs().max()
    return (leak / torch.maximum(context, 1e-3 * alone.abs().max()).clamp_min(1e-30)).item()


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
              f"{ratio:.2f}, engine/isolation.py): using padded rows instead (as data.packing=false)",
              file=sys.stderr)
    return safe
