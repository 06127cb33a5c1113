"""Causal-LM loss: lm_head + cross-entropy, as a token *sum*, optionally chunked.

Conventions (docs/DESIGN.md): `labels` are already shifted (`labels[b, t]` is the token to
predict from position t, or -100), so the loss is a plain cross-entropy of `logits[b, t]`
against `labels[b, t]`:

    loss_sum = sum_{b,t: labels[b,t] != -100}  -log softmax(f(h[b,t] W^T))[labels[b,t]]

with `h` the decoder's last hidden state, `W` the lm_head and `f` the model's logit transform
(`logit_scale` multiply (Cohere), `logits_scaling` divide (Granite), Gemma-2 soft-capping
`cap * tanh(z / cap)`). It is returned as a fp32 sum together with the number of labelled
tokens; the training step divides once by the total count over all micro-batches (never a mean
of means: transformers #34191).

Chunked loss (the memory trick, `train.chunked_loss`): a vocabulary of 128k makes the fp32
logits of a 2,048-token row 1.05 GB, the largest tensor of a QLoRA step. The chunked path first
keeps only the labelled positions (`h[labels != -100]`, [N, H]: prompts and padding cost
nothing), then runs lm_head + cross-entropy `chunk_size` rows at a time inside one autograd
Function that computes each chunk's gradients right away (the fused linear-cross-entropy idea of
Liger-Kernel / Apple's CCE, here in plain PyTorch). Only one chunk's [chunk, V] logits (and their
gradient) exist at any time, in forward and in backward; what is kept for backward is the
[N, H] gradient of the hidden states and the lm_head's trainable-parameter gradients, no logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.model.attention import TREES_SEEN, PackedAttentionError, forward_mask
from engine.model.packing import PackingContext

IGNORE_INDEX = -100


@dataclass(frozen=True)
class StepKernels:
    """The loss's hooks for device-specific speed (filled by the speed plan, engine/speed/plan.py).

    cross_entropy: (z [C, V] in the head's dtype, y [C]) -> (sum CE in fp32, softmax - onehot in z's
        dtype) for chunks that need gradients (the math of `cross_entropy_and_grad_fused`, compiled);
        None: the eager fp32 path.
    max_chunk_bytes: the largest a chunk's logits may be (a CPU retaining host memory keeps each
        chunk in its heap); None: `chunk_size` rows alone decide.
    rollout_merge: GRPO's rollouts (engine/grpo/rollout.py): the layout of the merged LoRA decode
        copies ("in_out" | "out_in", engine/layers/decode_merge.py); "": LoRA decodes as a branch.
    rollout_dequantize: 4-bit bases get such a copy too (W_hat + s*B@A, 16-bit memory for the rollout).
    rollout_lean_decode: the rollouts' decode steps run engine/model/lean_decode.py's step (its own
        concatenated copies, in rollout_merge's layout) where the model's family is one it computes.
    forward_backward: the step's micro-batch forward + backward, with the signature of
        engine.training.step.forward_backward (speed.cuda_graphs: captured once per shape bucket and
        replayed, engine/speed/cuda_graphs.py); None: that eager function.
    """

    cross_entropy: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None
    max_chunk_bytes: int | None = None
    rollout_merge: str = ""
    rollout_dequantize: bool = False
    rollout_lean_decode: bool = False
    forward_backward: Callable | None = None


EAGER = StepKernels()


def logit_transform(config) -> Callable[[Tensor], Tensor] | None:
    """The model's map from lm_head outputs to logits, or None when it is the identity.

    Applied in the order the HF models do: `* logit_scale` (Cohere), `/ logits_scaling`
    (Granite), then soft-capping `cap * tanh(z / cap)` with `final_logit_softcapping` (Gemma 2/3).
    """
    scale = getattr(config, "logit_scale", None)
    divide = getattr(config, "logits_scaling", None)
    cap = getattr(config, "final_logit_softcapping", None)
    if scale is None and divide is None and cap is None:
        return None

    def transform(z: Tensor) -> Tensor:
        if scale is not None:
            z = z * scale
        if divide is not None:
            z = z / divide
        if cap is not None:
            z = cap * torch.tanh(z / cap)
        return z

    return transform


def _logits_fp32(head: nn.Module, hidden: Tensor, transform) -> Tensor:
    # The matmul may run in fp16/bf16 under autocast; the transform and the softmax run in fp32.
    logits = head(hidden).float()
    return transform(logits) if transform is not None else logits


def _cross_entropy_and_grad(z: Tensor, y: Tensor, *, in_place: bool, need_grad: bool, weight: Tensor | None = None):
    """(sum_i CE(z_i, y_i), softmax(z) - onehot(y) or None) for fp32 logits z [C, V], labels y [C];
    with `weight` [C] (1 = a real label, 0 = a graph bucket's padding entry) each row's loss and
    gradient are multiplied by it (on the device: no row is dropped, the shapes stay fixed).

    loss_i = m_i + log sum_v exp(z_iv - m_i) - z_i[y_i] with m_i = max_v z_iv. in_place: the
    softmax is built in z's own storage (z - m, exp, / sum), so the chunk makes no [C, V] tensor
    besides its logits: on a CPU every fresh [C, V] buffer (~69 MB at C = 350, V = 49k) comes
    from the kernel page by page, and `logsumexp` + `z - lse` made two of them, 15% of a SmolLM2
    step (a torch.profiler run of the quickstart step; README, Benchmarks). Only allowed when nothing autograd
    saved aliases z; the caller passes False under a logit transform, whose last op might have saved
    its output (autograd would then refuse the in-place change with an error).
    """
    target = z.gather(1, y[:, None]).squeeze(1)                    # [C]
    m = z.amax(dim=-1, keepdim=True)                              # [C, 1]
    e = (z.sub_(m) if in_place else z - m).exp_()                 # [C, V] exp(z - m)
    total = e.sum(dim=-1, keepdim=True)                           # [C, 1]
    per_row = m.squeeze(1) + total.squeeze(1).log() - target      # [C]
    loss = (per_row * weight).sum() if weight is not None else per_row.sum()
    if not need_grad:
        return loss, None
    grad = e.div_(total)                                          # softmax, in e's storage
    grad[torch.arange(len(y), device=y.device), y] -= 1.0
    if weight is not None:
        grad.mul_(weight[:, None])
    return loss, grad


def cross_entropy_and_grad_fused(z: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(sum_i CE(z_i, y_i) in fp32, softmax(z) - onehot(y) in z's dtype) for logits z [C, V] in
    any float dtype: the math of `_cross_entropy_and_grad`, written for inductor
    (speed.compile, engine/speed/compiled.py), which makes it one reduction pass over z (max and
    sum of exp, in fp32) and one pointwise pass writing the gradient already cast to z's dtype,
    the dtype the lm_head's backward takes. No fp32 [C, V] copy of z is ever stored."""
    zf = z.float()
    m = zf.amax(dim=-1, keepdim=True)                                          # [C, 1]
    lse = m + (zf - m).exp().sum(dim=-1, keepdim=True).log()                   # [C, 1]
    loss = (lse.squeeze(1) - zf.gather(1, y[:, None]).squeeze(1)).sum()
    is_target = torch.arange(z.shape[1], device=z.device)[None, :] == y[:, None]  # [C, V], never stored
    grad = ((zf - lse).exp() - is_target.float()).to(z.dtype)
    return loss, grad


def chunk_bounds(n: int, chunk_size: int, row_bytes: int, max_chunk_bytes: int | None = None) -> list[tuple[int, int]]:
    """[start, end) of the loss chunks over n labelled rows: at most `chunk_size` rows each and,
    given `max_chunk_bytes`, at most as many as keep the chunk's logits (`row_bytes` per row) within
    it. Chunks are equal to within one row: 403 rows under a 341-row limit -> 202 + 201."""
    rows = chunk_size if max_chunk_bytes is None or row_bytes <= 0 else max(1, min(chunk_size, max_chunk_bytes // row_bytes))
    count = -(-n // rows)
    edges = [n * i // count for i in range(count + 1)] if count else [0]
    return list(zip(edges[:-1], edges[1:]))


def _logit_row_bytes(head: nn.Module, hidden: Tensor, fused: bool) -> int:
    """Bytes of one row of a chunk's largest [C, V] tensor: fp32 logits, or the head's output
    dtype (autocast's, else the hidden states') for the fused kernel; 0 if V is not known."""
    vocab = getattr(head, "out_features", None)
    if not isinstance(vocab, int):
        weight = getattr(head, "weight", None)
        vocab = weight.shape[0] if isinstance(weight, Tensor) and weight.dim() == 2 else 0
    if not fused:
        return 4 * vocab
    kind = hidden.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype
    return vocab * dtype.itemsize


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum CE(f(head(hidden)), labels) over rows, chunk by chunk, gradients computed in forward.

    forward(hidden [N, H], labels [N], mask [N] or None, head, transform, chunk_size, kernels, *params)
    -> 0-dim fp32 sum (rows where mask is 0 add nothing: a CUDA graph bucket's padding entries).
    `params` are the head's trainable parameters (e.g. LoRA A/B on a targeted lm_head): they are
    inputs of the Function so autograd routes their gradients. For each chunk the forward runs
    the head under `enable_grad` on a detached slice, the cross-entropy and its gradient
    `softmax - onehot` by hand (in the logits' own storage, or one more [C, V] buffer under a
    logit transform), and `torch.autograd.grad` through the head at once, so the
    chunk's logits are freed before the next chunk starts: the peak is about one [C, V] fp32
    tensor (two with a transform).
    `kernels.cross_entropy` (a fused kernel, no transform): the head's output is not upcast; the
    kernel reads it in its own dtype and returns the gradient in it.
    Backward only scales the stored gradients by the incoming gradient (the loss is linear in
    its own output, so e.g. a GradScaler's scale is applied exactly).
    """

    @staticmethod
    def forward(ctx, hidden, labels, mask, head, transform, chunk_size, kernels, *params):
        need_hidden = ctx.needs_input_grad[0]
        need_params = [ctx.needs_input_grad[7 + i] for i in range(len(params))]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        # parameter gradients accumulate over chunks: keep them in fp32, cast once at the end
        grad_params = [torch.zeros_like(p, dtype=torch.float32) if need else None
                       for p, need in zip(params, need_params)]
        wrt = [p for p, need in zip(params, need_params) if need]
        # the fused kernel returns a sum: a masked chunk takes the eager path, which weights each row
        fused = kernels.cross_entropy is not None and transform is None and bool(need_hidden or wrt) and mask is None
        for start, end in chunk_bounds(hidden.shape[0], chunk_size, _logit_row_bytes(head, hidden, fused),
                                       kernels.max_chunk_bytes):
            h = hidden[start:end].detach().requires_grad_(need_hidden)  # [C, H]
            y = labels[start:end]  # [C]
            inputs = ([h] if need_hidden else []) + wrt
            with torch.set_grad_enabled(bool(inputs)):
                # [C, V]: the only big tensor; fp32, or the head's own dtype for the fused kernel
                logits = head(h) if fused else _logits_fp32(head, h, transform)
            z = logits.detach()
            if fused:
                loss, grad_z = kernels.cross_entropy(z, y)
            else:
                # cross-entropy by hand: dloss/dz_i = softmax(z_i) - onehot(y_i), built in z's
                # storage; not with a logit transform, whose last op could have saved z for its backward
                loss, grad_z = _cross_entropy_and_grad(z, y, in_place=transform is None, need_grad=bool(inputs),
                                                       weight=None if mask is None else mask[start:end])
            if inputs:
                grads = list(torch.autograd.grad(logits, inputs, grad_outputs=grad_z))
                del grad_z
                if need_hidden:
                    grad_hidden[start:end] = grads.pop(0)
                for i, need in enumerate(need_params):
                    if need:
                        grad_params[i] += grads.pop(0)
            total += loss
            del logits, z  # free this chunk's [C, V] before the next one is made
        grad_params = [g.to(p.dtype) if g is not None else None for g, p in zip(grad_params, params)]
        ctx.save_for_backward(grad_hidden, *[g for g in grad_params if g is not None])
        ctx.need_hidden, ctx.need_params = need_hidden, need_params
        return total

    @staticmethod
    def backward(ctx, grad_output):
        saved = list(ctx.saved_tensors)
        grad_hidden = saved.pop(0)
        out = [grad_hidden * grad_output.to(grad_hidden.dtype) if ctx.need_hidden else None,
               None, None, None, None, None, None]
        for need in ctx.need_params:
            out.append(saved.pop(0) * grad_output if need else None)
        return tuple(out)


def lm_head_loss(hidden: Tensor, labels: Tensor, head: nn.Module, *, transform=None,
                 chunk_size: int | None = None, kernels: StepKernels = EAGER,
                 packing: PackingContext | None = None) -> Tensor:
    """Summed fp32 cross-entropy of `f(head(hidden))` against already-shifted `labels`.

    hidden [B, T, H], labels [B, T] (-100 = no loss). chunk_size None: full logits [B, T, V];
    else labelled rows only, `chunk_size` at a time (see module docstring), computed with
    `kernels`. The labelled rows are the packing context's `label_index` (found by the loader on
    the host: no device sync); without a context they are found here (one sync, deliberate: tests
    and callers without a loader). A batch without labelled tokens gives an exact 0 that is still
    connected to the graph (zero grads, no NaN).
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"lm_head_loss: hidden states {tuple(hidden.shape)} do not match "
                         f"labels {tuple(labels.shape)} (expected [B, T, H] and [B, T])")
    if chunk_size is None:
        logits = _logits_fp32(head, hidden, transform)  # [B, T, V]
        return F.cross_entropy(logits.flatten(0, 1), labels.to(hidden.device).flatten(), reduction="sum",
                               ignore_index=IGNORE_INDEX)
    if chunk_size < 1:
        raise ValueError(f"lm_head_loss: chunk_size must be >= 1 or None, got {chunk_size} "
                         "(config key train.loss_chunk_size)")
    if packing is not None:
        selected = hidden.flatten(0, 1).index_select(0, packing.label_index)  # [N, H]
        targets = packing.label_targets                                       # [N]
        mask = packing.label_mask                                             # [N] or None
    else:
        labels = labels.to(hidden.device)
        keep = labels != IGNORE_INDEX  # [B, T]; boolean indexing: a host sync, deliberate (no loader here)
        selected, targets, mask = hidden[keep], labels[keep], None
    # under no_grad (evaluation) no gradient is wanted, not even for a LoRA-targeted head's
    # parameters (the Function would otherwise compute theirs: its inputs still require grad)
    params = [p for p in head.parameters() if p.requires_grad] if torch.is_grad_enabled() else []
    return _ChunkedLinearCrossEntropy.apply(selected, targets, mask, head, transform, chunk_size, kernels, *params)


def decoder_hidden(model: nn.Module, batch: dict) -> Tensor:
    """Last hidden state [B, T, H] of the decoder body (no lm_head, no KV cache) for a batch's
    input_ids / position_ids / attention_mask (those present); its packing context, if any, goes
    down to every attention call (`packing=`, engine/model/attention.py)."""
    inputs = {"input_ids": batch["input_ids"]}
    for key in ("position_ids", "attention_mask", "packing"):
        if batch.get(key) is not None:
            inputs[key] = batch[key]
    if "attention_mask" not in inputs:
        mask = forward_mask(model, batch.get("packing"), batch["input_ids"])
        if mask is not None:
            inputs["attention_mask"] = mask
    # use_cache=False: with a cache transformers 5 ignores the restarted position_ids of packed
    # rows and lets documents attend to each other (FIELD.md bug 2).
    out = model.get_decoder()(**inputs, use_cache=False)
    packing = inputs.get("packing")
    if packing is not None and packing.has_trees and not packing.kernel_cache.get(TREES_SEEN):
        # tree documents read as plain ones (split at their position restarts) attend wrongly:
        # refused rather than trained on (host facts only, no device read)
        raise PackedAttentionError(
            f"{type(model).__name__}: the batch's tree documents (GRPO's shared prompts) never reached the "
            "engine's packed attention (this model's attention does not take the packing context); "
            "train with objective.share_prompt=false")
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def causal_lm_loss(model: nn.Module, batch: dict, *, chunk_size: int | None,
                   kernels: StepKernels = EAGER) -> tuple[Tensor, int]:
    """(loss_sum, n_loss_tokens) for one micro-batch: fp32 0-dim sum and a python int.

    Runs `model.get_decoder()` on input_ids / position_ids / attention_mask (those present) with
    `use_cache=False`, then `lm_head_loss` with `model.get_output_embeddings()` (called as a
    module, so a LoRA-wrapped lm_head works) and the config's logit transform.
    """
    if "input_ids" not in batch or "labels" not in batch:
        raise KeyError(f"causal_lm_loss: batch needs 'input_ids' and 'labels', has {sorted(batch)}")
    hidden = decoder_hidden(model, batch)
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"causal_lm_loss: {type(model).__name__} has no output embeddings (lm_head)")
    packing = batch.get("packing")
    loss_sum = lm_head_loss(hidden, batch["labels"], head, transform=logit_transform(model.config),
                            chunk_size=chunk_size, kernels=kernels, packing=packing)
    n = batch.get("num_loss_tokens")
    if n is None:
        n = int((batch["labels"] != IGNORE_INDEX).sum())  # host sync; engine.data provides it
    return loss_sum, int(n)


def per_token_losses(model: nn.Module, batch: dict) -> Tensor:
    """Cross-entropy of every position, [B, T] fp32, 0 where the label is -100 (tests, evaluation)."""
    hidden = decoder_hidden(model, batch)
    labels = batch["labels"].to(hidden.device)
    logits = _logits_fp32(model.get_output_embeddings(), hidden, logit_transform(model.config))
    losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none",
                             ignore_index=IGNORE_INDEX)
    return losses.view(labels.shape)
