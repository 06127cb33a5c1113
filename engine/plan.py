"""`python -m engine.plan`: predict the peak GPU memory of a LoRA / QLoRA step before running it.

Reads only the model's config (config.json, GGUF metadata, or a built-in `shape:NAME`), never
its weights, and adds up what a training step holds at its worst moment (FIELD.md bug 9:
nobody predicts memory before the run):

    peak = static + max(loss phase, backward phase), then x (1 + allocator slack) + CUDA context
    static         = base weights (16-bit, or 4-bit packed + quantization state) + float parts
                     + LoRA params + their grads + optimizer state
    loss phase     = saved activations + the loss's own peak (full [tokens, vocab] fp32 logits,
                     or one chunk of them)
    backward phase = saved activations + (with checkpointing) one block recomputed
                     + the backward's transient gradients of one block

Saved activations are derived op by op from what autograd keeps for backward in the
transformers 5 Llama-family blocks with our `LoRALinear` (see `block_saved_per_token`); the
same per-op list was checked against `torch.autograd.graph.saved_tensors_hooks` counts and a
live-tensor tracker on CPU (tests/test_plan.py, docs/PLANNER.md). Everything CUDA-specific
(context, allocator slack, SDPA kernel choice) is a stated assumption, not a measurement.

Usage (the same Hydra config and overrides as `python -m engine.train`):
    python -m engine.plan model.path=shape:llama-3.1-8b peft=qlora data.max_seq_len=8192 \
        train.micro_batch_size=1 train.activation_checkpointing=true [+plan_json=plan.json]
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import warnings
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

GIB = 2**30
CUDA_CONTEXT_BYTES = int(0.45 * GIB)
"""CUDA context + cuBLAS workspace + kernel images on a T4 with torch 2.x: outside the caching
allocator but inside the 14.7 GiB the card shows (assumption, typical nvidia-smi reading)."""
ALLOCATOR_SLACK = 0.08
"""Fragmentation of the caching allocator: reserved / allocated - 1 at the peak (assumption)."""
QUANT_BLOCK = 64      # bitsandbytes 4-bit block size (Params4bit default)
QUANT_BLOCK2 = 256    # double-quant: blocks of absmax constants
OPTIM_8BIT_BLOCK = 256     # bnb blockwise 8-bit optimizer state: one fp32 absmax per 256 values
OPTIM_8BIT_MIN_SIZE = 4096  # bnb keeps smaller tensors' state in fp32
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


class PlanError(ValueError):
    """The planner cannot describe this model or setting; the message names the key."""


# ----------------------------------------------------------------------------- model shapes

@dataclass(frozen=True)
class Shape:
    """What memory depends on, read from a transformers config. `linears`: (name, in, out, bias)
    of one decoder block, in forward order; `fused`: Phi-3's qkv_proj / gate_up_proj."""
    family: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    fused: bool
    linears: tuple
    logit_transform: bool = False  # logit scale / soft-capping (engine.loss.logit_transform is not None)
    qk_norm: bool = False  # Qwen3: RMSNorm of each head's q and k before RoPE
    logit_softcap: bool = False  # final_logit_softcapping: cap * tanh(z / cap), three ops on [C, V]


SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "granite", "phi3", "gemma")


