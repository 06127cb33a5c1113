"""NEFTune: noisy input embeddings while fine-tuning (Jain et al. 2023, "NEFTune: Noisy Embeddings
Improve Instruction Finetuning"), scaled per packed document.

    x = embed(input_ids) + eps,   eps ~ U(-1, 1) * alpha / sqrt(L * d)        x, eps: [B, T, d]

d is the embedding width and L the length of the sequence a token belongs to. In the paper every
row is one sequence; in a packed row [doc 0 (n0) | doc 1 (n1) | ... | padding] each document is a
sequence of its own, so its tokens get alpha / sqrt(n_i * d), not the row's alpha / sqrt(T * d)
(transformers scaled by the row until PR #35799). The padding at a row's end is one more document
of its own: it carries no label and attends to nothing real, so its noise changes nothing.

The hook is an explicit forward pre-hook on the decoder (`model.get_decoder()`, what every
training forward calls: engine/training/loss.py::decoder_hidden): it swaps `input_ids` for noisy
`inputs_embeds`, reading the document lengths from the same forward's `packing=` context. It adds
noise only in training mode with gradients on: never in evaluation, generation or the DPO
reference forward (no_grad). The per-token lengths come from the context's `cu_seqlens`, already
on the device with the batch: no host sync.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from engine.model.packing import PackingContext


def noise_scale(packing: PackingContext | None, batch: int, length: int, alpha: float, dim: int,
                device: torch.device) -> Tensor:
    """[B, T, 1] fp32: alpha / sqrt(L * d) per token, L the token's document length (the row's
    length T when there is no packing context)."""
    if packing is None:
        return torch.full((batch, length, 1), alpha / (length * dim) ** 0.5, device=device)
    lengths = (packing.cu_seqlens[1:] - packing.cu_seqlens[:-1]).to(device=device, dtype=torch.float32)
    # each document's length repeated over its tokens; output_size (a host int) keeps it sync-free
    per_token = torch.repeat_interleave(lengths, lengths.long(), output_size=batch * length)
    return (alpha / (per_token * dim).sqrt()).view(batch, length, 1)


def _noisy_embeddings(alpha: float):
    def hook(decoder: nn.Module, args: tuple, kwargs: dict):
        if not (decoder.training and torch.is_grad_enabled()) or kwargs.get("inputs_embeds") is not None:
            return None
        if args:  # input_ids given positionally
            input_ids, args = args[0], args[1:]
        else:
            input_ids = kwargs.pop("input_ids", None)
        if input_ids is None:
            return None
        embeds = decoder.get_input_embeddings()(input_ids)                 # [B, T, d]
        B, T, d = embeds.shape
        scale = noise_scale(kwargs.get("packing"), B, T, alpha, d, embeds.device)
        noise = torch.empty_like(embeds).uniform_(-1.0, 1.0) * scale.to(embeds.dtype)
        kwargs["inputs_embeds"] = embeds + noise
        return args, kwargs
    return hook


def add_neftune(model: nn.Module, alpha: float) -> torch.utils.hooks.RemovableHandle:
    """Register NEFTune on `model`'s decoder (see the module docstring); `.remove()` the handle to undo."""
    if alpha <= 0:
        raise ValueError(f"NEFTune alpha must be > 0, got {alpha}")
    decoder = model.get_decoder()
    return decoder.register_forward_pre_hook(_noisy_embeddings(float(alpha)), with_kwargs=True)
