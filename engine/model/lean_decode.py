"""A lean decode step for recognised decoder families: one token per row in 37 aten ops per layer, not 98.

A GRPO rollout decodes one token per row per step, and at a few rows the step's arithmetic is
small: on a CPU the weights' GEMMs are near the memory-bandwidth floor, and what is left is the
host issuing transformers' ops: 98 aten ops per Llama layer even on merged decode copies (the
cache's update, rotate_half's slices and cat, the MLP's three GEMMs, the residual adds...), ~3,000
per SmolLM2 token with the mask building and the head. This module decodes the same math from the
model's own weights in fewer, larger ops (tests/grpo/test_lean_decode.py counts them):

    per layer, x [N, E] (N rows, one token each):
      norm        rms-norm in fp32, the family's form (w * n or (1 + w) * n, engine/layers/fused_norm)
      q/k/v       one GEMM  x @ Wqkv [E, (H + 2 Hkv) D]   (+ bias: Qwen2)         -> [N, H + 2 Hkv, D]
      q/k norms   Qwen3's per-head norms, where the family has them
      RoPE        q and k heads together: x cos + roll(x, D/2) sin+-   (rotate_half(x) = roll(x, D/2) * [-1, +1])
      KV          k, v written into the rollout cache's column L (`PreallocatedLayer`'s buffers)
      attention   one SDPA over the filled columns (a sliding window: the last w of them), the
                  rows' left padding as an additive mask made once per step, K/V heads grouped
      o           x = addmm(x, attn, Wo)                                   (the residual add in the GEMM)
      MLP         x = addmm(x, act(g) * u, Wdown),  [g | u] = norm(x) @ Wgu [E, 2 I]   (one GEMM for gate and up)
    final norm, lm_head on the N rows -> logits [N, V] fp32

Weights: each group's members (q, k, v; gate, up) are concatenated into one decode copy for the
rollout, LoRA merged in (W + s*B@A, DoRA's merge: `engine.layers.decode_merge.merged_weight`),
in the rollout's compute dtype (the autocast dtype when there is one: no per-step casts), stored
as the layout says (a device choice, the speed plan's rollout_merge):
    in_out   [in, out] contiguous (a CPU: MKL's decode GEMMs read W^T faster so)
    out_in   [out, in], as nn.Linear stores W (a GPU: cuBLAS)
    packed   a device kernel's own layout, registered in PACKED_LAYOUTS by the speed seam
             ("onednn": engine/speed/onednn_decode.py, the CPU's where oneDNN is there)
A 4-bit base the caller keeps in 4 bits (QLoRA on a GPU) is not copied: that group's members are
called as modules, LoRA branch included.

What the step does not know is refused, never approximated: `LeanDecoder.build` recognises the
structure (pre-norm blocks with `self_attn` and a gated `mlp`, half-split RoPE from the model's
`rotary_emb`, norms of a known form) and returns why not otherwise; and before its first use on a
model, the rollout (engine/grpo/rollout.py) decodes one probe token both ways and compares the logits (an embedding
scale, a soft-cap, a norm placed elsewhere: any family whose forward differs from the above shows
there and keeps transformers' forward, with the reason in the rollout's report line).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.decode_merge import merged_weight
from engine.layers.fused_mlp import ACTIVATIONS, activation_of
from engine.layers.fused_norm import FusedNormForward, form_of
from engine.layers.lora import LoRALinear
from engine.layers.quant import dequantize_weight, is_linear4bit

CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}
"""The rollout's probe check: the largest |lean - reference| logit allowed, relative to max |reference logit|,
by compute dtype (the two paths round differently: concatenated GEMMs, fused RoPE)."""


class PackedLinear(Protocol):
    """A device kernel's own weight layout for the decode copies (registered in PACKED_LAYOUTS by
    engine/speed/, which decides where it runs): the [out, in] copy packed once per rollout."""

    dtypes: tuple[torch.dtype, ...]

    def pack(self, weight: torch.Tensor, rows: int) -> torch.Tensor: ...

    def linear(self, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor: ...

    def linear_add(self, x: torch.Tensor, residual: torch.Tensor, packed: torch.Tensor) -> torch.Tensor: ...


PACKED_LAYOUTS: dict[str, PackedLinear] = {}
"""Layout name -> its kernel, filled by the speed seam (engine/speed/onednn_decode.py: "onednn")."""


def layouts() -> tuple[str, ...]:
    """Every layout a decode copy can take here: the core's two and the registered packed ones."""
    return ("in_out", "out_in", *PACKED_LAYOUTS)