def model_shape(config) -> Shape:
    """The `Shape` of a Llama-family HF config (llama, mistral, qwen2, qwen3, smollm3, granite, phi3, gemma)."""
    family = getattr(config, "model_type", None)
    if family not in SUPPORTED:
        raise PlanError(f"model.path: model_type {family!r} is not one the planner describes "
                        f"(supported: {', '.join(SUPPORTED)})")
    h, i, nh = config.hidden_size, config.intermediate_size, config.num_attention_heads
    nkv = getattr(config, "num_key_value_heads", None) or nh
    hd = getattr(config, "head_dim", None) or h // nh
    q, kv = nh * hd, nkv * hd
    if family == "phi3":
        linears = (("qkv_proj", h, q + 2 * kv, False), ("o_proj", q, h, False),
                   ("gate_up_proj", h, 2 * i, False), ("down_proj", i, h, False))
    else:
        qkv_bias = family == "qwen2" or bool(getattr(config, "attention_bias", False))
        o_bias = bool(getattr(config, "attention_bias", False)) and family != "qwen2"
        mlp_bias = bool(getattr(config, "mlp_bias", False))
        linears = (("q_proj", h, q, qkv_bias), ("k_proj", h, kv, qkv_bias), ("v_proj", h, kv, qkv_bias),
                   ("o_proj", q, h, o_bias), ("gate_proj", h, i, mlp_bias), ("up_proj", h, i, mlp_bias),
                   ("down_proj", i, h, mlp_bias))
    from engine.loss import logit_transform  # torch is loaded already (transformers' config)

    transform = logit_transform(config) is not None
    return Shape(family, h, i, config.num_hidden_layers, nh, nkv, hd, config.vocab_size,
                 bool(getattr(config, "tie_word_embeddings", False)), family == "phi3", linears, transform,
                 qk_norm=family == "qwen3",
                 logit_softcap=getattr(config, "final_logit_softcapping", None) is not None)


