"""Write a (merged) llama-architecture model and its byte-level BPE tokenizer as a GGUF file.

GGUF (llama.cpp's format, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) is one file:
key-value metadata, then named tensors. What llama.cpp and transformers' GGUF reader
(`from_pretrained(dir, gguf_file=...)`, transformers/modeling_gguf_pytorch_utils.py) expect:

  * metadata `llama.*`: context_length, embedding_length, block_count, feed_forward_length,
    rope.dimension_count (= head_dim), rope.freq_base, attention.head_count(_kv),
    attention.layer_norm_rms_epsilon, vocab_size;
  * tensor names from gguf-py's name map (model.layers.N.self_attn.q_proj -> blk.N.attn_q,
    model.embed_tokens -> token_embd, lm_head -> output; a tied lm_head is not written);
  * Q and K rows permuted for llama.cpp's rotary layout (convert_hf_to_gguf.py `permute`): per
    head, HF's [first half | second half] rotary pairs become interleaved pairs,
        W.reshape(heads, 2, head_dim/2, in).swapaxes(1, 2).reshape(out, in)
    and the reader undoes it (`_reverse_permute_weights`); K uses the KV head count;
  * the tokenizer as `tokenizer.ggml.*`: model "gpt2" (byte-level BPE), tokens in id order,
    token types (1 normal, 3 control = special, 4 user-defined added), merges "a b",
    bos / eos / pad ids, and the chat template.

Types: f16 (2-D weights in f16, 1-D norms in f32) or q8_0 (2-D weights whose row length is a
multiple of 32 in 8-bit blocks of 32 with one f16 scale, via gguf-py's quantizer).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

GGUF_TYPES = ("f16", "q8_0")
SUPPORTED = ("llama",)


class GGUFExportError(ValueError):
    """The model or tokenizer cannot be written as GGUF; the message says what is unsupported."""


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


def _tokenizer_fields(tokenizer, vocab_size: int) -> dict:
    """tokens, token types and merges of a byte-level BPE fast tokenizer, in id order."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError("GGUF export needs a fast tokenizer (tokenizer.json)")
    spec = json.loads(backend.to_str())
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or "ByteLevel" in json.dumps(spec.get("decoder"))
    if spec["model"]["type"] != "BPE" or not byte_level:
        raise GGUFExportError(f"GGUF export supports byte-level BPE tokenizers (GPT-2 style) only; this one is "
                              f"{spec['model']['type']} without ByteLevel pre-tokenization")
    n = len(tokenizer)
    if n > vocab_size:
        raise GGUFExportError(f"tokenizer has {n} tokens but the model's vocab_size is {vocab_size}")
    added = {int(i): t for i, t in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i].content)
            types.append(3 if added[i].special else 4)
        elif i < n:
            tokens.append(tokenizer.convert_ids_to_tokens(i))
            types.append(1)
        else:  # rows of the embedding no token uses (vocab padded to a multiple)
            tokens.append(f"[PAD{i}]")
            types.append(5)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges}


def _tensor_data(name: str, tensor: torch.Tensor, qtype: str):
    """(numpy data, raw ggml type or None) for one tensor."""
    import gguf

    data = tensor.detach().float().cpu().numpy()
    if data.ndim == 1:
        return data.astype(np.float32), None  # norms and biases stay f32 (llama.cpp does the same)
    if qtype == "q8_0" and data.shape[-1] % 32 == 0:
        q = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(data, q), q
    return data.astype(np.float16), None


def export_gguf(model, tokenizer, path: str | Path, qtype: str = "f16") -> Path:
    """Write `model` (a plain transformers LlamaForCausalLM, LoRA already merged) and its
    tokenizer to `path` as GGUF of type `qtype` (f16 | q8_0). Returns the path."""
    import gguf

    config = model.config
    if qtype not in GGUF_TYPES:
        raise GGUFExportError(f"GGUF type must be one of {', '.join(GGUF_TYPES)}, got {qtype!r}")
    if config.model_type not in SUPPORTED:
        raise GGUFExportError(f"GGUF export supports llama-architecture models (model_type llama); "
                              f"this model is {config.model_type!r}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise GGUFExportError("GGUF export: llama models with attention_bias / mlp_bias are not supported")
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    if head_dim * n_head != config.hidden_size:
        raise GGUFExportError("GGUF export: head_dim * num_attention_heads != hidden_size is not supported "
                              "(the reader takes head_dim from the rope dimension)")
    fields = _tokenizer_fields(tokenizer, config.vocab_size)

    path = Path(path)
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name(getattr(config, "_name_or_path", "") or "merged")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if qtype == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(fields["tokens"])
    writer.add_token_types(fields["types"])
    writer.add_token_merges(fields["merges"])
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, key, None)
        if value is not None:
            add(int(value))
    writer.add_add_bos_token(False)  # the chat template writes whatever the model needs
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = model.get_output_embeddings() is not None and \
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # GGUF ties by leaving output.weight out
        module, _, suffix = hf_name.rpartition(".")
        gguf_name = name_map.get_name(module)
        if gguf_name is None:
            if "rotary_emb" in hf_name:
                continue
            raise GGUFExportError(f"GGUF export: no GGUF name for tensor {hf_name!r}")
        if module.endswith("self_attn.q_proj"):
            tensor = permute_qk(tensor, n_head)
        elif module.endswith("self_attn.k_proj"):
            tensor = permute_qk(tensor, n_kv)
        data, raw = _tensor_data(hf_name, tensor, qtype)
        writer.add_tensor(f"{gguf_name}.{suffix}", data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
