"""The peak-memory prediction of one training step (`predict`), and what the run config asks of it.

A step's peak, from the model's config alone (never its weights):

    peak = static + max(loss phase, backward phase), then x (1 + allocator slack) + CUDA context
    static         = base weights (16-bit, or 4-bit packed + quantization state) + float parts
                     + LoRA params + their grads + optimizer state
    loss phase     = saved activations + the loss's own peak (full [tokens, vocab] fp32 logits,
                     or one chunk of them)
    backward phase = saved activations - the final norm's copy and the last hidden state
                     + (with checkpointing) one block recomputed
                     + what one block's backward holds at its fullest moment

How the saved activations are derived and checked: the CLI's docstring (engine/plan/__main__.py)
and docs/PLANNER.md.
"""


from __future__ import annotations

import math
import sys
import warnings
from dataclasses import asdict, dataclass, field

from engine.model.tiling import TilingError, resolve_tile_tokens, tile_bounds
from engine.plan.block import NORM_BACKWARD, backward_stages, block_parts
from engine.plan.shapes import (ALLOCATOR_SLACK, CUDA_CONTEXT_BYTES, DTYPE_BYTES, GIB, OPTIM_8BIT_BLOCK,
                                OPTIM_8BIT_MIN_SIZE, QUANT_BLOCK, QUANT_BLOCK2, PlanError, model_shape,
                                resolve_targets)
from engine.training import amp

# ----------------------------------------------------------------------------- the prediction

@dataclass
class Breakdown:
    """Predicted GPU bytes of one training step, by what holds them (all ints, bytes).

    static: quantized_weights + quant_state + float_weights + lora_params + lora_grads +
    optimizer_state. dynamic: activations (at the end of forward, on the GPU) plus the largest of
    the loss phase (loss_peak), the final norm's backward (final_norm_backward) and the blocks'
    backward phase (recompute_peak + backward_transient, less final_hidden: the final norm's copy
    and the last hidden state, freed by then). total =
    (static + dynamic) * (1 + slack) + cuda_context. host_offloaded is the pinned CPU memory of
    offloaded checkpoints, not in total. terms: the dynamic part of the peak phase by what holds
    it (the largest is `dominant`); mlp_tile_tokens: the tile length planned (0: untiled).
    """
    quantized_weights: int = 0
    quant_state: int = 0
    float_weights: int = 0
    lora_params: int = 0
    lora_grads: int = 0
    optimizer_state: int = 0
    activations: int = 0
    attention_masks: int = 0
    recompute_peak: int = 0
    backward_transient: int = 0
    loss_peak: int = 0
    allocator_slack: int = 0
    cuda_context: int = 0
    total: int = 0
    host_offloaded: int = 0
    final_hidden: int = 0
    final_norm_backward: int = 0
    mlp_tile_tokens: int = 0
    norm_tile_tokens: int = 0
    fp32_weights: int = 0
    fp32_residual: int = 0
    peak_phase: str = ""
    terms: dict = field(default_factory=dict)

    @property
    def static(self) -> int:
        return (self.quantized_weights + self.quant_state + self.float_weights + self.lora_params
                + self.lora_grads + self.optimizer_state + self.fp32_weights)

    @property
    def backward_phase(self) -> int:
        return self.recompute_peak + self.backward_transient - self.final_hidden

    @property
    def dynamic(self) -> int:
        return self.activations + max(self.loss_peak, self.final_norm_backward, self.backward_phase)

    @property
    def dominant(self) -> str:
        return max(self.terms, key=self.terms.get) if self.terms else ""

    def as_dict(self) -> dict:
        return {**asdict(self), "static": self.static, "dynamic": self.dynamic, "dominant": self.dominant}


def _quant_state_bytes(numel: int, double_quant: bool) -> int:
    """bitsandbytes 4-bit state of one weight: absmax per 64-block (fp32; or uint8 + an fp32
    absmax per 256 of them + a 256-entry fp32 code + an fp32 offset with double quant) + the
    16-entry fp32 quant map (NF4/FP4 table)."""
    blocks = math.ceil(numel / QUANT_BLOCK)
    absmax = blocks + 4 * math.ceil(blocks / QUANT_BLOCK2) + 256 * 4 + 4 if double_quant else 4 * blocks
    return absmax + 16 * 4