def _known_shapes() -> dict:
    """Builders of the real configs of the models the docs answer for (no download)."""
    from transformers import LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

    return {
        # meta-llama/Llama-3.1-8B(-Instruct) config.json
        "llama-3.1-8b": lambda: LlamaConfig(
            vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
            rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128009,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192}),
        # microsoft/Phi-3-mini-128k-instruct. Its longrope factor lists (48 values each) change
        # no tensor size; they are left at 1.0 here, so a model built from this shape is only
        # right in shape, not in its position encoding beyond 4k.
        "phi-3-mini": lambda: Phi3Config(
            vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=131072,
            original_max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=32000, pad_token_id=32000,
            rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                             "short_factor": [1.0] * 48, "long_factor": [1.0] * 48, "factor": 32.0,
                             "original_max_position_embeddings": 4096}),
        # mistralai/Mistral-7B-v0.3
        "mistral-7b": lambda: MistralConfig(
            vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
            rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        # Qwen/Qwen2.5-7B-Instruct
        "qwen2.5-7b": lambda: Qwen2Config(
            vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
            num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
            rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        # HuggingFaceTB/SmolLM2-135M-Instruct
        "smollm2-135m": lambda: LlamaConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
            rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
            rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    }


KNOWN_SHAPE_NAMES = ("llama-3.1-8b", "phi-3-mini", "mistral-7b", "qwen2.5-7b", "smollm2-135m")


def known_config(name: str):
    """A real model's transformers config by short name (see KNOWN_SHAPE_NAMES)."""
    builders = _known_shapes()
    if name not in builders:
        raise PlanError(f"model.path: unknown shape {name!r} (known: {', '.join(builders)})")
    return builders[name]()


def load_model_config(path: str):
    """HF config from `shape:NAME`, "default", an HF directory (config.json) or a .gguf file
    (its metadata through transformers' GGUF loader). Never reads weights."""
    from transformers import AutoConfig

    if path.startswith("shape:"):
        return known_config(path[len("shape:"):])
    if path == "default":
        from engine.model import default_model_path
        path = default_model_path()
    if os.path.isfile(path) and path.endswith(".gguf"):
        return AutoConfig.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        return AutoConfig.from_pretrained(path)
    raise PlanError(f"model.path: {path!r} is not shape:NAME, an HF model directory with config.json, "
                    "or a .gguf file")


# ----------------------------------------------------------------------------- LoRA targets

def _module_names(shape: Shape) -> list[str]:
    """Full module names of the planner's linears, as transformers names them."""
    names = []
    for layer in range(shape.layers):
        for name, *_ in shape.linears:
            part = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj") else "mlp"
            names.append(f"model.layers.{layer}.{part}.{name}")
    return names + ["lm_head"]


def resolve_targets(shape: Shape, targets) -> tuple[list[set], bool]:
    """(per-layer sets of targeted linear names, lm_head targeted?), as `engine.lora.find_targets`
    selects them: "all-linear" = every block linear, suffixes, or "re:<regex>" on full names."""
    names = _module_names(shape)
    if isinstance(targets, str) and targets.startswith("re:"):
        try:
            pattern = re.compile(targets[3:])
        except re.error as err:
            raise PlanError(f"peft.targets: regex {targets[3:]!r} does not compile: {err}") from None
        chosen = {n for n in names if pattern.fullmatch(n)}
    else:
        chosen = set()
        for target in [targets] if isinstance(targets, str) else list(targets):
            if target == "all-linear":
                hits = set(names[:-1])
            else:
                hits = {n for n in names if n == target or n.endswith("." + target)}
            if not hits:
                leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
                raise PlanError(f"peft.targets: {target!r} matches no linear of a {shape.family} model "
                                f"(linear names end in {leaves})")
            chosen |= hits
    if not chosen:
        raise PlanError(f"peft.targets: {targets!r} matches no linear layer")
    per_layer = [set() for _ in range(shape.layers)]
    for n in chosen - {"lm_head"}:
        per_layer[int(n.split(".")[2])].add(n.rsplit(".", 1)[-1])
    return per_layer, "lm_head" in chosen


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
                        "(what is offloaded are the block checkpoints, engine/offload.py)")
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
        # offloaded (engine/offload.py): every checkpoint gets a pinned host copy; the GPU holds
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
        C = -(-N // -(-N // loss_chunk_size)) if N else 0  # the largest of engine.loss.chunk_bounds' equal chunks
        # per chunk: the fp32 logits, whose storage then holds their own gradient (the softmax is
        # built in place, engine.loss._cross_entropy_and_grad), + under 16-bit autocast the 16-bit
        # logits / gradient beside them. A logit transform's output cannot take the softmax in
        # place (its backward may need it) and its gradient flows back through it: a scale or
        # divide adds 8 bytes per logit, soft-capping's three ops (z / cap, tanh, * cap) 16, the
        # 16-bit copy then overlapping (measured: 12 / 14 and 20 / 20 bytes in fp32 / bf16, small
        # Llama, tests/test_plan.py). The labelled hidden rows [N, h] and their gradient stay.
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
        # logit in fp32, 1.25 under 16-bit autocast (small Phi-3, tests/test_plan.py).
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


# ----------------------------------------------------------------------------- measurement (CPU or GPU)

class LiveBytes:
    """Context manager counting the bytes of tensor storages created inside it that are still
    alive, and their peak. Storages that existed before (weights, inputs) are not counted.

    A TorchDispatchMode sees every op's outputs (forward and backward); a storage is counted
    once, when first seen, and uncounted by a weakref finalizer when it is freed (torch keeps one
    Python object per storage, so the finalizer fires exactly when the memory goes back).
    """

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self
        self.current = self.peak = 0
        self._sizes: dict[int, int] = {}
        self._before: set[int] = set()

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                result = func(*args, **(kwargs or {}))
                for t in tree_flatten(result)[0]:
                    if hasattr(t, "untyped_storage") and t.device.type != "meta":
                        tracker._see(t)
                return result

        self._mode = _Mode()

    def exclude(self, tensors) -> None:
        """Never count these tensors' storages (call before entering, e.g. with the parameters)."""
        for t in tensors:
            self._before.add(t.untyped_storage().data_ptr())

    def _see(self, t) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._sizes or storage.data_ptr() in self._before or storage.nbytes() == 0:
            return
        self._sizes[key] = storage.nbytes()
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._sizes.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def saved_tensor_bytes(fn, exclude=()) -> tuple[object, int]:
    """(fn(), bytes of the distinct storages autograd saved for backward while fn ran), counted
    with `torch.autograd.graph.saved_tensors_hooks` and deduplicated by storage data_ptr;
    storages of `exclude` (the parameters) are skipped. Does not see inside checkpointed blocks."""
    import torch

    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip and ptr not in seen:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(seen.values())


def measure_step(model, batch: dict, *, chunk_size: int | None, precision: str = "fp32") -> dict:
    """Measured bytes of one forward + backward of `model` (our LoRA, our loss) on `batch`:
    saved (saved_tensors_hooks, decoder forward), activations (storages alive after the decoder
    forward, checkpoints and masks included), loss_peak (peak of lm_head + cross-entropy forward
    and backward on the final hidden state, above what was alive before), step_peak (peak of the
    whole forward + backward above the start). Runs under autocast when precision is 16-bit."""
    import torch

    from engine.loss import lm_head_loss, logit_transform

    device = next(model.parameters()).device
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    params = list(model.parameters()) + list(model.buffers())
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "position_ids", "attention_mask")}

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def decoder():
        with autocast():
            return model.get_decoder()(**inputs, use_cache=False).last_hidden_state

    _, saved = saved_tensor_bytes(decoder, exclude=params + list(inputs.values()))
    model.zero_grad(set_to_none=True)
    tracker = LiveBytes()
    tracker.exclude(params + list(batch_tensors(batch)))
    with tracker:
        hidden = decoder()
        activations = tracker.current
    del hidden
    model.zero_grad(set_to_none=True)

    head, transform = model.get_output_embeddings(), logit_transform(model.config)
    with torch.no_grad():
        hidden = decoder()
    hidden.requires_grad_(True)
    loss_tracker = LiveBytes()
    loss_tracker.exclude(params + list(batch_tensors(batch)) + [hidden])
    with loss_tracker:
        with autocast():
            loss = lm_head_loss(hidden, batch["labels"], head, transform=transform, chunk_size=chunk_size)
        loss.backward()
    del loss, hidden
    model.zero_grad(set_to_none=True)

    step_tracker = LiveBytes()
    step_tracker.exclude(params + list(batch_tensors(batch)))
    with step_tracker:
        from engine.loss import causal_lm_loss
        with autocast():
            loss, _ = causal_lm_loss(model, batch, chunk_size=chunk_size)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return {"saved": saved, "activations": activations, "loss_peak": loss_tracker.peak,
            "step_peak": step_tracker.peak}


