"""Sequence tiling: token-wise modules run over tiles of tokens, so that their wide per-token
tensors exist for one tile at a time (memory tricks: `train.mlp_tile_tokens`, `train.norm_tile_tokens`).

A module that maps each token on its own, y_n = f(x_n), can run on any split of the tokens. At long
context two such modules dominate a block's memory:

  gated MLP  down(act(gate(x)) * up(x)): g, act(g), u and g*u are [N, intermediate] each
             (Llama-3.1-8B: 14,336 wide, 1.4 GB apiece in fp16 at 48k tokens), kept for backward
             or rebuilt at once when activation checkpointing recomputes the block;
  RMSNorm    x.float(); x * rsqrt(mean(x^2) + eps); w * (.).to(dtype): keeps an fp32 copy of x and
             its eager backward makes five more fp32 [N, h] temporaries (measured on CPU).

Tiled (as DeepSpeed's ALST TiledMLP, Bekman et al. 2025, arXiv:2506.13996):

    forward    under no_grad, per tile x_k [n_k, h]:  y[k] = f(x_k)         keeps x [N, h] and y only
    backward   per tile, with grad:  y_k = f(x_k); (dx_k, dθ_k) = vjp(y_k, dy_k)
               dx[k] = dx_k;  dθ = Σ_k dθ_k     θ: the module's trainable (LoRA) parameters, fp32

Same math as the untiled module up to float reassociation (dθ is summed over tiles instead of
inside one GEMM). The module adds only its output as an [N, ·] tensor; its backward holds one
tile's intermediates and their gradients. Costs one more forward of the module per step (the
backward's); with activation checkpointing the block recompute runs the tiled forward once more
(the saved input is packed only after the forward returns, so checkpointing's early stop cannot
skip it).

Interactions, each tested (tests/model/test_tiling.py):
  - every tile is one call of the *module* (`module(x_k)`), so its forward hooks fire per tile:
    grouped LoRA (engine/layers/groups.py) projects each tile's x_k once for gate and up;
  - LoRA dropout: the RNG state is saved before the first tile and restored in backward, whose
    recompute runs the tiles in the same order, so every tile draws the masks it drew in forward
    (torch.utils.checkpoint does the same per block); the global RNG is left as it was. The masks
    are not the untiled MLP's (other shapes draw other numbers): same distribution, not same bits;
  - autocast: the backward recompute runs under the forward's autocast state;
  - calls of at most one tile (generation, short rows) run the module as it is;
  - a tiled RMSNorm is not compiled by speed.compile (compile_norms skips it).
"""

from __future__ import annotations

import math

import torch
from torch import nn

TILED_MLP_CHILDREN = (("gate_proj", "up_proj", "down_proj"), ("gate_up_proj", "down_proj"))
"""The gated MLPs this knows: Llama / Mistral / Qwen2 / Qwen3 / Gemma, and Phi-3's fused gate|up."""


class TilingError(ValueError):
    """The model has no module this can tile, or the setting is wrong; the message names the key."""


def auto_tile_tokens(hidden_size: int) -> int:
    """`train.*_tile_tokens=auto`: tiles of `hidden_size` tokens (ALST's choice: one tile's
    [n, intermediate] tensor is then about the size of one MLP weight), so rows up to
    `hidden_size` tokens run untiled."""
    return int(hidden_size)


def resolve_tile_tokens(setting, hidden_size: int, key: str = "train.mlp_tile_tokens") -> int:
    """The tile length for a `train.*_tile_tokens` setting (an int >= 0, 0 = off, or "auto")."""
    if setting == "auto":
        return auto_tile_tokens(hidden_size)
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise TilingError(f"{key}: must be an integer >= 0 or 'auto', got {setting!r}")
    return setting


def tile_bounds(n: int, tile_tokens: int) -> list[tuple[int, int]]:
    """[start, end) of ceil(n / tile_tokens) tiles of near-equal length (none longer than tile_tokens)."""
    tiles = max(1, math.ceil(n / tile_tokens))
    size, extra = divmod(n, tiles)
    bounds, start = [], 0
    for k in range(tiles):
        end = start + size + (1 if k < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def _uses_rng(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Dropout) and m.p > 0 and m.training for m in module.modules())


class _Tiled(torch.autograd.Function):
    """y = module(x) tile by tile; backward recomputes each tile with grad (module docstring)."""

    @staticmethod
    def forward(ctx, tiled, x, *params):
        # runs under no_grad (autograd.Function): no tile keeps anything for backward
        device = x.device
        ctx.tiled = tiled
        ctx.autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        ctx.rng = None
        if _uses_rng(tiled.module):
            ctx.rng = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
        flat = x.reshape(-1, x.shape[-1])                               # [N, h]
        out = None
        for start, end in tile_bounds(flat.shape[0], tiled.tile_tokens):
            y = tiled.call_tile(flat[start:end])                        # [n_k, h_out]
            if out is None:
                out = y.new_empty(flat.shape[0], y.shape[-1])
            out[start:end] = y
        ctx.save_for_backward(x)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        tiled, device = ctx.tiled, x.device
        params = tiled.trainable_parameters()
        want_x = ctx.needs_input_grad[1]
        want = [p for p, need in zip(params, ctx.needs_input_grad[2:]) if need]
        flat = x.detach().reshape(-1, x.shape[-1])                      # [N, h]
        grad_flat = grad_out.reshape(-1, grad_out.shape[-1])            # [N, h_out]
        dx = torch.empty_like(flat) if want_x else None
        sums: list[torch.Tensor | None] = [None] * len(want)            # dθ, in the parameters' dtype
        fork = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [],
                                     enabled=ctx.rng is not None, device_type=device.type)
        enabled, dtype = ctx.autocast
        with fork, torch.enable_grad(), torch.autocast(device.type, dtype=dtype, enabled=enabled):
            if ctx.rng is not None:
                torch.set_rng_state(ctx.rng[0])
                if ctx.rng[1] is not None:
                    torch.cuda.set_rng_state(ctx.rng[1], device)
            for start, end in tile_bounds(flat.shape[0], tiled.tile_tokens):  # the forward's order
                x_k = flat[start:end].requires_grad_(want_x)            # a view of the saved x
                y_k = tiled.call_tile(x_k)
                grads = torch.autograd.grad(y_k, ([x_k] if want_x else []) + want, grad_flat[start:end],
                                            allow_unused=True)
                if want_x:
                    dx[start:end] = grads[0]
                    grads = grads[1:]
                for j, g in enumerate(grads):
                    if g is not None:
                        sums[j] = g if sums[j] is None else sums[j].add_(g)
                del y_k, grads                                          # the tile's graph goes here
        by_param = {id(p): s for p, s in zip(want, sums)}
        param_grads = [by_param.get(id(p)) for p in params]
        return (None, dx.view_as(x) if want_x else None, *param_grads)