def _optimizer_bytes(numels: list[int], optimizer: str) -> int:
    """AdamW's two moments: fp32 (adamw, paged_adamw_32bit) or bnb blockwise 8-bit (uint8 + an
    fp32 absmax per 256 values; tensors under 4096 values stay fp32)."""
    if optimizer in ("adamw", "paged_adamw_32bit"):
        return sum(8 * n for n in numels)
    if optimizer == "paged_adamw_8bit":
        return sum(2 * (n + 4 * math.ceil(n / OPTIM_8BIT_BLOCK)) if n >= OPTIM_8BIT_MIN_SIZE else 8 * n
                   for n in numels)
    raise PlanError(f"optim.name: {optimizer!r} is not adamw, paged_adamw_32bit or paged_adamw_8bit")


def predict(model_config, *, seq_len: int, micro_batch: int, method: str = "qlora", r: int = 16,
            targets="all-linear", precision: str = "fp16", activation_checkpointing: bool = False,
            offload_activations: bool = False, chunked_loss: bool = True, loss_chunk_size: int = 1024,
            optimizer: str = "adamw", base_dtype: str | None = None, masked: bool = True, per_document: bool = False,
            dropout: float = 0.0, double_quant: bool = True, mlp_tile_tokens=0, norm_tile_tokens=0,
            cuda: bool = True, fp32_weight_bytes: int = 0, fp32_residual_blocks: int = 0) -> Breakdown:
    """Predicted peak memory of one LoRA/QLoRA training step (pure: config numbers in, bytes out).

    model_config: a transformers config (Llama, Mistral, Qwen2, Phi-3, Gemma). precision: the
    autocast dtype (fp16 | bf16 | fp32). base_dtype: dtype of the frozen float weights (default:
    the precision's). masked: a [B, 1, T, T] attention mask exists (packed rows without the packed
    attention path, or padding), so SDPA gets a float mask per block and GQA k/v are repeated.
    per_document: packed rows on the engine's packed attention (no mask; SDPA per document). mlp_tile_tokens, norm_tile_tokens:
    `train.*_tile_tokens` (0, an int or "auto"; engine/model/tiling.py). cuda=False drops the CUDA
    context and allocator slack (what a CPU measurement compares with).
    fp32_weight_bytes, fp32_residual_blocks: what the fp16 guard keeps in fp32
    (engine/training/fp16_guard.py): the fp32 copies of its modules' weights (static), and the
    blocks whose residual stream is fp32, each saving its [tokens, h] input at 4 bytes instead of
    the base dtype's (a term of the activations; the fp32 modules' own larger activations are not
    modelled: a handful of modules beside the blocks' saved tensors).
    """
    if method not in ("lora", "qlora"):
        raise PlanError(f"peft.method: {method!r} is not lora or qlora")
    if precision not in DTYPE_BYTES:
        raise PlanError(f"train.precision: {precision!r} is not fp32, fp16 or bf16")
    if offload_activations and not activation_checkpointing:
        raise PlanError("train.offload_activations needs train.activation_checkpointing=true "
                        "(what is offloaded are the block checkpoints, engine/speed/offload.py)")
    if seq_len < 1 or micro_batch < 1:
        raise PlanError(f"seq_len and micro_batch must be >= 1, got {seq_len} and {micro_batch}")
    try:
        resolve_tile_tokens(mlp_tile_tokens, 1)
        resolve_tile_tokens(norm_tile_tokens, 1, "train.norm_tile_tokens")
    except TilingError as err:
        raise PlanError(str(err)) from None
    shape = model_shape(model_config)
    a = DTYPE_BYTES[precision]
    rs = DTYPE_BYTES[base_dtype or precision]      # the residual stream is in the base dtype
    h, V, L, B, T = shape.hidden, shape.vocab, shape.layers, micro_batch, seq_len
    N = B * T
    per_layer, head_lora = resolve_targets(shape, targets)
    out = Breakdown()

    # static: weights, LoRA, optimizer
    linear_numel = sum(fin * fout for _, fin, fout, _ in shape.linears)
    bias_numel = sum(fout for _, _, fout, bias in shape.linears if bias)
    embeddings = V * h * (1 if shape.tied else 2)
    norms = (2 * L + 1) * h
    if method == "qlora":
        out.quantized_weights = L * sum(math.ceil(fin * fout / 2) for _, fin, fout, _ in shape.linears)
        out.quant_state = L * sum(_quant_state_bytes(fin * fout, double_quant) for _, fin, fout, _ in shape.linears)
        out.float_weights = rs * (embeddings + norms + L * bias_numel)
    else:
        out.float_weights = rs * (embeddings + norms + L * (linear_numel + bias_numel))
    dims = {name: (fin, fout) for name, fin, fout, _ in shape.linears}
    lora_numels = [r * n for layer in per_layer for t in layer for n in dims[t]]
    lora_numels += [r * h, r * V] if head_lora else []
    out.lora_params = out.lora_grads = 4 * sum(lora_numels)
    out.optimizer_state = _optimizer_bytes(lora_numels, optimizer)

    # activations, block by block (engine/plan/block.py); a tiled module runs tiled only on calls of
    # more than one tile's tokens (engine/model/tiling.py), each of the near-equal tiles <= tile
    def tile_length(setting) -> int:
        t = resolve_tile_tokens(setting, h)
        return max(e - s for s, e in tile_bounds(N, t)) if t and N > t else 0

    tile = out.mlp_tile_tokens = tile_length(mlp_tile_tokens)
    norm_tile = out.norm_tile_tokens = tile_length(norm_tile_tokens)
    mlp_names = {"gate_proj", "up_proj", "gate_up_proj", "down_proj"}
    blocks, grad_on, first_grad_block = [], False, None
    for layer, tgt in enumerate(per_layer):
        parts, after = block_parts(shape, tgt, r=r, a=a, rs=rs, grad_on=grad_on, repeat_kv=masked,
                                   dropout=dropout > 0, tiled_mlp=tile > 0, tiled_norms=norm_tile > 0,
                                   per_document=per_document and not masked, cuda=cuda)
        if after and first_grad_block is None:
            first_grad_block = layer
        # under 16-bit autocast the fp32 A and B are cast once per forward and mm saves the casts
        # (not the tiled MLP's: its forward keeps nothing)
        cast = [t for t in tgt if not (tile and t in mlp_names)]
        casts = sum(r * n for t in cast for n in dims[t]) * a if a == 2 else 0
        stages = (backward_stages(shape, parts, a=a, rs=rs, tokens=N, tile_tokens=tile, norm_tile_tokens=norm_tile,
                                  repeat_kv=masked or per_document, cuda=cuda) if after else {})
        blocks.append((parts.total * N + casts, parts, casts, stages))
        grad_on = after
    float_mask = B * T * T * a if masked else 0     # SDPA's additive mask, made in every block
    bool_mask = B * T * T if masked else 0          # transformers' mask, shared by the blocks
    grad_blocks = 0 if first_grad_block is None else L - first_grad_block
    rope = 2 * N * shape.head_dim * rs              # cos, sin
    # the final norm's fp32 copy (tiled: its input) + the last hidden state: alive for the loss, freed
    # before the blocks' backward; the norm's own backward holds its temporaries (tiled: one tile's)
    out.final_hidden = N * ((rs * h if norm_tile else 4 * h + 4) + rs * h) if grad_on else 0
    if grad_on:
        out.final_norm_backward = (N * rs * h + norm_tile * (4 + NORM_BACKWARD) * h if norm_tile
                                   else N * NORM_BACKWARD * h)
    saved, parts, casts, stages = max(blocks, key=lambda b: b[0])
    stage = max(stages, key=stages.get) if stages else "mlp"
    if activation_checkpointing:
        checkpoint = N * h * rs                     # each block's input, kept for the recompute
        # offloaded (engine/speed/offload.py): every checkpoint gets a pinned host copy; the GPU holds
        # about two at a time (one being copied out in forward, one coming back in backward)
        on_gpu = min(L, 2) if offload_activations else L
        out.host_offloaded = L * checkpoint if offload_activations else 0
        out.attention_masks = bool_mask
        out.activations = on_gpu * checkpoint + bool_mask + rope + out.final_hidden
        # the input norm keeps the block input itself (the checkpoint) when tiled, or as its fp32
        # "copy" when the residual stream is fp32
        shared = (N * rs * h if norm_tile else N * 4 * h if rs == 4 else 0) if parts.norm_in else 0
        out.recompute_peak = saved - shared + (float_mask if grad_blocks else 0)
        held = {"block checkpoints": on_gpu * checkpoint, "attention masks": bool_mask + float_mask * (grad_blocks > 0),
                ("recomputed block: norms' inputs (tiled)" if norm_tile else "recomputed block: norms' fp32 copies"):
                N * (parts.norm_in + parts.norm_post) - shared,
                "recomputed block: attention (q, k, v, out)": N * (parts.attention + parts.qk_norm),
                "recomputed block: LoRA inputs and A x": N * (parts.attn_lora + parts.o_lora)
                + casts + (0 if tile else N * (parts.mlp_lora + parts.down_lora)),
                ("recomputed block: MLP input (tiled)" if tile else "recomputed block: MLP g, act(g), u"):
                N * (parts.mlp_input if tile else parts.mlp)}
    else:
        out.attention_masks = grad_blocks * float_mask
        out.activations = sum(b[0] for b in blocks) + out.attention_masks + rope + out.final_hidden
        held = {"saved activations of every block": sum(b[0] for b in blocks), "attention masks": out.attention_masks}
    transient = max(stages.values()) if stages else 0
    dequant = max(fin * fout for _, fin, fout, _ in shape.linears) * a if method == "qlora" else 0
    out.backward_transient = transient + dequant if grad_on else 0  # bitsandbytes dequantizes W for dX = dY W
    backward_terms = {**held, "RoPE cos/sin": rope,
                      "backward of one block: " + {"mlp": "one MLP tile" if tile else "MLP",
                                                   "post norm": "post-attention RMSNorm"}.get(stage, stage): transient,
                      "QLoRA dequantized weight": dequant}

    # the loss: lm_head + cross-entropy
    head_extra = 0
    if chunked_loss:
        C = -(-N // -(-N // loss_chunk_size)) if N else 0  # the largest of engine.training.loss.chunk_bounds' equal chunks
        # per chunk: the fp32 logits, whose storage then holds their own gradient (the softmax is
        # built in place, engine.training.loss._cross_entropy_and_grad), + under 16-bit autocast the 16-bit
        # logits / gradient beside them. A logit transform's output cannot take the softmax in
        # place (its backward may need it) and its gradient flows back through it: a scale or
        # divide adds 8 bytes per logit, soft-capping's three ops (z / cap, tanh, * cap) 16, the
        # 16-bit copy then overlapping (measured: 12 / 14 and 20 / 20 bytes in fp32 / bf16, small
        # Llama, tests/plan/test_plan.py). The labelled hidden rows [N, h] and their gradient stay.
        if shape.logit_softcap:
            per_logit = 20
        else:
            per_logit = 4 + (2 if a == 2 else 0) + (8 if shape.logit_transform else 0)
        out.loss_peak = C * V * per_logit + 2 * N * h * a
        rows = C
    else:
        # log_softmax output (saved) + its incoming grad + the logits' grad, all [N, V] fp32
        out.loss_peak = 3 * N * V * 4
        rows = N
    if head_lora and chunked_loss:
        # lm_head's LoRA branch (base output + the fused addmm's output, and their gradients)
        # adds at the chunk's peak, measured on CPU with the in-place softmax: 5.5 bytes per
        # logit in fp32, 1.25 under 16-bit autocast (small Phi-3, tests/plan/test_plan.py).
        # Unchunked, the peak is in backward after the branch's [N, V] forward tensors are gone.
        head_extra = int(rows * V * (5.5 if a == 4 else 1.25))
    out.loss_peak += head_extra

    out.fp32_weights = fp32_weight_bytes
    out.fp32_residual = min(fp32_residual_blocks, L) * N * h * max(0, 4 - rs)
    out.activations += out.fp32_residual
    allocated = out.static + out.dynamic
    phases = {"loss": out.loss_peak, "final norm": out.final_norm_backward, "backward": out.backward_phase}
    out.peak_phase = max(phases, key=phases.get)
    if out.peak_phase == "backward":
        out.terms = {k: v for k, v in backward_terms.items() if v}
    else:
        out.terms = {"activations at the end of forward": out.activations,
                     ("loss (lm_head + cross-entropy)" if out.peak_phase == "loss" else "final norm's backward"):
                     phases[out.peak_phase]}
    if cuda:
        out.allocator_slack = int(ALLOCATOR_SLACK * allocated)
        out.cuda_context = CUDA_CONTEXT_BYTES
    out.total = allocated + out.allocator_slack + out.cuda_context
    return out


# ----------------------------------------------------------------------------- run config -> plan

MAX_AUTO_MICRO_BATCH = 64
"""micro_batch_size=auto never goes above this: past it, grad_accum is the lever."""


def plan_settings(cfg, *, precision: str | None = None, base_dtype: str | None = None, cuda: bool = True) -> dict:
    """predict() keyword arguments (all but seq_len / micro_batch) from a RunConfig.

    precision "auto" plans for a T4 (fp16) unless `precision` says otherwise; model.dtype
    "auto" means the precision's dtype. `packing` decides whether a mask exists (see
    `predict_for`)."""
    p = precision or (cfg.train.precision if cfg.train.precision != "auto" else "fp16")
    base = base_dtype or (cfg.model.dtype if cfg.model.dtype != "auto" else p)
    return dict(method=cfg.peft.method, r=cfg.peft.r, targets=cfg.peft.targets, precision=p,
                base_dtype=base, activation_checkpointing=cfg.train.activation_checkpointing,
                offload_activations=cfg.train.offload_activations, chunked_loss=cfg.train.chunked_loss,
                loss_chunk_size=cfg.train.loss_chunk_size, optimizer=cfg.optim.name,
                dropout=cfg.peft.dropout, double_quant=cfg.peft.double_quant,
                mlp_tile_tokens=cfg.train.mlp_tile_tokens, norm_tile_tokens=cfg.train.norm_tile_tokens,
                cuda=cuda, packing=cfg.data.packing,
                packed_attention=cfg.speed.mode != "off" and "packed_attention" not in cfg.speed.disable)


def predict_for(model_config, seq_len: int, micro_batch: int, *, packing: bool = True, packed_attention: bool = True,
                **settings) -> Breakdown:
    """predict() where the attention follows the data layout: packed rows run the engine's packed
    attention (SDPA per document, no mask; speed switch packed_attention) or, with it off, carry
    transformers' block-diagonal mask; padded rows carry a mask when there is more than one row."""
    masked = (packing and not packed_attention) or (not packing and micro_batch > 1)
    return predict(model_config, seq_len=seq_len, micro_batch=micro_batch, masked=masked,
                   per_document=packing and packed_attention, **settings)


def max_micro_batch(model_config, seq_len: int, budget: int, *, limit: int = 4096, **settings) -> int:
    """Largest micro-batch whose predicted total fits `budget` bytes at `seq_len` (0: none)."""
    def fits(b: int) -> bool:
        return predict_for(model_config, seq_len, b, **settings).total <= budget

    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:  # fits(low), not fits(high)
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def max_seq_len(model_config, micro_batch: int, budget: int, *, step: int = 256, limit: int = 2**20,
                **settings) -> int:
    """Longest sequence (a multiple of `step`) whose predicted total fits `budget` (0: none)."""
    def fits(t: int) -> bool:
        return predict_for(model_config, t * step, micro_batch, **settings).total <= budget

    if not fits(1):
        return 0
    low, high = 1, 2
    while high * step <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit // step + 1)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low * step


def auto_micro_batch_size(cfg, model, *, fp32_weight_bytes: int = 0, fp32_residual_blocks: int = 0) -> int:
    """train.micro_batch_size=auto: the largest micro-batch the planner fits in
    train.memory_budget_gib at data.max_seq_len, for the model as built (its device decides the
    precision; on a CPU the same budget is used without CUDA context and slack), capped at
    MAX_AUTO_MICRO_BATCH. If even 1 does not fit, warns and returns 1. fp32_*: what the fp16 guard
    keeps in fp32 (see `predict`)."""
    import torch

    device = next(model.parameters()).device
    precision = amp.resolve_precision(cfg.train.precision, device)
    embed = model.get_input_embeddings().weight
    base = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(embed.dtype, precision)
    settings = plan_settings(cfg, precision=precision, base_dtype=base, cuda=device.type == "cuda")
    settings.update(fp32_weight_bytes=fp32_weight_bytes, fp32_residual_blocks=fp32_residual_blocks)
    budget = int(cfg.train.memory_budget_gib * GIB)
    best = max_micro_batch(model.config, cfg.data.max_seq_len, budget, limit=MAX_AUTO_MICRO_BATCH, **settings)
    if best == 0:
        need = predict_for(model.config, cfg.data.max_seq_len, 1, **settings).total
        warnings.warn(f"train.micro_batch_size=auto: even one row of {cfg.data.max_seq_len} tokens is predicted "
                      f"to need {need / GIB:.2f} GiB > train.memory_budget_gib={cfg.train.memory_budget_gib}; "
                      "using 1. Try train.activation_checkpointing=true, train.chunked_loss=true, "
                      "train.offload_activations=true or a smaller data.max_seq_len "
                      "(python -m engine.plan shows the breakdown)")
        return 1
    print(f"micro_batch_size=auto: {best} rows of {cfg.data.max_seq_len} tokens "
          f"(budget {cfg.train.memory_budget_gib} GiB, {precision}, {device.type})", file=sys.stderr)
    return best
