"""The peak-memory prediction of one training step (`predict`), and what the run config asks of it.

A step's peak, from the model's config alone (never its weights):

    peak = static + max(loss phase, backward phase), then x (1 + allocator slack) + CUDA context
    static         = base weights (16-bit, or 4-bit packed + quantization state) + float parts
                     + LoRA params + their grads + optimizer state
    loss phase     = saved activations + the loss's own peak (full [tokens, vocab] fp32 logits,
                     or one chunk of them)
    backward phase = saved activations + (with checkpointing) one block recomputed
                     + the backward's transient gradients of one block

How the saved activations are derived and checked: the CLI's docstring (engine/plan/__main__.py)
and docs/PLANNER.md.
"""


from __future__ import annotations

import math
import sys
import warnings
from dataclasses import asdict, dataclass
from engine.plan.shapes import ALLOCATOR_SLACK, CUDA_CONTEXT_BYTES, DTYPE_BYTES, GIB, OPTIM_8BIT_BLOCK, OPTIM_8BIT_MIN_SIZE, PlanError, QUANT_BLOCK, QUANT_BLOCK2, Shape, model_shape, resolve_targets
from engine.training import amp

# ----------------------------------------------------------------------------- activations

def block_saved_per_token(shape: Shape, targets: set, *, r: int, a: int, grad_on: bool,
                          repeat_kv: bool, dropout: bool, cuda: bool = True) -> tuple[int, bool]:
    """(bytes one decoder block keeps for backward per token, do grads flow after it?).

    Walks the block in forward order. An op saves tensors only once something before it (or
    its own LoRA) needs a gradient (`grad_on`): autograd saves only what the gradients of
    inputs that require grad need. `a` = bytes of the compute dtype, r = LoRA rank. Per op:
      RMSNorm           fp32 copy of its input (saved by pow and mul) + rsqrt [T, 1]   4h + 4
      LoRA on a linear  its input x, shared by the linears that read the same x       a*in
                        A x                                                          a*r
                        with dropout, per target: the mask (1 B) + the dropped copy   (1+a)*in
      frozen linear     nothing (no dW; dX needs only W)
      q/k RMSNorm       Qwen3, per head before RoPE: fp32 copies of q and k + rsqrt per head
      RoPE              nothing (q*cos + rot(q)*sin: cos, sin are constants)
      SDPA              q, k, v, out (out is also o_proj's input), logsumexp [heads] fp32;
                        k, v repeated to all heads when a mask forces `repeat_kv` (GQA);
                        Phi-3 without repeat: v is a view of the fused q|k|v output and
                        keeps all of it alive. Phi-3's RoPE ends in a cat, so q is laid out
                        [B, heads, T, hd] and the CPU kernel writes out that way: o_proj's
                        input is then a contiguous copy (CUDA kernels write [B, T, heads, hd])
      gated MLP         act input g, act(g), up u: 3*a*i (Phi-3: the gate|up output [2i]
                        + act(g)); g*u only when down_proj has LoRA (as its input)
    The float mask SDPA makes from a boolean one is per block too; the caller adds it.
    """
    h, i, nh, nkv, hd = shape.hidden, shape.intermediate, shape.heads, shape.kv_heads, shape.head_dim
    fan_in = {name: fin for name, fin, _, _ in shape.linears}

    def lora(names: list[str], input_saved_anyway: bool) -> int:
        hit = [n for n in names if n in targets]
        if not hit:
            return 0
        fin = fan_in[hit[0]]
        if dropout:
            return len(hit) * ((1 + a) * fin + a * r)
        return (0 if input_saved_anyway else a * fin) + len(hit) * a * r

    norm = 4 * h + 4
    attn_in = ["qkv_proj"] if shape.fused else ["q_proj", "k_proj", "v_proj"]
    mlp_in = ["gate_up_proj"] if shape.fused else ["gate_proj", "up_proj"]
    saved = norm if grad_on else 0
    saved += lora(attn_in, False)
    grad_on = grad_on or any(n in targets for n in attn_in)
    if grad_on:
        if shape.qk_norm:
            saved += (4 * hd + 4) * (nh + nkv)
        repeated = repeat_kv and nkv < nh
        if repeated:
            saved += a * 3 * nh * hd                          # q, repeated k, repeated v
        elif shape.fused:
            saved += a * (nh + nkv) * hd + a * (nh + 2 * nkv) * hd  # q, k (RoPE'd) + q|k|v
        else:
            saved += a * (nh + 2 * nkv) * hd
        saved += a * nh * hd + 4 * nh                         # out, logsumexp
    saved += lora(["o_proj"], grad_on and not (shape.family == "phi3" and not cuda))
    grad_on = grad_on or "o_proj" in targets
    saved += norm if grad_on else 0
    saved += lora(mlp_in, False)
    grad_on = grad_on or any(n in targets for n in mlp_in)
    if grad_on:
        saved += a * 3 * i
    saved += lora(["down_proj"], False)
    grad_on = grad_on or "down_proj" in targets
    return saved, grad_on


def block_backward_transient_per_token(shape: Shape, *, a: int, rs: int) -> int:
    """Gradients alive at once while one block runs backward, per token (an estimate, checked on
    CPU only as part of the whole step): the residual-stream gradient and the branch gradient
    (2 rs*h) plus the larger of the MLP's (grads of g*u, act(g) and u: 3 a*i) and attention's
    (dq, dk, dv, d_out over all heads: 4 a*heads*head_dim) intermediate gradients."""
    mlp = 3 * a * shape.intermediate
    attn = 4 * a * shape.heads * shape.head_dim
    return 2 * rs * shape.hidden + max(mlp, attn)