def batch_tensors(batch: dict) -> list:
    return [v for v in batch.values() if hasattr(v, "untyped_storage")]


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

    from engine import amp

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


# ----------------------------------------------------------------------------- report

ROWS = (("quantized_weights", "base weights, 4-bit packed"), ("quant_state", "4-bit quantization state"),
        ("float_weights", "16/32-bit weights (embeddings, norms, lm_head; all for lora)"),
        ("lora_params", "LoRA params (fp32)"), ("lora_grads", "LoRA grads (fp32)"),
        ("optimizer_state", "optimizer state"),
        ("activations", "saved activations at end of forward"),
        ("attention_masks", "  of which attention masks"),
        ("loss_peak", "loss peak (lm_head + cross-entropy)"),
        ("recompute_peak", "one block recomputed in backward"),
        ("backward_transient", "backward transient of one block"),
        ("allocator_slack", f"allocator slack ({ALLOCATOR_SLACK:.0%})"), ("cuda_context", "CUDA context"))
SWITCHES = (("none", dict(activation_checkpointing=False, chunked_loss=False, offload_activations=False)),
            ("checkpointing", dict(activation_checkpointing=True, chunked_loss=False, offload_activations=False)),
            ("+ chunked loss", dict(activation_checkpointing=True, chunked_loss=True, offload_activations=False)),
            ("+ offload", dict(activation_checkpointing=True, chunked_loss=True, offload_activations=True)))


def gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def make_report(model_config, *, seq_len: int, micro_batch: int, budget: int, settings: dict) -> dict:
    """Everything `python -m engine.plan` prints, as a JSON-able dict."""
    b = predict_for(model_config, seq_len, micro_batch, **settings)
    switches = {}
    for name, flags in SWITCHES:
        s = {**settings, **flags}
        switches[name] = {"total": predict_for(model_config, seq_len, micro_batch, **s).total,
                          "max_micro_batch": max_micro_batch(model_config, seq_len, budget, **s),
                          "max_seq_len": max_seq_len(model_config, micro_batch, budget, **s)}
    return {"model_type": model_config.model_type, "seq_len": seq_len, "micro_batch": micro_batch,
            "budget": budget, "settings": settings, "breakdown": b.as_dict(), "fits": b.total <= budget,
            "max_micro_batch": max_micro_batch(model_config, seq_len, budget, **settings),
            "max_seq_len": max_seq_len(model_config, micro_batch, budget, **settings), "switches": switches}


