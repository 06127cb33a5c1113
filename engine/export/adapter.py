"""Adapter files in the PEFT layout, so PEFT, vLLM and llama.cpp's converters can read them (FIELD.md bug 8).

    adapter_model.safetensors   base_model.model.<module path>.lora_A.weight  [r, in]   fp32
                                base_model.model.<module path>.lora_B.weight  [out, r]  fp32
                                base_model.model.<module path>.lora_magnitude_vector  [out]  fp32 (DoRA)
    adapter_config.json         peft_type LORA, r, lora_alpha, target_modules, use_dora, ...

PEFT writes the same keys (no adapter name); `load_adapter` also accepts keys without the
`base_model.model.` prefix or with an adapter name (`lora_A.default.weight`,
`lora_magnitude_vector.default.weight`).

Variants: DoRA adapters are saved as PEFT saves them (`use_dora: true` + the magnitudes). A PiSSA
adapter is saved *converted* to the plain rank-2r LoRA it amounts to on the original base
weights (engine/layers/pissa.py; PEFT's `path_initial_model_for_weight_conversion`), so it loads
wherever a LoRA adapter does. Adapters that still need a mutated base (PEFT files saved with
init_lora_weights = "pissa", "olora", "corda", "loftq", ... without conversion) are refused.
"""

from __future__ import annotations

import json
import math
import os
import re

import torch
from torch import nn

from engine.config import PeftConfig
from engine.layers.lora import lora_modules, lora_state_dict, mark_only_lora_trainable
from engine.layers.inject import inject_lora, target_modules_for_config
from engine.layers.pissa import converted_alpha, is_pissa, pissa_to_lora

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
CHAT_TEMPLATE_NAME = "chat_template.jinja"
PREFIX = "base_model.model."
_KEY = re.compile(r"(?P<module>.+)\.(?:(?P<which>lora_A|lora_B)(?:\.[^.]+)?\.weight"
                 r"|(?P<magnitude>lora_magnitude_vector)(?:\.[^.]+)?(?:\.weight)?)")
# init_lora_weights values of PEFT methods that change the base weights: such a file only works
# on that changed base (PEFT converts them to plain LoRA with path_initial_model_for_weight_conversion).
_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


class AdapterError(ValueError):
    """An adapter file does not fit the model; the message names the file and key."""


class AdapterNotFoundError(FileNotFoundError):
    """The adapter directory or one of its files is missing."""


def _atomic_write(path: str, write) -> None:
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)  # a crash never leaves a half-written file under the real name