class TiledForward:
    """A token-wise module's `forward` replaced by the tiled one (installed by `tile_mlps` /
    `tile_norms`; the module, its parameters and their names stay as they are). Calls of at most
    `tile_tokens` rows, and the per-tile calls themselves (`_in_tile`), run the class's forward.
    Rows are x's leading dimensions flattened: tokens (a per-head norm: tokens x heads)."""

    def __init__(self, module: nn.Module, tile_tokens: int, inner=None):
        self.module = module
        self.tile_tokens = tile_tokens
        self.inner = inner  # a forward the tiles run instead of the class's (the fused blocks'), or None
        self._in_tile = False

    def trainable_parameters(self) -> list[torch.Tensor]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def call_tile(self, x: torch.Tensor) -> torch.Tensor:
        """The module called on one tile (its hooks fire: grouped LoRA works per tile)."""
        self._in_tile = True
        try:
            return self.module(x)
        finally:
            self._in_tile = False

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        tokens = x.numel() // x.shape[-1]
        if self._in_tile or args or kwargs or tokens <= self.tile_tokens:
            if self.inner is not None:
                return self.inner(x, *args, **kwargs)
            return type(self.module).forward(self.module, x, *args, **kwargs)
        params = self.trainable_parameters()
        if not torch.is_grad_enabled() or not (x.requires_grad or params):
            with torch.no_grad():  # nothing to differentiate: the tiles alone (evaluation at long context)
                flat = x.reshape(-1, x.shape[-1])
                return torch.cat([self.call_tile(flat[s:e]) for s, e in tile_bounds(tokens, self.tile_tokens)]
                                 ).view(*x.shape[:-1], -1)
        return _Tiled.apply(self, x, *params)


def is_tiled(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("forward"), TiledForward)


def find_mlps(model: nn.Module) -> dict[str, nn.Module]:
    """The decoder blocks' gated MLPs: modules named `...mlp` with the children of one of
    TILED_MLP_CHILDREN (MoE blocks and ungated MLPs are not among them)."""
    found = {}
    for name, module in model.named_modules():
        children = dict(module.named_children())
        if name.rsplit(".", 1)[-1] == "mlp" and any(all(c in children for c in kids) for kids in TILED_MLP_CHILDREN):
            found[name] = module
    return found


def find_norms(model: nn.Module) -> dict[str, nn.Module]:
    """Every RMSNorm (a class named *RMSNorm: the blocks' two, the final one, Qwen3's per-head q/k norms)."""
    return {name: m for name, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")}


def _tile(modules: dict[str, nn.Module], tile_tokens: int, key: str) -> int:
    if isinstance(tile_tokens, bool) or not isinstance(tile_tokens, int) or tile_tokens < 0:
        raise TilingError(f"{key}: must be an integer >= 0, got {tile_tokens!r}")
    for name, module in modules.items():
        current = module.__dict__.get("forward")
        inner = current.inner if is_tiled(module) else current
        if inner is not None and not getattr(inner, "runs_in_tiles", False):
            raise TilingError(f"{key}: {name}'s forward is already replaced (a compiled norm?): tile before "
                              "speed.apply, which leaves tiled modules alone")
        if current is not None:
            del module.forward
        if tile_tokens:
            module.forward = TiledForward(module, tile_tokens, inner)
        elif inner is not None:
            module.forward = inner  # untiled: the fused forward it wrapped, as before
    return len(modules) if tile_tokens else 0


def tile_mlps(model: nn.Module, tile_tokens: int) -> int:
    """Run every decoder block's gated MLP over tiles of at most `tile_tokens` tokens (0: untiled
    again). Returns how many MLPs are tiled. Idempotent and reversible; module names, parameters
    and state-dict keys do not change."""
    mlps = find_mlps(model)
    if tile_tokens and not mlps:
        raise TilingError(f"train.mlp_tile_tokens: {type(model).__name__} has no gated MLP to tile "
                          f"(a module named 'mlp' with children {' / '.join(map(str, TILED_MLP_CHILDREN))})")
    return _tile(mlps, tile_tokens, "train.mlp_tile_tokens")


def tile_norms(model: nn.Module, tile_tokens: int) -> int:
    """Run every RMSNorm over tiles of at most `tile_tokens` rows (0: untiled again): it keeps its
    input in its own dtype instead of an fp32 copy, and its backward's fp32 temporaries exist for
    one tile. Returns how many norms are tiled. Idempotent and reversible."""
    norms = find_norms(model)
    if tile_tokens and not norms:
        raise TilingError(f"train.norm_tile_tokens: {type(model).__name__} has no RMSNorm to tile")
    return _tile(norms, tile_tokens, "train.norm_tile_tokens")