def default_layout(device: torch.device) -> str:
    """The decode copies' layout where the caller names none: [in, out] on a CPU (MKL's few-row
    GEMMs read W^T faster so), [out, in] (as nn.Linear stores W) elsewhere. The speed plan picks a
    packed layout where one pays (rollout_merge)."""
    return "in_out" if device.type == "cpu" else "out_in"


SCALES = ("embedding_multiplier", "residual_multiplier", "logits_scaling", "scale_emb", "scale_depth")
"""Config scalars (Granite, MiniCPM) that multiply the embeddings, the residual branches or the logits."""


class _Projections:
    """Sibling projections that read the same input, as one GEMM on a concatenated decode copy, or
    (members that cannot be copied) one module call each. __call__(x [N, in]) -> [N, sum(out)]."""

    def __init__(self, members: list[nn.Module], dtype: torch.dtype, layout: str | None, dequantize_4bit: bool,
                 rows: int = 8):
        self.sizes = [m.out_features for m in members]
        self.modules = None
        packer = PACKED_LAYOUTS.get(layout)
        self.packer = packer if packer is not None and dtype in packer.dtypes else None
        if layout is None or any(_kept_as_module(m, dequantize_4bit) for m in members):
            self.modules, self.weight_t, self.bias = members, None, None
            return
        with torch.no_grad():
            if layout == "out_in" or self.packer is not None:  # the [out, in] copy: its transposed view, or packed
                weights = [_effective_weight(m).to(dtype) for m in members]                 # [out_i, in]
                weight = torch.cat(weights) if len(weights) > 1 else weights[0]
                self.weight_t = self.packer.pack(weight.contiguous(), rows) if self.packer else weight.t()
            else:  # in_out (also a packed layout's dtype it cannot take): [in, sum(out)], each member in its columns
                first = _base(members[0]).weight
                self.weight_t = torch.empty(members[0].in_features, sum(self.sizes), dtype=dtype, device=first.device)
                start = 0
                for m, n in zip(members, self.sizes):
                    _write_transposed(self.weight_t[:, start:start + n], m)
                    start += n
            biases = [_base(m).bias for m in members]
            self.bias = None
            if any(b is not None for b in biases):
                self.bias = torch.cat([b.to(dtype) if b is not None else torch.zeros(n, dtype=dtype, device=self.weight_t.device)
                                       for b, n in zip(biases, self.sizes)])

    @property
    def bytes(self) -> int:
        return 0 if self.weight_t is None else self.weight_t.numel() * self.weight_t.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.modules is not None:
            outs = [m(x) for m in self.modules]
            return torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
        x = x.to(self.weight_t.dtype)
        if self.packer is not None:
            return self.packer.linear(x, self.weight_t, self.bias)
        return torch.mm(x, self.weight_t) if self.bias is None else torch.addmm(self.bias, x, self.weight_t)

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """residual + self(x), in the residual's dtype: one addmm where nothing needs a cast."""
        if self.modules is None and self.bias is None and residual.dtype == x.dtype == self.weight_t.dtype:
            if self.packer is not None:
                return self.packer.linear_add(x, residual, self.weight_t)
            return torch.addmm(residual, x, self.weight_t)
        return residual + self(x).to(residual.dtype)


def _base(m: nn.Module) -> nn.Module:
    return m.base_layer if isinstance(m, LoRALinear) else m


def _kept_as_module(m: nn.Module, dequantize_4bit: bool) -> bool:
    """A member called as a module: a 4-bit base the rollout keeps in 4 bits, or a module that is
    neither a LoRA layer nor a linear layer."""
    base = _base(m)
    if is_linear4bit(base):
        return not dequantize_4bit
    return type(base) is not nn.Linear


def _write_transposed(dest: torch.Tensor, m: nn.Module) -> None:
    """dest [in, out] (a column block of the group's copy) = the member's weight transposed: for
    a plain LoRA layer whose W, A, B share dest's dtype, W^T then += s * A^T B^T in place (two passes
    over the block, not a merged [out, in] temporary, a concatenation and a transpose: four)."""
    if (type(m) is LoRALinear and not (m.merged or m.disabled) and type(_base(m)) is nn.Linear
            and m.lora_A.weight.dtype == dest.dtype == m.base_layer.weight.dtype):
        dest.copy_(m.base_layer.weight.t())
        dest.addmm_(m.lora_A.weight.t(), m.lora_B.weight.t(), alpha=m.scaling)
    else:
        dest.copy_(_effective_weight(m).t())


def _effective_weight(m: nn.Module) -> torch.Tensor:
    """What the module multiplies by, [out, in]: W + s*B@A for a LoRA layer (W alone where its
    adapter is off or merged for good: `decode_merge.merged_weight`), else W (dequantized)."""
    return merged_weight(m) if isinstance(m, LoRALinear) else dequantize_weight(m)