def format_report(report: dict) -> str:
    s, b = report["settings"], report["breakdown"]
    lines = [f"{report['model_type']}: {s['method']} r={s['r']} targets={s['targets']} {s['precision']} "
             f"{s['optimizer']}, {report['micro_batch']} x {report['seq_len']} tokens, "
             f"{'packed' if s['packing'] else 'padded'}, checkpointing={s['activation_checkpointing']} "
             f"chunked_loss={s['chunked_loss']} offload={s['offload_activations']}", "",
             f"| {'component':<60} | GiB    |", f"|{'-' * 62}|--------|"]
    lines += [f"| {label:<60} | {gib(b[key]):>6} |" for key, label in ROWS if b[key]]
    lines += [f"| {'static (weights, LoRA, optimizer)':<60} | {gib(b['static']):>6} |",
              f"| {'dynamic (activations + max(loss, backward); peak in ' + b['peak_phase'] + ')':<60} | {gib(b['dynamic']):>6} |",
              f"| {'**predicted peak**':<60} | {gib(b['total']):>6} |"]
    if b["host_offloaded"]:
        lines.append(f"| {'(pinned CPU memory for offloaded activations)':<60} | {gib(b['host_offloaded']):>6} |")
    verdict = "fits" if report["fits"] else "does NOT fit"
    lines += ["", f"{verdict} in the budget of {gib(report['budget'])} GiB; largest micro-batch at "
              f"{report['seq_len']} tokens: {report['max_micro_batch']}; longest sequence at micro-batch "
              f"{report['micro_batch']}: {report['max_seq_len']} tokens", "",
              "| switches | peak GiB | fits | max micro-batch | max seq len |", "|---|---|---|---|---|"]
    for name, row in report["switches"].items():
        lines.append(f"| {name} | {gib(row['total'])} | {'yes' if row['total'] <= report['budget'] else 'no'} "
                     f"| {row['max_micro_batch']} | {row['max_seq_len']} |")
    return "\n".join(lines)


def _validate_for_planning(cfg) -> None:
    """RunConfig.validate without the checks that need files the planner does not read."""
    from engine.config import ConfigError

    for section in (cfg.peft, cfg.optim, cfg.train, cfg.eval):
        section.validate()
    if not cfg.model.path.startswith("shape:"):
        cfg.model.validate()
    if not isinstance(cfg.data.max_seq_len, int) or cfg.data.max_seq_len < 8:
        raise ConfigError(f"config key 'data.max_seq_len': must be an integer >= 8, got {cfg.data.max_seq_len!r}")


def run_plan(raw: dict) -> dict:
    """Plan from a raw config dict (Hydra's, resolved); `plan_json` (optional) names a JSON output file."""
    from engine.config import from_dict

    raw = dict(raw)
    json_path = raw.pop("plan_json", None)
    cfg = from_dict(raw)
    _validate_for_planning(cfg)
    model_config = load_model_config(cfg.model.path)
    settings = plan_settings(cfg)
    budget = int(cfg.train.memory_budget_gib * GIB)
    micro_batch = cfg.train.micro_batch_size
    if micro_batch == "auto":
        micro_batch = max(1, min(MAX_AUTO_MICRO_BATCH,
                                 max_micro_batch(model_config, cfg.data.max_seq_len, budget, **settings)))
    report = make_report(model_config, seq_len=cfg.data.max_seq_len, micro_batch=micro_batch,
                         budget=budget, settings=settings)
    report["model_path"] = cfg.model.path
    print(format_report(report))
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=2, default=str))
        print(f"\nwrote {json_path}", file=sys.stderr)
    return report


# ----------------------------------------------------------------------------- docs/PLANNER.md tables

def _qlora(**over) -> dict:
    base = dict(method="qlora", r=16, targets="all-linear", precision="fp16", base_dtype="fp16",
                optimizer="paged_adamw_32bit", loss_chunk_size=1024, dropout=0.0, double_quant=True,
                cuda=True, packing=True, activation_checkpointing=False, chunked_loss=False,
                offload_activations=False)
    return {**base, **over}