def save_adapter(model: nn.Module, out_dir: str, peft_cfg: PeftConfig, base_model_name_or_path: str,
                 chat_template: str | None = None) -> None:
    """Write adapter_model.safetensors + adapter_config.json for every LoRALinear in `model`, and
    `chat_template.jinja` when training used its own template (data.chat_template): generate, merge
    and export read it back (adapter_chat_template) in place of the base tokenizer's.

    DoRA layers add their magnitudes (`use_dora: true`). PiSSA layers (peft_cfg.init == "pissa")
    are written converted: A' = [A; A0], B' = [B, -B0], r' = 2r, alpha' = `converted_alpha`,
    `init_lora_weights: true`, i.e. a plain LoRA adapter for the original base weights."""
    from safetensors.torch import save_file

    modules = lora_modules(model)
    if not modules:
        raise AdapterError("save_adapter: the model has no LoRA layers")
    pissa = peft_cfg.init == "pissa"
    for name, m in modules.items():
        if m.r != peft_cfg.r or m.alpha != peft_cfg.alpha or m.use_rslora != peft_cfg.use_rslora:
            raise AdapterError(f"save_adapter: layer {name} has r={m.r}, alpha={m.alpha}, rslora={m.use_rslora} but "
                               f"peft config says r={peft_cfg.r}, alpha={peft_cfg.alpha}, rslora={peft_cfg.use_rslora}")
        if m.merged:
            raise AdapterError(f"save_adapter: layer {name} is merged; unmerge before saving the adapter")
        dora = getattr(m, "lora_magnitude_vector", None) is not None
        if dora != peft_cfg.use_dora:
            raise AdapterError(f"save_adapter: layer {name} is {'a DoRA' if dora else 'a plain LoRA'} layer but "
                               f"peft config says use_dora={peft_cfg.use_dora}")
        if is_pissa(m) != pissa:
            raise AdapterError(f"save_adapter: layer {name} {'has' if is_pissa(m) else 'has no'} PiSSA initial "
                               f"weights but peft config says init={peft_cfg.init!r}")
    tensors = {}
    for key, value in lora_state_dict(model).items():
        # one sync per tensor, deliberate: files need CPU memory; contiguous fp32 copies
        tensors[PREFIX + key] = value.detach().float().contiguous().cpu()
    r, alpha = peft_cfg.r, peft_cfg.alpha
    if pissa:  # the change to the original W, as a rank-2r plain LoRA (engine/layers/pissa.py)
        for name, m in modules.items():
            a, b = pissa_to_lora(m)
            tensors[f"{PREFIX}{name}.lora_A.weight"] = a.contiguous().cpu()
            tensors[f"{PREFIX}{name}.lora_B.weight"] = b.contiguous().cpu()
        r, alpha = 2 * r, converted_alpha(alpha, peft_cfg.use_rslora)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": peft_cfg.dropout,
        "target_modules": target_modules_for_config(model, peft_cfg.targets),
        "bias": "none",
        "use_rslora": peft_cfg.use_rslora,
        # GPT-2-style Conv1D targets (nn.Linear here, engine/model/build.py): PEFT marks them so; the
        # A and B tensors are the same either way
        "fan_in_fan_out": any(n in getattr(model, "_engine_conv1d", ()) for n in modules),
        "base_model_name_or_path": base_model_name_or_path,
        "modules_to_save": None,
        "init_lora_weights": True,
        "use_dora": peft_cfg.use_dora,
        "inference_mode": True,
        "revision": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    os.makedirs(out_dir, exist_ok=True)
    _atomic_write(os.path.join(out_dir, WEIGHTS_NAME), lambda p: save_file(tensors, p, metadata={"format": "pt"}))

    def write_config(p):
        with open(p, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
    _atomic_write(os.path.join(out_dir, CONFIG_NAME), write_config)
    if chat_template is not None:
        def write_template(p):
            with open(p, "w", encoding="utf-8") as f:
                f.write(chat_template)
        _atomic_write(os.path.join(out_dir, CHAT_TEMPLATE_NAME), write_template)


def adapter_chat_template(adapter_dir: str | None) -> str | None:
    """The chat template the adapter was trained with (its chat_template.jinja), or None."""
    path = os.path.join(adapter_dir, CHAT_TEMPLATE_NAME) if adapter_dir else None
    if path is None or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


def read_adapter_config(adapter_dir: str) -> dict:
    """adapter_config.json as a dict, checked for the fields and options this engine supports."""
    path = os.path.join(adapter_dir, CONFIG_NAME)
    if not os.path.isdir(adapter_dir):
        raise AdapterNotFoundError(f"adapter directory {adapter_dir!r} does not exist")
    if not os.path.isfile(path):
        raise AdapterNotFoundError(f"{path} does not exist")
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as err:
        raise AdapterError(f"{path}: not valid JSON ({err})") from None
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise AdapterError(f"{path}: missing field {key!r}")
    unsupported = {"peft_type": (config.get("peft_type", "LORA"), "LORA"),
                   "bias": (config.get("bias") or "none", "none"),
                   "modules_to_save": (config.get("modules_to_save") or None, None),
                   "rank_pattern": (config.get("rank_pattern") or {}, {}),
                   "alpha_pattern": (config.get("alpha_pattern") or {}, {}),
                   "layers_to_transform": (config.get("layers_to_transform"), None)}
    for key, (value, supported) in unsupported.items():
        if value != supported:
            raise AdapterError(f"{path}: {key}={value!r} is not supported (only {supported!r})")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_MUTATING_INITS):
        raise AdapterError(f"{path}: init_lora_weights={init!r}: this adapter applies to base weights that "
                           f"{init!r} initialisation changed, not to the original model; convert it to a plain "
                           "LoRA adapter first (PEFT: save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    return config


def _targets_from_config(target_modules) -> str | list[str]:
    # PEFT: a str is a regex fullmatched against module names; a list holds name suffixes.
    if isinstance(target_modules, str) and target_modules != "all-linear":
        return "re:" + target_modules
    return target_modules


def _is_unchanged_base_weight(params: dict[str, torch.Tensor], name: str, tensor: torch.Tensor) -> bool:
    """True if `name` is a frozen base parameter of the model holding exactly `tensor`."""
    param = params.get(name, params.get(name.replace(".weight", ".base_layer.weight")))
    return (param is not None and tensor.shape == param.shape
            and torch.equal(tensor.to(param.device, param.dtype), param.detach()))


def load_adapter(model: nn.Module, adapter_dir: str, is_trainable: bool = False) -> nn.Module:
    """Load an adapter written by `save_adapter` or by PEFT into `model` (in place; returns it).

    Injects LoRA (DoRA with `use_dora: true`) per adapter_config.json when the model has none yet
    (otherwise checks the existing layers have the config's scaling and variant), then copies
    every tensor in, checking that each key names a LoRA layer, each shape fits and every LoRA
    layer gets all its tensors (A, B, and the magnitude for DoRA).
    `is_trainable` leaves the adapter trainable (resume); otherwise the whole model is frozen.
    """
    from safetensors import safe_open

    config = read_adapter_config(adapter_dir)
    weights_path = os.path.join(adapter_dir, WEIGHTS_NAME)
    if not os.path.isfile(weights_path):
        raise AdapterNotFoundError(f"{weights_path} does not exist")
    r, alpha, rslora = int(config["r"]), float(config["lora_alpha"]), bool(config.get("use_rslora", False))
    dora = bool(config.get("use_dora") or False)
    modules = lora_modules(model)
    if not modules:
        inject_lora(model, _targets_from_config(config["target_modules"]), r, alpha,
                    float(config.get("lora_dropout") or 0.0), rslora, require_each=False, use_dora=dora)
        modules = lora_modules(model)
    scaling = alpha / math.sqrt(r) if rslora else alpha / r
    for name, m in modules.items():
        if not math.isclose(m.scaling, scaling):
            raise AdapterError(f"{adapter_dir}: layer {name} has LoRA scaling {m.scaling:g}, the adapter config "
                               f"gives {scaling:g} (r={r}, lora_alpha={alpha}, use_rslora={rslora})")
        if (getattr(m, "lora_magnitude_vector", None) is not None) != dora:
            raise AdapterError(f"{adapter_dir}: layer {name} is {'not ' if dora else ''}a DoRA layer but the adapter "
                               f"config has use_dora={dora}")

    params = dict(model.named_parameters(remove_duplicate=False))
    seen: set[tuple[str, str]] = set()
    with safe_open(weights_path, framework="pt", device="cpu") as f:
        for key in f.keys():
            match = _KEY.fullmatch(key.removeprefix(PREFIX))
            if match is None and _is_unchanged_base_weight(params, key.removeprefix(PREFIX), f.get_tensor(key)):
                continue  # PEFT saves a targeted (tied) embedding / lm_head's base weight alongside
            module = modules.get(match["module"]) if match else None
            if module is None:
                raise AdapterError(f"{weights_path}: key {key!r} matches no LoRA layer of the model "
                                   f"(LoRA layers look like {sorted(modules)[:2]})")
            which = match["which"] or match["magnitude"]
            if which == "lora_magnitude_vector" and not dora:
                raise AdapterError(f"{weights_path}: key {key!r} is a DoRA magnitude but {CONFIG_NAME} has "
                                   "use_dora=false")
            target = module.lora_magnitude_vector if match["magnitude"] else getattr(module, which).weight
            tensor = f.get_tensor(key)
            if tensor.shape != target.shape:
                slot = which if match["magnitude"] else which + ".weight"
                raise AdapterError(f"{weights_path}: key {key!r} has shape {tuple(tensor.shape)}, the model's "
                                   f"{match['module']}.{slot} has {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(tensor.to(device=target.device, dtype=target.dtype))
            seen.add((match["module"], which))
    kinds = ("lora_A.weight", "lora_B.weight") + (("lora_magnitude_vector",) if dora else ())
    missing = [f"{PREFIX}{n}.{k}" for n in modules for k in kinds if (n, k.removesuffix(".weight")) not in seen]
    if missing:
        raise AdapterError(f"{weights_path}: no tensor for key {missing[0]!r}"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if is_trainable:
        mark_only_lora_trainable(model)
    else:
        model.requires_grad_(False)
    return model