@dataclass
class _Layer:
    norm1: FusedNormForward
    qkv: _Projections
    q_norm: FusedNormForward | None
    k_norm: FusedNormForward | None
    o: _Projections
    norm2: FusedNormForward
    gate_up: _Projections
    act: str
    down: _Projections
    heads: int
    kv_heads: int
    head_dim: int
    scaling: float
    window: int | None


class NotRecognised(ValueError):
    """The model's decoder is not one the lean step computes; the message says what differs."""


def _norm(module: nn.Module | None, what: str) -> FusedNormForward:
    """The module's math from its weight (fp32 statistics, the family's form): the fused norm's
    forward, called directly whatever the module's own forward was swapped for."""
    form = form_of(module) if module is not None else None
    if form is None:
        raise NotRecognised(f"{what} is not an RMSNorm of a known form")
    return FusedNormForward(module, form == "offset")


def _attention_members(attn: nn.Module) -> list[nn.Module]:
    if all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj")):
        return [attn.q_proj, attn.k_proj, attn.v_proj]
    if hasattr(attn, "qkv_proj"):
        return [attn.qkv_proj]
    raise NotRecognised(f"attention {type(attn).__name__} has neither q/k/v_proj nor qkv_proj")


def _mlp_members(mlp: nn.Module) -> tuple[list[nn.Module], nn.Module, str]:
    """([gate, up] or [gate_up], down, activation name)."""
    if all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        upper = [mlp.gate_proj, mlp.up_proj]
    elif hasattr(mlp, "gate_up_proj") and hasattr(mlp, "down_proj"):
        upper = [mlp.gate_up_proj]
    else:
        raise NotRecognised(f"MLP {type(mlp).__name__} is not a gated MLP (gate/up/down)")
    act = activation_of(getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None))
    if act is None:
        raise NotRecognised(f"MLP {type(mlp).__name__}'s activation is not one of {sorted(ACTIVATIONS)}")
    return upper, mlp.down_proj, act


def _window(attn: nn.Module, config, index: int) -> int | None:
    """The layer's sliding window (keys i - w < j <= i), as transformers' masks apply it."""
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return config.sliding_window if layer_types[index] == "sliding_attention" else None
    return getattr(config, "sliding_window", None)