# ----------------------------------------------------------------------------- the prediction

@dataclass
class Breakdown:
    """Predicted GPU bytes of one training step, by what holds them (all ints, bytes).

    static: quantized_weights + quant_state + float_weights + lora_params + lora_grads +
    optimizer_state. dynamic: activations (at the end of forward, on the GPU) plus the larger of
    loss_peak and recompute_peak + backward_transient. total = (static + dynamic) * (1 + slack)
    + cuda_context. host_offloaded is the pinned CPU memory of offloaded checkpoints, not in total.
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
    peak_phase: str = ""

    @property
    def static(self) -> int:
        return (self.quantized_weights + self.quant_state + self.float_weights + self.lora_params
                + self.lora_grads + self.optimizer_state)

    @property
    def dynamic(self) -> int:
        return self.activations + max(self.loss_peak, self.recompute_peak + self.backward_transient)

    def as_dict(self) -> dict:
        return {**asdict(self), "static": self.static, "dynamic": self.dynamic}


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
            optimizer: str = "adamw", base_dtype: str | None = None, masked: bool = True,
            dropout: float = 0.0, double_quant: bool = True, cuda: bool = True) -> Breakdown:
    """Predicted peak memory of one LoRA/QLoRA training step (pure: config numbers in, bytes out).

    model_config: a transformers config (Llama, Mistral, Qwen2, Phi-3, Gemma). precision: the
    autocast dtype (fp16 | bf16 | fp32). base_dtype: dtype of the frozen float weights (default:
    the precision's). masked: a [B, 1, T, T] attention mask exists (packed rows or padding), so
    SDPA gets a float mask per block and GQA k/v are repeated. cuda=False drops the CUDA
    context and allocator slack (what a CPU measurement compares with).
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

    # activations, block by block
    blocks, grad_on, first_grad_block = [], False, None
    for layer, tgt in enumerate(per_layer):
        saved, after = block_saved_per_token(shape, tgt, r=r, a=a, grad_on=grad_on,
                                             repeat_kv=masked, dropout=dropout > 0, cuda=cuda)
        if after and first_grad_block is None:
            first_grad_block = layer
        # under 16-bit autocast the fp32 A and B are cast once per forward; mm saves the casts
        casts = sum(r * n for t in tgt for n in dims[t]) * a if a == 2 else 0
        blocks.append(saved * N + casts)
        grad_on = after
    float_mask = B * T * T * a if masked else 0     # SDPA's additive mask, made in every block
    bool_mask = B * T * T if masked else 0          # transformers' mask, shared by the blocks
    grad_blocks = 0 if first_grad_block is None else L - first_grad_block
    rope = 2 * N * shape.head_dim * rs              # cos, sin
    final = N * (4 * h + 4 + rs * h) if grad_on else 0  # final norm's fp32 copy + last hidden
    if activation_checkpointing:
        checkpoint = N * h * rs                     # each block's input, kept for the recompute
        # offloaded (engine/speed/offload.py): every checkpoint gets a pinned host copy; the GPU holds
        # about two at a time (one being copied out in forward, one coming back in backward)
        on_gpu = min(L, 2) if offload_activations else L
        out.host_offloaded = L * checkpoint if offload_activations else 0
        out.attention_masks = bool_mask
        out.activations = on_gpu * checkpoint + bool_mask + rope + final
        out.recompute_peak = max(blocks) + (float_mask if grad_blocks else 0)
    else:
        out.attention_masks = grad_blocks * float_mask
        out.activations = sum(blocks) + out.attention_masks + rope + final
    transient = block_backward_transient_per_token(shape, a=a, rs=rs) * N
    if method == "qlora":   # bitsandbytes dequantizes the whole weight for dX = dY W
        transient += max(fin * fout for _, fin, fout, _ in shape.linears) * a
    out.backward_transient = transient if grad_on else 0

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

    allocated = out.static + out.dynamic
    loss_phase = out.activations + out.loss_peak
    out.peak_phase = "loss" if loss_phase >= out.activations + out.recompute_peak + out.backward_transient else "backward"
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
                dropout=cfg.peft.dropout, double_quant=cfg.peft.double_quant, cuda=cuda,
                packing=cfg.data.packing)


def predict_for(model_config, seq_len: int, micro_batch: int, *, packing: bool = True, **settings) -> Breakdown:
    """predict() where the mask follows the data layout: packed rows always carry a
    block-diagonal mask; padded rows carry one when there is more than one row (padding)."""
    return predict(model_config, seq_len=seq_len, micro_batch=micro_batch,
                   masked=packing or micro_batch > 1, **settings)


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


def auto_micro_batch_size(cfg, model) -> int:
    """train.micro_batch_size=auto: the largest micro-batch the planner fits in
    train.memory_budget_gib at data.max_seq_len, for the model as built (its device decides the
    precision; on a CPU the same budget is used without CUDA context and slack), capped at
    MAX_AUTO_MICRO_BATCH. If even 1 does not fit, warns and returns 1."""
    import torch

    device = next(model.parameters()).device
    precision = amp.resolve_precision(cfg.train.precision, device)
    embed = model.get_input_embeddings().weight
    base = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(embed.dtype, precision)
    settings = plan_settings(cfg, precision=precision, base_dtype=base, cuda=device.type == "cuda")
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
