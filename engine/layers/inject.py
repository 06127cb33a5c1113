"""Which linears get an adapter (`find_targets`), and the explicit module swap (`inject_lora`).

Targets are "all-linear" (every linear in the decoder blocks), suffixes of module names, or a
regex; the swap replaces each chosen `nn.Linear` / bnb `Linear4bit` by a `LoRALinear` (or a
`DoRALinear`) wrapping it, in module order.
"""

from __future__ import annotations

import re
from typing import Iterable

from torch import nn

from engine.layers.dora import DoRALinear
from engine.layers.lora import LoRALinear, LoRATargetError


# ----------------------------------------------------------------------------- target matching

def _decoder_block_types(model: nn.Module) -> set[str]:
    # transformers lists the decoder block classes in `_no_split_modules` (e.g. LlamaDecoderLayer).
    return set(getattr(model, "_no_split_modules", None) or ())


def _linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every nn.Linear / Linear4bit not already inside a LoRALinear, with its full name."""
    inside_lora = {name for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any(name.startswith(p + ".") for p in inside_lora)]


def _in_decoder_blocks(model: nn.Module) -> set[str]:
    """Names of linears inside a decoder block (fallback: every linear but the output layer)."""
    block_types = _decoder_block_types(model)
    blocks = [name for name, m in model.named_modules() if type(m).__name__ in block_types]
    linears = _linears(model)
    if blocks:
        return {n for n, _ in linears if any(n.startswith(b + ".") for b in blocks)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n for n, m in linears if m is not head}


def find_targets(model: nn.Module, targets: str | Iterable[str], require_each: bool = True) -> list[str]:
    """Full names of the linears `targets` selects, in module order.

    targets: "all-linear" (every linear in the decoder blocks; lm_head only if also named),
    "re:<regex>" (re.fullmatch on the full module name), or a list of module-name suffixes
    (matching whole dotted components: "q_proj" matches "model.layers.0.self_attn.q_proj"),
    which may include "all-linear". A suffix that matches no linear is an error, unless
    `require_each=False` (PEFT's rule, used for adapter configs: only matching nothing at all is).
    """
    linears = _linears(model)
    names = [n for n, _ in linears]
    if isinstance(targets, str):
        if targets.startswith("re:"):
            try:
                pattern = re.compile(targets[3:])
            except re.error as err:
                raise LoRATargetError(f"targets regex {targets[3:]!r} does not compile: {err}") from None
            chosen = {n for n in names if pattern.fullmatch(n)}
            if not chosen:
                raise LoRATargetError(f"targets regex {targets[3:]!r} matches no linear layer "
                                      f"(linears look like {names[:3]})")
            return [n for n in names if n in chosen]
        targets = [targets]
    chosen: set[str] = set()
    for target in targets:
        if target == "all-linear":
            hits = _in_decoder_blocks(model)
        else:
            hits = {n for n in names if n == target or n.endswith("." + target)}
        if not hits and require_each:
            raise LoRATargetError(f"target {target!r} matches no linear layer (linear names end in {_leaves(names)})")
        chosen |= hits
    if not chosen:
        raise LoRATargetError(f"targets {list(targets)} match no linear layer (linear names end in {_leaves(names)})")
    return [n for n in names if n in chosen]


def _leaves(names: list[str]) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def target_modules_for_config(model: nn.Module, targets: str | Iterable[str]) -> str | list[str]:
    """What PEFT's `target_modules` must hold to wrap exactly the LoRALinears in `model`.

    A regex target stays the regex (PEFT fullmatches a str the same way). Otherwise: the leaf
    names (e.g. "q_proj") whose every linear is wrapped, plus full paths for the rest.
    """
    if isinstance(targets, str) and targets.startswith("re:"):
        return targets[3:]
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    unwrapped = [n for n, _ in _linears(model) if not n.endswith(".base_layer")]
    out: set[str] = set()
    for name in wrapped:
        leaf = name.rsplit(".", 1)[-1]
        clash = any(u == leaf or u.endswith("." + leaf) for u in unwrapped)
        out.add(name if clash else leaf)
    return sorted(out)


# ----------------------------------------------------------------------------- injection

def inject_lora(model: nn.Module, targets: str | Iterable[str], r: int, alpha: float,
                dropout: float = 0.0, use_rslora: bool = False, require_each: bool = True,
                use_dora: bool = False) -> list[str]:
    """Replace every targeted linear (see `find_targets`) by a `LoRALinear` (a `DoRALinear` with
    use_dora); returns their names.

    A and B are drawn from the global torch RNG in module order, so seed before calling.
    Does not freeze anything: call `mark_only_lora_trainable` after.
    """
    layer_cls = DoRALinear if use_dora else LoRALinear
    names = find_targets(model, targets, require_each)
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, leaf)
        setattr(parent, leaf, layer_cls(base, r, alpha, dropout, use_rslora))
    return names