class LeanDecoder:
    """The decode step of one rollout (see the module docstring): `LeanDecoder.build` once per
    rollout (it makes its own merged copies), `step` once per generated token."""

    def __init__(self, embed: nn.Module, rotary: nn.Module, layers: list[_Layer], final_norm: FusedNormForward,
                 lm_head: _Projections, dtype: torch.dtype):
        self.embed, self.rotary, self.layers = embed, rotary, layers
        self.final_norm, self.lm_head, self.dtype = final_norm, lm_head, dtype

    @property
    def bytes(self) -> int:
        """Bytes of the rollout's decode copies."""
        groups = [g for layer in self.layers for g in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        return sum(g.bytes for g in groups) + self.lm_head.bytes

    @classmethod
    def build(cls, model: nn.Module, dtype: torch.dtype, layout: str | None, dequantize_4bit: bool,
              rows: int = 8) -> "LeanDecoder":
        """`dtype` the rollout's compute dtype, `layout` one of `layouts()` (the decode copies' storage;
        None: no copies, every projection called as its module), `dequantize_4bit` whether 4-bit bases
        get a copy too, `rows` the rows decoded together (a packed layout may tune for it; any count
        runs). Raises NotRecognised (with the reason) where the model is not a family the step computes."""
        inner = getattr(model, "model", None)
        config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        blocks = getattr(inner, "layers", None)
        if inner is None or blocks is None or not isinstance(getattr(model, "lm_head", None), nn.Module):
            raise NotRecognised("the model has no model.layers / lm_head")
        for name in ("embed_tokens", "rotary_emb", "norm"):
            if not isinstance(getattr(inner, name, None), nn.Module):
                raise NotRecognised(f"the decoder has no {name} module")
        if getattr(config, "final_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None):
            raise NotRecognised("logit soft-capping")
        scaled = [k for k in SCALES if getattr(config, k, None) not in (None, 1, 1.0)]
        if scaled:
            raise NotRecognised(f"the config scales the stream ({', '.join(scaled)})")
        layers = []
        for i, block in enumerate(blocks):
            attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
            if attn is None or mlp is None:
                raise NotRecognised(f"layer {i} has no self_attn / mlp")
            if any(hasattr(block, n) for n in ("pre_feedforward_layernorm", "post_feedforward_layernorm")):
                raise NotRecognised(f"layer {i} has norms after its sub-blocks")
            heads = config.num_attention_heads
            kv_heads = getattr(config, "num_key_value_heads", None) or heads
            head_dim = attn.head_dim
            upper, down, act = _mlp_members(mlp)
            q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
            layers.append(_Layer(
                norm1=_norm(getattr(block, "input_layernorm", None), f"layer {i}'s input_layernorm"),
                qkv=_Projections(_attention_members(attn), dtype, layout, dequantize_4bit, rows),
                q_norm=_norm(q_norm, f"layer {i}'s q_norm") if q_norm is not None else None,
                k_norm=_norm(k_norm, f"layer {i}'s k_norm") if k_norm is not None else None,
                o=_Projections([attn.o_proj], dtype, layout, dequantize_4bit, rows),
                norm2=_norm(getattr(block, "post_attention_layernorm", None), f"layer {i}'s post_attention_layernorm"),
                gate_up=_Projections(upper, dtype, layout, dequantize_4bit, rows), act=act, down=_Projections([down], dtype, layout, dequantize_4bit, rows),
                heads=heads, kv_heads=kv_heads, head_dim=head_dim, scaling=float(attn.scaling),
                window=_window(attn, config, i)))
            if sum(layers[-1].qkv.sizes) != (heads + 2 * kv_heads) * head_dim:
                raise NotRecognised(f"layer {i}'s q/k/v widths do not match the config's heads")
        return cls(inner.embed_tokens, inner.rotary_emb, layers, _norm(inner.norm, "the final norm"),
                   _Projections([model.lm_head], dtype, layout, dequantize_4bit, rows), dtype)

    def step(self, token: torch.Tensor, position: torch.Tensor, cache, add_mask: torch.Tensor) -> torch.Tensor:
        """token [N] ids, position [N] their positions, `cache` the rollout's RolloutCache (every
        layer filled to the same length L: the token goes into column L), add_mask [N, 1, 1, >L]
        0 / -inf over the cache's columns -> logits [N, V] fp32. The cache's length grows by one."""
        x = self.embed(token)                                                     # [N, E]
        N = x.shape[0]
        # in x's dtype, as transformers has them: under autocast q and k are rotated in fp32 and
        # rounded where attention reads them (the cache holds the compute dtype: see generate_rollouts)
        cos, sin = self.rotary(x, position[:, None])                              # [N, 1, R]
        R = cos.shape[-1]
        signed = torch.cat((-sin[..., :R // 2], sin[..., R // 2:]), dim=-1)       # rotate_half(x) * sin = roll(x) * signed
        L = cache.layers[0].length
        mask = add_mask[..., :L + 1]                                              # [N, 1, 1, L + 1]
        for layer, kv in zip(self.layers, cache.layers):
            H, Hkv, D = layer.heads, layer.kv_heads, layer.head_dim
            qkv = layer.qkv(layer.norm1(x)).view(N, H + 2 * Hkv, D)
            if layer.q_norm is not None:
                qk = torch.cat((layer.q_norm(qkv[:, :H]), layer.k_norm(qkv[:, H:H + Hkv])), dim=1)
            else:
                qk = qkv[:, :H + Hkv]                                             # [N, H + Hkv, D] view
            qk = _rope(qk, cos, signed, R)
            kv._k[:, :, L].copy_(qk[:, H:])
            kv._v[:, :, L].copy_(qkv[:, H + Hkv:])
            kv.length = L + 1
            start = 0 if layer.window is None else max(0, L + 1 - layer.window)
            out = F.scaled_dot_product_attention(
                qk[:, :H].unsqueeze(2).to(self.dtype), kv._k[:, :, start:L + 1], kv._v[:, :, start:L + 1],
                attn_mask=mask if start == 0 else mask[..., start:], scale=layer.scaling,
                enable_gqa=H != Hkv)                                              # [N, H, 1, D]
            x = layer.o.add_to(x, out.view(N, H * D))
            gu = layer.gate_up(layer.norm2(x))                                    # [N, 2 I]
            inner = gu.shape[-1] // 2
            x = layer.down.add_to(x, ACTIVATIONS[layer.act][0](gu[:, :inner]) * gu[:, inner:])
        return self.lm_head(self.final_norm(x)).float()


def _rope(x: torch.Tensor, cos: torch.Tensor, signed: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """x [N, heads, D] rotated at cos / signed [N, 1, R] over its first R dims (R < D: partial rotary)."""
    if rotary_dim == x.shape[-1]:
        return torch.addcmul(x * cos, x.roll(rotary_dim // 2, dims=-1), signed)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((torch.addcmul(rot * cos, rot.roll(rotary_dim // 2, dims=-1), signed), rest), dim=-1)
