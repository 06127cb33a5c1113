"""CUDA kernels for packed attention: every document of a packed micro-batch in one kernel call per layer.

The core's reference kernel (`engine.model.attention.sdpa_per_document`) launches one SDPA per
document: a 16k-token micro-batch of 60 documents is 60 small launches per layer forward and as
many backward, none of them large enough to fill a GPU. A varlen kernel takes the micro-batch as
one token-major tensor and the document boundaries as offsets:

    query [B, H, T, D] -> [B*T, H, D]     token-major (a copy unless already laid out so)
    cu_seqlens [docs + 1] int32           PackingContext: made by the loader on the host from its
                                          document lengths, padding as its own document, moved to
                                          the GPU with the batch
    max_seqlen                            packing.max_doc_length, a host int
    out [B*T, H, D] -> [B, T, H, D]       a view: what transformers expects from attention
Nothing in the call reads the device back (no .item(), nonzero or host copy): the lengths never
leave the host, the offsets never come back to it.

Two kernels; `choose_varlen_attention` picks one per run from (compute capability, precision, what
this torch offers), and the speed plan (`engine/speed/plan.py`) registers it and says which:
  flash_varlen  `torch.nn.attention.varlen.varlen_attn`: FlashAttention-2's varlen forward and
                backward (sm80+, fp16 / bf16, head_dim <= 256, a multiple of 8). Grouped K/V heads
                are read in place, and a sliding window is its window_size (left = window - 1,
                right = 0: key j seen by query i iff i - window < j <= i, as
                `exact_document_attention` has it), so a windowed model stays one call per layer.
                No attention dropout in that kernel: with dropout the reference kernel runs.
  nested_sdpa   `F.scaled_dot_product_attention` on nested jagged tensors (q, k, v over the same
                offsets, their min / max length given so torch computes neither): flash on sm80+,
                the memory-efficient kernel on a T4 (sm75, fp16 / fp32). It takes no mask, hence
                no window (`takes_window` False): in a batch where some document is longer than a
                layer's window the core recomputes those documents exactly (on a T4 a windowed
                model's common case, documents no longer than the window, stays one call); and
                no grouped heads under autograd, hence K/V heads repeated (as transformers' SDPA
                path does).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.model.attention import exact_document_attention, sdpa_per_document
from engine.model.packing import PackingContext

HALF = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_DIM = 256


@dataclass(frozen=True)
class TorchAttention:
    """What this torch build offers for varlen attention (probed without importing it)."""

    flash_varlen: bool
    nested_sdpa: bool


def torch_attention_features() -> TorchAttention:
    return TorchAttention(flash_varlen=_varlen_takes("scale", "window_size", "enable_gqa"),
                          nested_sdpa=hasattr(torch.nested, "nested_tensor_from_jagged"))


def _varlen_takes(*keywords: str) -> bool:
    """Does this torch's `varlen_attn` exist and take `keywords`? (An older torch's varlen_attn
    lacks the window and grouped heads.) Read from its source, not imported: importing
    torch.nn.attention.varlen imports torch._dynamo (~1 s), for a kernel only CUDA runs."""
    spec = importlib.util.find_spec("torch.nn.attention.varlen")
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return False
    with open(spec.origin) as f:
        source = f.read()
    start = source.find("def varlen_attn(")
    signature = source[start:source.find("->", start)] if start >= 0 else ""  # up to the return annotation
    return all(f"{k}:" in signature for k in keywords)


def cuda_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device, None for any other device or without a usable GPU."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def choose_varlen_attention(capability: tuple[int, int] | None, precision: str,
                            features: TorchAttention) -> tuple[str, str]:
    """(kernel, why): "flash_varlen", "nested_sdpa" or "" (the reference kernel, one SDPA per
    document; the CPU keeps its own kernels) for a GPU of `capability` training in `precision`.
    A pure function of its arguments, so tests can ask it about GPUs this machine lacks."""
    if capability is None:
        return "", ""
    sm = 10 * capability[0] + capability[1]
    if sm >= 80 and precision in ("fp16", "bf16") and features.flash_varlen:
        return "flash_varlen", f"sm{sm} {precision}: flash varlen, one call per layer, windows in the kernel"
    if sm >= 75 and features.nested_sdpa and (precision != "bf16" or sm >= 80):
        kernel = "flash" if sm >= 80 and precision != "fp32" else "memory-efficient"
        return "nested_sdpa", (f"sm{sm} {precision}: nested SDPA ({kernel}), one call per layer; a document "
                               "longer than a sliding window recomputed exactly")
    return "", f"sm{sm} {precision}: no varlen kernel here, one SDPA per document"


def flash_varlen_kernel(dtypes: tuple[torch.dtype, ...] = HALF):
    """The flash varlen document kernel (see the module docstring); `dtypes`: what it computes in
    (the kernel's fp16 / bf16; tests widen it to run a reference op in fp32 on a CPU)."""
    from torch.nn.attention import varlen  # imports torch._dynamo (~1 s): only where this kernel runs

    def kernel(query, key, value, docs, *, scale: float, dropout: float, packing: PackingContext,
               window: int | None = None):
        B, H, T, D = query.shape
        H_kv = key.shape[1]
        dtype = _compute_dtype(query)
        if dropout or dtype not in dtypes or D > FLASH_MAX_HEAD_DIM or D % 8:
            return _reference(query, key, value, docs, scale=scale, dropout=dropout, packing=packing,
                              window=window)
        cu_seqlens = _on_device(packing, query.device)
        longest = packing.max_doc_length
        # (-1, 0): causal; (w - 1, 0): causal within the window, where some document is longer than it
        left = window - 1 if window is not None and longest > window else -1
        out = varlen.varlen_attn(_token_major(query, dtype), _token_major(key, dtype), _token_major(value, dtype),
                                 cu_seqlens, cu_seqlens, longest, longest, scale=scale, window_size=(left, 0),
                                 enable_gqa=H_kv != H)                   # [B*T, H, D]
        return out.view(B, T, H, D)

    kernel.takes_window = True
    return kernel


def nested_sdpa_kernel():
    """The nested-tensor SDPA document kernel (see the module docstring)."""

    def kernel(query, key, value, docs, *, scale: float, dropout: float, packing: PackingContext):
        B, H, T, D = query.shape
        groups = H // key.shape[1]
        offsets = _on_device(packing, query.device)
        bounds = {"min_seqlen": packing.min_doc_length, "max_seqlen": packing.max_doc_length}

        def nested(t: torch.Tensor, repeat: int = 1) -> torch.Tensor:
            flat = _token_major(t, t.dtype)                              # [B*T, h, D]
            if repeat > 1:
                flat = flat.repeat_interleave(repeat, dim=1)             # K/V head i -> query heads i*g .. i*g+g-1
            return torch.nested.nested_tensor_from_jagged(flat, offsets, **bounds).transpose(1, 2)  # [docs, H, j, D]

        out = F.scaled_dot_product_attention(nested(query), nested(key, groups), nested(value, groups),
                                             dropout_p=dropout, is_causal=True, scale=scale)
        return out.transpose(1, 2).values().view(B, T, H, D)            # values: [B*T, H, D]

    kernel.takes_window = False
    return kernel


KERNELS = {"flash_varlen": flash_varlen_kernel, "nested_sdpa": nested_sdpa_kernel}


def _token_major(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, h, T, D] -> [B*T, h, D] in `dtype` (a view when t is a transposed token-major tensor,
    as transformers' un-rotated V is; otherwise one copy)."""
    B, h, T, D = t.shape
    return t.transpose(1, 2).reshape(B * T, h, D).to(dtype)


def _compute_dtype(query: torch.Tensor) -> torch.dtype:
    """The dtype attention runs in: autocast's where it is on (q may have left RoPE in fp32)."""
    device = query.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype


def _on_device(packing: PackingContext, device: torch.device) -> torch.Tensor:
    """packing.cu_seqlens on `device`: already there when the batch was moved with its context;
    otherwise copied host -> device once per forward (kept in the context's per-forward cache)."""
    if packing.cu_seqlens.device == device:
        return packing.cu_seqlens
    key = ("cu_seqlens", str(device))
    if key not in packing.kernel_cache:
        packing.kernel_cache[key] = packing.cu_seqlens.to(device)
    return packing.kernel_cache[key]


def _reference(query, key, value, docs, *, scale: float, dropout: float, packing: PackingContext,
               window: int | None):
    """One SDPA per document, and documents longer than the window recomputed exactly: what the
    core does for a kernel that takes no window, for the calls flash varlen cannot make."""
    out = sdpa_per_document(query, key, value, docs, scale=scale, dropout=dropout, packing=packing)
    for b, start, n in docs:
        if window is not None and n > window:
            q, k, v = (t[b:b + 1, :, start:start + n] for t in (query, key, value))
            o = exact_document_attention(q, k, v, scale=scale, window=window, softcap=None, dropout=dropout,
                                         training=dropout > 0)
            out[b, start:start + n] = o[0].transpose(0, 1)
    return out
