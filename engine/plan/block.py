"""One decoder block's memory, per token: what it keeps for backward (by part), and what its
backward holds on top of that, stage by stage. The planner's building blocks (`predict`)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from engine.plan.shapes import Shape


NORM_BACKWARD = 20
"""Bytes per normalized element an eager RMSNorm's backward holds beyond its saved fp32 copy: five
fp32 temporaries (the output gradient cast to fp32, the two products of the mul's backward, mean's
and pow's backward), measured on CPU (tests/plan/test_plan.py); the same aten ops run on CUDA."""


@dataclass(frozen=True)
class BlockParts:
    """Bytes per token one decoder block keeps for backward, by part, in forward order.

    With the tiled MLP (`tiled_mlp`) the block keeps `mlp_input` instead of the three MLP parts;
    those then say what one tile's recompute keeps per token of the tile. Tiled norms
    (`tiled_norms`) keep their input in its own dtype instead of an fp32 copy."""
    norm_in: int = 0      # input RMSNorm: fp32 copy of its input + rsqrt (tiled: the input)
    attn_lora: int = 0    # q/k/v (Phi-3: qkv) LoRA: their shared input, A x, dropout copies
    qk_norm: int = 0      # Qwen3's per-head q and k RMSNorms
    attention: int = 0    # q, k, v (RoPE'd), out, logsumexp
    o_lora: int = 0       # o_proj's LoRA (its input is attention's out, counted there)
    norm_post: int = 0    # post-attention RMSNorm
    mlp_lora: int = 0     # gate/up LoRA: their shared input (mlp_lora_input of it), A x
    mlp: int = 0          # g, act(g), u (Phi-3: the gate|up output + act(g))
    down_lora: int = 0    # down_proj's LoRA: its input g*u, A x
    mlp_input: int = 0    # tiled MLP: its input x [h], the only thing it keeps
    mlp_lora_input: int = 0
    tiled_mlp: bool = False
    tiled_norms: bool = False

    @property
    def mlp_parts(self) -> int:
        return self.mlp_input if self.tiled_mlp else self.mlp_lora + self.mlp + self.down_lora

    @property
    def total(self) -> int:
        return (self.norm_in + self.attn_lora + self.qk_norm + self.attention + self.o_lora + self.norm_post
                + self.mlp_parts)


def block_parts(shape: Shape, targets: set, *, r: int, a: int, rs: int, grad_on: bool, repeat_kv: bool,
                dropout: bool, tiled_mlp: bool = False, tiled_norms: bool = False, per_document: bool = False,
                cuda: bool = True) -> tuple[BlockParts, bool]:
    """(what one decoder block keeps for backward per token, do grads flow after it?).

    Walks the block in forward order. An op saves tensors only once something before it (or
    its own LoRA) needs a gradient (`grad_on`): autograd saves only what the gradients of
    inputs that require grad need. `a` = bytes of the compute dtype, `rs` = of the residual
    stream (the base dtype), r = LoRA rank. Per op:
      RMSNorm           fp32 copy of its input (saved by pow and mul) + rsqrt [T, 1]   4h + 4
      LoRA on a linear  its input x, shared by the linears that read the same x       a*in
                        A x                                                          a*r
                        with dropout, per target: the mask + the dropped copy        (m+a)*in
                        (m = 1 B: CUDA's bool mask; a CPU keeps the mask in the input's dtype, m = a)
      frozen linear     nothing (no dW; dX needs only W)
      q/k RMSNorm       Qwen3, per head before RoPE: fp32 copies of q and k + rsqrt per head
      RoPE              nothing (q*cos + rot(q)*sin: cos, sin are constants)
      SDPA              q, k, v, out (out is also o_proj's input), logsumexp [heads] fp32;
                        k, v repeated to all heads when a mask forces `repeat_kv` (GQA);
                        Phi-3 without repeat: v is a view of the fused q|k|v output and
                        keeps all of it alive. Phi-3's RoPE ends in a cat, so q is laid out
                        [B, heads, T, hd] and the CPU kernel writes out that way: o_proj's
                        input is then a contiguous copy (CUDA kernels write [B, T, heads, hd])
      packed attention  (engine/model/attention.py, `per_document`: packed rows, no mask) SDPA per
                        document: k, v repeated to all heads (GQA), and the documents' outputs
                        besides the row's out they are joined into: one more a*heads*hd
      gated MLP         act input g, act(g), up u: 3*a*i (Phi-3: the gate|up output [2i]
                        + act(g)); g*u only when down_proj has LoRA (as its input)
      tiled MLP         (engine/model/tiling.py) its input x only: rs*h
      tiled RMSNorm     its input in its own dtype: rs*h (q/k norms: a per element)
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
            return len(hit) * (((1 if cuda else a) + a) * fin + a * r)
        return (0 if input_saved_anyway else a * fin) + len(hit) * a * r

    norm = rs * h if tiled_norms else 4 * h + 4
    attn_in = ["qkv_proj"] if shape.fused else ["q_proj", "k_proj", "v_proj"]
    mlp_in = ["gate_up_proj"] if shape.fused else ["gate_proj", "up_proj"]
    p = dict(norm_in=norm if grad_on else 0, attn_lora=lora(attn_in, False))
    grad_on = grad_on or any(n in targets for n in attn_in)
    if grad_on:
        if shape.qk_norm:
            p["qk_norm"] = (a * hd if tiled_norms else 4 * hd + 4) * (nh + nkv)
        attention = 0
        if (repeat_kv or per_document) and nkv < nh:
            attention += a * 3 * nh * hd                           # q, repeated k, repeated v
        elif shape.fused:
            attention += a * (nh + nkv) * hd + a * (nh + 2 * nkv) * hd  # q, k (RoPE'd) + q|k|v
        else:
            attention += a * (nh + 2 * nkv) * hd
        p["attention"] = attention + a * nh * hd * (2 if per_document else 1) + 4 * nh  # + out, logsumexp
    p["o_lora"] = lora(["o_proj"], grad_on and not (shape.family == "phi3" and not cuda))
    grad_on = grad_on or "o_proj" in targets
    p["norm_post"] = norm if grad_on else 0
    p["mlp_lora"] = lora(mlp_in, False)
    p["mlp_lora_input"] = a * h if p["mlp_lora"] and not dropout else 0
    mlp_grad = grad_on or any(n in targets for n in mlp_in)
    p["mlp"] = 3 * a * i if mlp_grad else 0
    p["down_lora"] = lora(["down_proj"], False)
    grad_after = mlp_grad or "down_proj" in targets
    p["mlp_input"] = rs * h if tiled_mlp and grad_after else 0
    return BlockParts(**p, tiled_mlp=tiled_mlp, tiled_norms=tiled_norms), grad_after


def backward_stages(shape: Shape, parts: BlockParts, *, a: int, rs: int, tokens: int, tile_tokens: int = 0,
                    norm_tile_tokens: int = 0, repeat_kv: bool = False, cuda: bool = True) -> dict[str, int]:
    """Bytes one block's backward holds on top of its saved set at each moment that can set its
    peak, in backward order (each checked against a live-storage tally on CPU, tests/plan/test_plan.py):

      mlp        untiled: the block's output gradient dy [h], and the later of
                   down_proj's backward: its LoRA's saved input (and dropout copies) still alive,
                                         + the base's input gradient [i]               a*i
                   the mul act(g) * u's: down_proj's LoRA has freed its part; the gradients
                                         of g*u, act(g), u                     3 a*i - down_lora
                   (Phi-3's later cat of the gate|up gradient [2i] holds as much as the mul's)
                 tiled: dy, the input-gradient buffer dx [h], and one tile's recompute: its saved
                 set (its input is a view of x when the dtypes agree), the larger moment above and
                 its output y_k [h] (kept until its gradients are taken), for the tile's tokens
      post norm  the MLP has freed its parts; the norm's backward: NORM_BACKWARD bytes per element
                 + its input gradient [h] (tiled: dy, dx [h] and one tile's fp32 copy + temporaries)
      attention  the MLP and the second norm have freed theirs; alive: two residual-size
                 gradients [h] and the later of
                   o_proj's backward: the input gradients of its base and of its LoRA branch and
                                      their sum, d_out (3 a*q; a*q without LoRA)     q = heads*hd
                   SDPA's backward:   d_out, dq, dk, dv (k, v over all heads when repeated)
                 (measured on CPU). CUDA's flash / memory-efficient kernels are assumed to add an
                 fp32 dq accumulator (4 q) and to expand dk, dv to all heads under GQA
                 (12 q in fp16: not measured yet)
      q/k norms  Qwen3: attention has freed q, k, v, out; the per-head norms' backward over q
                 (NORM_BACKWARD per element; tiled: the q gradient buffer)
    """
    h, i, N = shape.hidden, shape.intermediate, tokens
    moment = max(a * i, 3 * a * i - parts.down_lora) if parts.mlp else 0  # on top of the MLP's saved parts
    if parts.tiled_mlp and parts.mlp_input:
        t = min(tile_tokens, N)
        view = parts.mlp_lora_input if a == rs else 0               # the tile's LoRA input is x[k]
        tile_saved = parts.mlp_lora - view + parts.mlp + parts.down_lora
        mlp = 2 * rs * h * N + t * (tile_saved + moment + rs * h)
    elif parts.mlp:
        mlp = N * (rs * h + moment)
    else:
        mlp = 0
    stages = {"mlp": mlp}
    if parts.norm_post:
        if parts.tiled_norms:
            stages["post norm"] = N * (2 * rs * h - parts.mlp_parts) + min(norm_tile_tokens, N) * (4 + NORM_BACKWARD) * h
        else:
            stages["post norm"] = N * (NORM_BACKWARD * h + rs * h - parts.mlp_parts)
    q = shape.heads * shape.head_dim
    kv = q if repeat_kv or cuda else shape.kv_heads * shape.head_dim
    o_proj = (3 if parts.o_lora else 1) * a * q
    sdpa = a * (2 * q + 2 * kv) + (4 * q if cuda else 0)
    after = parts.norm_post + parts.mlp_parts
    if parts.attention:
        stages["attention"] = N * (2 * rs * h + max(o_proj, sdpa) - after)
    if parts.qk_norm:
        freed = parts.attention + parts.o_lora + after
        stages["q/k norms"] = N * (2 * rs * h + (a if parts.tiled_norms else NORM_BACKWARD) * q - freed)
    return stages
