"""The planner's view of a model: its block shape from a transformers config (or a known
`shape:NAME`), the planner's constants, and which LoRA targets a setting names."""


from __future__ import annotations

import os
import re
from dataclasses import dataclass
from engine.training.loss import logit_transform
from engine.model.build import default_model_path


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
    logit_transform: bool = False  # logit scale / soft-capping (engine.training.loss.logit_transform is not None)
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
    """(per-layer sets of targeted linear names, lm_head targeted?), as `engine.layers.lora.find_targets`
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