def answers_markdown(budget_gib: float = 14.7) -> str:
    """The prediction tables of docs/PLANNER.md (`python -m engine.plan --answers`)."""
    budget = int(budget_gib * GIB)
    out = []
    llama = known_config("llama-3.1-8b")
    for packing, title in ((True, "packed rows (block-diagonal mask, the engine's default)"),
                           (False, "one document per row (no mask: SDPA is_causal, GQA not repeated)")):
        out += [f"#### Llama-3.1-8B QLoRA, r16 all-linear, fp16, paged AdamW 32-bit, micro-batch 1, {title}", "",
                "| tokens | " + " | ".join(n for n, _ in SWITCHES) + " |", "|---|" + "---|" * len(SWITCHES)]
        for t in (2048, 8192, 16384, 32768):
            cells = []
            for _, flags in SWITCHES:
                b = predict_for(llama, t, 1, **_qlora(packing=packing, **flags))
                cells.append(f"{gib(b.total)} {'yes' if b.total <= budget else '**no**'}")
            out.append(f"| {t} | " + " | ".join(cells) + " |")
        out.append("")
    phi = known_config("phi-3-mini")
    seed = dict(r=32, targets=["o_proj", "qkv_proj", "gate_up_proj", "down_proj", "lm_head"], optimizer="adamw",
                packing=False, activation_checkpointing=True)
    out += ["#### Phi-3-mini seed recipe: QLoRA nf4 r32 (o/qkv/gate_up/down/lm_head), fp16, checkpointing, "
            "micro-batch 2, padded", "", "| tokens per row | loss | peak GiB | fits | loss peak GiB | largest micro-batch |",
            "|---|---|---|---|---|---|"]
    for t in (4096, 4608):
        for chunked in (False, True):
            s = _qlora(**seed, chunked_loss=chunked)
            b = predict_for(phi, t, 2, **s)
            out.append(f"| {t} | {'chunked' if chunked else 'full logits (as HF)'} | {gib(b.total)} | "
                       f"{'yes' if b.total <= budget else '**no**'} | {gib(b.loss_peak)} | "
                       f"{max_micro_batch(phi, t, budget, **s)} |")
    out += ["", "#### T4 recipes (checkpointing + chunked loss, packed, fp16; QLoRA r16 all-linear, "
            "paged AdamW 32-bit; SmolLM2: 16-bit LoRA)", "",
            "| model | seq len | micro-batch | predicted peak GiB | switches | longest seq at micro-batch 1 (+ offload) |",
            "|---|---|---|---|---|---|"]
    for name in KNOWN_SHAPE_NAMES:
        cfg = known_config(name)
        method = "lora" if name == "smollm2-135m" else "qlora"
        s = _qlora(method=method, activation_checkpointing=True, chunked_loss=True)
        longest = max_seq_len(cfg, 1, budget, **s)
        longest_off = max_seq_len(cfg, 1, budget, **{**s, "offload_activations": True})
        for t in (2048, 4096, 8192):
            mb = max_micro_batch(cfg, t, budget, limit=MAX_AUTO_MICRO_BATCH, **s)
            if mb == 0:
                out.append(f"| {name} | {t} | - | does not fit | ckpt + chunked | {longest} ({longest_off}) |")
                continue
            b = predict_for(cfg, t, mb, **s)
            out.append(f"| {name} | {t} | {mb} | {gib(b.total)} | ckpt + chunked | {longest} ({longest_off}) |")
    return "\n".join(out)


# ----------------------------------------------------------------------------- entry point

def _hydra_main():
    import hydra
    from omegaconf import OmegaConf

    from engine.config import ConfigError, register_configs

    register_configs()

    @hydra.main(version_base="1.3", config_path=str(Path(__file__).resolve().parent.parent / "conf"),
                config_name="config")
    def main(dcfg) -> None:
        try:
            run_plan(OmegaConf.to_container(dcfg, resolve=True))
        except (ConfigError, PlanError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    main()


if __name__ == "__main__":
    if sys.argv[1:] == ["--answers"]:
        print(answers_markdown())
    else:
        # the planner writes nothing: keep Hydra from creating the run's output_dir
        if not any(a.startswith("hydra.run.dir=") for a in sys.argv[1:]):
            sys.argv.append("hydra.run.dir=.")
        _hydra_main()
