"""Per-family GGUF layout: llama.cpp's architecture name, hyper-parameter keys and tensor transforms.

What llama.cpp's convert_hf_to_gguf.py does per family, and what transformers' GGUF reader
(modeling_gguf_pytorch_utils.py) undoes on the way back:

  family (model_type)   GGUF arch   Q/K rows permuted   norm weights   notes
  llama, mistral        llama       yes                 w              rotary pairs interleaved
  qwen2                 qwen2       no                  w              q/k/v biases (f32)
  qwen3                 qwen3       no                  w              q_norm / k_norm per head
  phi3                  phi3        no                  w              fused attn_qkv, ffn_up = [gate; up]
  gemma                 gemma       no                  1 + w          tied head; no transformers reader
  gemma2                gemma2      no                  1 + w          pre/post norms, logit soft-capping

Permutation (llama.cpp's rotary layout): per head, HF's [first half | second half] rotary pairs
become interleaved pairs, W.reshape(heads, 2, head_dim/2, in).swapaxes(1, 2).reshape(out, in);
K uses the KV head count. Gemma's RMSNorm computes x * (1 + w), llama.cpp's x * w, so the
file stores 1 + w. Tensor names come from gguf-py's map (model.layers.N.self_attn.q_proj ->
blk.N.attn_q; Phi-3's qkv_proj -> attn_qkv and gate_up_proj -> ffn_up keep their fused layout,
which is llama.cpp's).
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import torch


class GGUFExportError(ValueError):
    """The model or tokenizer cannot be written as GGUF; the message says what is unsupported."""


@dataclass(frozen=True)
class Family:
    arch: str                 # general.architecture
    model_arch: gguf.MODEL_ARCH
    permute_qk: bool = False
    norm_plus_one: bool = False
    readable: bool = True     # transformers' GGUF loader reads this architecture back


FAMILIES = {
    "llama": Family("llama", gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "mistral": Family("llama", gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "qwen2": Family("qwen2", gguf.MODEL_ARCH.QWEN2),
    "qwen3": Family("qwen3", gguf.MODEL_ARCH.QWEN3),
    "phi3": Family("phi3", gguf.MODEL_ARCH.PHI3),
    "gemma": Family("gemma", gguf.MODEL_ARCH.GEMMA, norm_plus_one=True, readable=False),
    "gemma2": Family("gemma2", gguf.MODEL_ARCH.GEMMA2, norm_plus_one=True),
}


def family_of(config) -> Family:
    if config.model_type not in FAMILIES:
        raise GGUFExportError(f"GGUF export supports model_type {', '.join(FAMILIES)}; this model is "
                              f"{config.model_type!r}")
    if config.model_type == "gemma2":
        n_head, _, head_dim = _heads(config)
        scalar = getattr(config, "query_pre_attn_scalar", head_dim)
        if scalar not in (head_dim, config.hidden_size // n_head):
            raise GGUFExportError(f"GGUF export: gemma2 with query_pre_attn_scalar={scalar}: llama.cpp scales queries "
                                  f"by head_dim ({head_dim}) or hidden_size / heads only")
    for flag in ("attention_bias", "mlp_bias"):
        if config.model_type in ("llama", "mistral") and getattr(config, flag, False):
            raise GGUFExportError(f"GGUF export: {config.model_type} models with {flag} are not supported")
    return FAMILIES[config.model_type]


def permute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotary layout -> llama.cpp's (module docstring); weight [heads*head_dim, ...] or bias."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _rope_theta(config) -> float:
    # transformers 5 keeps rope_theta and the scaling type together in rope_parameters
    # (rope_scaling is an alias of the same dict).
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise GGUFExportError(f"GGUF export: rope type {rope_type!r} / rope_scaling is not supported (default RoPE only)")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise GGUFExportError("GGUF export: the config has no rope_theta")
    return float(theta)


def _heads(config) -> tuple[int, int, int]:
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    return n_head, n_kv, head_dim


def add_hparams(writer: gguf.GGUFWriter, config, family: Family) -> None:
    """The `<arch>.*` hyper-parameters llama.cpp reads for this family."""
    n_head, n_kv, head_dim = _heads(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_vocab_size(config.vocab_size)
    if family.arch in ("llama", "phi3"):
        rotary = int(head_dim * getattr(config, "partial_rotary_factor", 1.0) or head_dim)
        writer.add_rope_dimension_count(rotary)
    if family.arch in ("qwen3", "gemma", "gemma2") or head_dim * n_head != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if family.arch == "gemma2":
        if config.attn_logit_softcapping is not None:
            writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        if config.final_logit_softcapping is not None:
            writer.add_final_logit_softcapping(config.final_logit_softcapping)
    window = getattr(config, "sliding_window", None)
    if family.arch in ("gemma2", "phi3") and window:
        writer.add_sliding_window(window)


def gguf_tensor(family: Family, config, name_map, hf_name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """(GGUF name, tensor in llama.cpp's layout) for one HF tensor; None for tensors GGUF leaves
    out (rotary buffers). Unknown names are an error naming the tensor."""
    module, _, suffix = hf_name.rpartition(".")
    gguf_name = name_map.get_name(module)
    if gguf_name is None:
        if "rotary_emb" in hf_name:
            return None
        raise GGUFExportError(f"GGUF export ({family.arch}): no GGUF name for tensor {hf_name!r}")
    if family.permute_qk:
        n_head, n_kv, _ = _heads(config)
        if module.endswith("self_attn.q_proj"):
            tensor = permute_qk(tensor, n_head)
        elif module.endswith("self_attn.k_proj"):
            tensor = permute_qk(tensor, n_kv)
    if family.norm_plus_one and suffix == "weight" and gguf_name.endswith("norm"):
        tensor = tensor.float() + 1
    return f"{gguf_name}.{suffix}", tensor
