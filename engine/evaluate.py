"""Held-out evaluation: token-weighted loss and perplexity over a tokenized dataset.

The loss is sum(token losses) / count(loss tokens) over the whole file, so packed and padded
batching give the same number (a mean of per-batch means would not).
"""

from __future__ import annotations

import math

import torch

from engine import amp
from engine.distributed import DistContext


@torch.no_grad()
def heldout_loss(model, dataset, *, max_seq_len: int, batch_size: int, packing: bool, precision: str,
                 device: torch.device, pad_token_id: int, chunk_size: int | None = None,
                 ctx: DistContext | None = None) -> dict:
    """One pass over all of `dataset`; returns {"loss", "ppl", "tokens"}.

    Every rank evaluates the whole file (held-out sets are small; this keeps the number exact
    and independent of the world size)."""
    from engine.data import make_loader
    from engine.loss import causal_lm_loss

    loader = make_loader(dataset, max_seq_len=max_seq_len, micro_batch_size=batch_size, packing=packing,
                         seed=0, pad_token_id=pad_token_id, shuffle=False)
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for batch in loader.one_pass():
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with amp.autocast(precision, device):
            loss_sum, n = causal_lm_loss(model, batch, chunk_size=chunk_size)
        total += loss_sum.double()
        count += n
    model.train(was_training)
    loss = float(total.item()) / max(count, 1)  # sync: the result
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count}
