"""PiSSA: principal singular values and singular vectors adaptation (Meng et al. 2024, arXiv:2404.02948).

An initialisation, not a new layer: the adapter starts on the top-r singular directions of W
and the frozen base keeps the rest.

    W = U S V^T                                  (torch.linalg.svd, or randomized svd_lowrank)
    B0 = U_r sqrt(S_r / s)        [out, r]
    A0 = sqrt(S_r / s) V_r^T      [r, in]        so  s * B0 A0 = U_r S_r V_r^T
    W_res = W - s * B0 A0                        (the base layer now holds W_res)

so right after initialisation W_res + s*B0 A0 = W (up to rounding): the model is unchanged. For
QLoRA the *residual* is what gets quantized (its error is smaller than quantize(W)'s: the largest
singular directions stay in fp32 in A and B), so the SVD runs on the float weights before
quantizing (engine.model.build.build_model does it layer by layer).

Files work anywhere a plain LoRA adapter does: the trained adapter is saved as the change it
makes to the *original* W (PEFT's `path_initial_model_for_weight_conversion`,
LoraModel.subtract_mutated_init):

    W_res + s*B A = W + s*(B A - B0 A0) = W + s' * B' A'
    A' = [A; A0]  [2r, in],   B' = [B, -B0]  [out, 2r],   r' = 2r,
    alpha' = 2 alpha (s' = alpha'/r' = s), or sqrt(2) alpha with rsLoRA (alpha'/sqrt(r') = s)

A0 and B0 stay on the layer as non-persistent buffers (`pissa_A0`, `pissa_B0`): not trained, not
in checkpoints (build_model recomputes them deterministically on resume). For QLoRA the
converted adapter applies to the original 16-bit W, while training saw quantize(W_res): the two
differ by W_res - quantize(W_res) (test_pissa measures it).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.layers.lora import LoRALinear, lora_modules
from engine.layers.quant import QuantSpec, is_linear4bit, quantize_linear


def pissa_init_(layer: LoRALinear, niter: int | None = None) -> None:
    """Set A, B to the top-r SVD factors of the layer's float W and W to the residual (formulas above).

    niter=None: exact torch.linalg.svd; an int: torch.svd_lowrank(W, q=r, niter) (randomized,
    drawn from the global RNG: seed first; PEFT's init_lora_weights="pissa_niter_K"). The residual
    gets its own Parameter, so a weight tied to another module (lm_head / embeddings) is untied
    and the other module keeps W.
    """
    if not isinstance(layer, LoRALinear):
        raise TypeError(f"pissa_init_ needs a LoRALinear, got {type(layer).__name__}")
    if is_linear4bit(layer.base_layer):
        raise TypeError("PiSSA needs the float weight W: run it before quantizing (the residual is what gets "
                        "quantized); this layer's base is already a 4-bit Linear4bit")
    if getattr(layer, "lora_magnitude_vector", None) is not None:
        raise TypeError("PiSSA with DoRA is not supported: the saved PiSSA adapter is the plain LoRA "
                        "s*(B A - B0 A0), which has no place for DoRA's magnitude")
    r = layer.r
    if r > min(layer.in_features, layer.out_features):
        raise ValueError(f"PiSSA rank r={r} exceeds min(out, in) = {min(layer.out_features, layer.in_features)} "
                         f"of a [{layer.out_features}, {layer.in_features}] weight")
    weight = layer.base_layer.weight
    with torch.no_grad():
        w = weight.detach().float()                                   # [out, in]
        if niter is None:
            u, s, vh = torch.linalg.svd(w, full_matrices=False)        # u [out, k], s [k], vh [k, in]
            u, s, vh = u[:, :r], s[:r], vh[:r]
        else:
            u, s, v = torch.svd_lowrank(w, q=r, niter=niter)           # v [in, r]
            vh = v.T
        root = torch.sqrt(s / layer.scaling)                           # [r]
        a0 = root[:, None] * vh                                       # [r, in]
        b0 = u * root[None, :]                                        # [out, r]
        residual = w - layer.scaling * (b0 @ a0)                      # W_res [out, in] fp32
        layer.lora_A.weight.copy_(a0)
        layer.lora_B.weight.copy_(b0)
    layer.base_layer.weight = nn.Parameter(residual.to(weight.dtype), requires_grad=False)
    layer.register_buffer("pissa_A0", a0.clone(), persistent=False)
    layer.register_buffer("pissa_B0", b0.clone(), persistent=False)


def pissa_init_model(model: nn.Module, niter: int | None = None, quantize: set[str] | None = None,
                     spec: QuantSpec | None = None, device: torch.device | str | None = None) -> list[str]:
    """`pissa_init_` every LoRALinear of `model`, in module order; returns their names.

    quantize: names of LoRA layers whose residual base is then replaced by its 4-bit Linear4bit
    (per `spec`, on `device`) right after its SVD, one layer at a time (QLoRA + PiSSA)."""
    quantize = quantize or set()
    if quantize and spec is None:
        raise ValueError("pissa_init_model: `quantize` needs a QuantSpec")
    modules = lora_modules(model)
    if not modules:
        raise ValueError("pissa_init_model: the model has no LoRA layers (inject_lora first)")
    for name, layer in modules.items():
        pissa_init_(layer, niter)
        if name in quantize:
            layer.base_layer = quantize_linear(layer.base_layer, spec, device)
    return list(modules)


def is_pissa(layer: nn.Module) -> bool:
    return getattr(layer, "pissa_A0", None) is not None


def converted_alpha(alpha: float, use_rslora: bool) -> float:
    """alpha' of the rank-2r converted adapter with the same scaling s (module docstring)."""
    return alpha * math.sqrt(2.0) if use_rslora else alpha * 2.0


def pissa_to_lora(layer: LoRALinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(A' [2r, in], B' [out, 2r]), fp32, detached: s'*B'A' = s*(B A - B0 A0), the trained change
    of the original W (apply with r' = 2r and `converted_alpha`)."""
    if not is_pissa(layer):
        raise ValueError("pissa_to_lora: this layer was not initialised with pissa_init_ (no pissa_A0 buffer)")
    a = torch.cat([layer.lora_A.weight.detach(), layer.pissa_A0], dim=0)
    b = torch.cat([layer.lora_B.weight.detach(), -layer.pissa_B0], dim=1)
    return a.float(), b.float()
