"""Log-probs of the labelled tokens (`token_logps`: GRPO's per token) and summed reply log-probs
of every sequence of a pair batch (`sequence_logps`: DPO / ORPO), for the policy and the reference.

    h      = decoder(input_ids, position_ids)              [B, T, H]  (packed rows: isolated documents)
    h_lab  = h.flatten(0, 1)[label_index]                  [N, H]     the packing context's host indices
    lp_i   = log softmax(f(h_lab_i W^T))[label_targets_i]  [N]        fp32, chunk by chunk
    logp_s = sum_{i: label_seq_i = s} lp_i                 [2P]       index_add_

Only the N labelled positions reach the lm_head, `chunk_size` rows at a time, each chunk under
non-reentrant activation checkpointing, so no [T, V] logits exist and backward keeps only the
[N, H] chunk inputs (a chunk's [C, V] logits are recomputed in backward).

The reference is the same network with the LoRA branches switched off (`adapters_disabled`), under
no_grad and in eval mode (no dropout), restored to training mode afterwards.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from engine.layers.lora import adapters_disabled
from engine.training.loss import decoder_hidden, logit_transform


def _token_logps(head, transform, h: Tensor, y: Tensor, temperature: float = 1.0) -> Tensor:
    """[C] fp32 log-probs of targets y [C] under f(head(h)) / temperature for h [C, H]."""
    z = head(h).float()
    if transform is not None:
        z = transform(z)
    if temperature != 1.0:
        z = z / temperature
    return z.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(z, dim=-1)


def token_logps(model, batch: dict, *, chunk_size: int | None = 1024, temperature: float = 1.0) -> Tensor:
    """[N] fp32 log-probs of the labelled tokens, in the packing context's label_index order
    (row-major), of logits / temperature (GRPO samples and scores at its temperature, as TRL)."""
    hidden = decoder_hidden(model, batch)
    head = model.get_output_embeddings()
    transform = logit_transform(model.config)
    packing = batch["packing"].to(hidden.device)
    index, targets = packing.label_index, packing.label_targets
    h = hidden.flatten(0, 1).index_select(0, index)  # [N, H]
    n = h.shape[0]
    step = n if not chunk_size else chunk_size
    parts = []
    for start in range(0, n, max(step, 1)):
        hs, ys = h[start:start + step], targets[start:start + step]
        if torch.is_grad_enabled() and chunk_size:
            parts.append(checkpoint(_token_logps, head, transform, hs, ys, temperature, use_reentrant=False))
        else:
            parts.append(_token_logps(head, transform, hs, ys, temperature))
    return torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)


def sequence_logps(model, batch: dict, *, chunk_size: int | None = 1024) -> Tensor:
    """[2P] fp32 summed reply log-probs: entries 0..P-1 the chosen sides, P..2P-1 the rejected."""
    logps = token_logps(model, batch, chunk_size=chunk_size)
    out = torch.zeros(2 * batch["num_pairs"], dtype=torch.float32, device=logps.device)
    return out.index_add(0, batch["label_seq"].to(logps.device), logps)


@torch.no_grad()
def reference_logps(model, batch: dict, *, chunk_size: int | None = 1024) -> Tensor:
    """[2P] summed reply log-probs of the base model: adapters off, no_grad, eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    try:
        with adapters_disabled(model):
            return sequence_logps(model, batch, chunk_size=chunk_size)
    finally:
        model.train(was_training)
