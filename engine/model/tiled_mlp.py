"""Sequence-tiled MLP: a decoder block's MLP run over tiles of tokens, so that its [tokens,
intermediate] tensors exist for one tile at a time (a memory trick: `train.mlp_tile_tokens`).

A gated MLP is token-wise, y_n = down(act(gate(x_n)) * up(x_n)) for each token n, so it can run
on any split of the tokens. At long context its intermediates dominate a block's memory: g, act(g),
u and g*u are [N, intermediate] each (Llama-3.1-8B: 14,336 wide, 1.4 GB apiece in fp16 at 48k
tokens), kept for backward, or rebuilt all at once when activation checkpointing recomputes the
block. Tiled (as DeepSpeed's ALST TiledMLP, Bekman et al. 2025, arXiv:2506.13996):

    forward    under no_grad, per tile x_k [n_k, h]:  y[k] = mlp(x_k)       keeps x [N, h] and y only
    backward   per tile, with grad:  y_k = mlp(x_k); (dx_k, dθ_k) = vjp(y_k, dy_k)
               dx[k] = dx_k;  dθ = Σ_k dθ_k     θ: the MLP's trainable (LoRA) parameters, fp32

Same math as the untiled MLP up to float reassociation (dθ is summed over tiles instead of inside
one GEMM). The MLP's own output is the only [N, ·] tensor it adds; the backward holds one tile's
intermediates and their gradients. Costs one more MLP forward per step (the backward's); with
activation checkpointing the block recompute runs the tiled forward once more (the MLP's saved
input is packed only after its forward returns, so checkpointing's early stop cannot skip it).

Interactions, each tested (tests/model/test_tiled_mlp.py):
  - every tile is one call of the MLP *module* (`mlp(x_k)`), so its forward hooks fire per tile:
    grouped LoRA (engine/layers/groups.py) projects each tile's x_k once for gate and up;
  - LoRA dropout: the RNG state is saved before the first tile and restored in backward, whose
    recompute runs the tiles in the same order, so every tile draws the masks it drew in forward
    (torch.utils.checkpoint does the same per block); the global RNG is left as it was. The masks
    are not the untiled MLP's (other shapes draw other numbers): same distribution, not same bits;
  - autocast: the backward recompute runs under the forward's autocast state;
  - calls of at most one tile (generation, short rows) run the MLP as it is.
"""

from __future__ import annotations

import math

import torch
from torch import nn

TILED_MLP_CHILDREN = (("gate_proj", "up_proj", "down_proj"), ("gate_up_proj", "down_proj"))
"""The gated MLPs this knows: Llama / Mistral / Qwen2 / Qwen3 / Gemma, and Phi-3's fused gate|up."""


class TiledMLPError(ValueError):
    """The model has no MLP this can tile, or the setting is wrong; the message names the key."""


def auto_tile_tokens(hidden_size: int) -> int:
    """`train.mlp_tile_tokens=auto`: tiles of `hidden_size` tokens (ALST's choice: one tile's
    [n, intermediate] tensor is then about the size of one MLP weight), so rows up to
    `hidden_size` tokens run untiled."""
    return int(hidden_size)


def resolve_tile_tokens(setting, hidden_size: int) -> int:
    """The tile length for `train.mlp_tile_tokens` (an int >= 0, 0 = off, or "auto")."""
    if setting == "auto":
        return auto_tile_tokens(hidden_size)
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise TiledMLPError(f"train.mlp_tile_tokens: must be an integer >= 0 or 'auto', got {setting!r}")
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


class _TiledMLP(torch.autograd.Function):
    """y = mlp(x) tile by tile; backward recomputes each tile with grad (module docstring)."""

    @staticmethod
    def forward(ctx, tiled, x, *params):
        # runs under no_grad (autograd.Function): no tile keeps anything for backward
        device = x.device
        ctx.tiled = tiled
        ctx.autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        ctx.rng = None
        if _uses_rng(tiled.mlp):
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
    """An MLP's `forward` replaced by the tiled one (installed by `tile_mlps`; the module, its
    parameters and their names stay as they are). Calls of at most `tile_tokens` tokens, and the
    per-tile calls themselves (`_in_tile`), run the class's own forward."""

    def __init__(self, mlp: nn.Module, tile_tokens: int):
        self.mlp = mlp
        self.tile_tokens = tile_tokens
        self._in_tile = False

    def trainable_parameters(self) -> list[torch.Tensor]:
        return [p for p in self.mlp.parameters() if p.requires_grad]

    def call_tile(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP module called on one tile (its hooks fire: grouped LoRA works per tile)."""
        self._in_tile = True
        try:
            return self.mlp(x)
        finally:
            self._in_tile = False

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        plain = type(self.mlp).forward
        tokens = x.numel() // x.shape[-1]
        if self._in_tile or args or kwargs or tokens <= self.tile_tokens:
            return plain(self.mlp, x, *args, **kwargs)
        params = self.trainable_parameters()
        if not torch.is_grad_enabled() or not (x.requires_grad or params):
            with torch.no_grad():  # nothing to differentiate: the tiles alone (evaluation at long context)
                flat = x.reshape(-1, x.shape[-1])
                return torch.cat([self.call_tile(flat[s:e]) for s, e in tile_bounds(tokens, self.tile_tokens)]
                                 ).view(*x.shape[:-1], -1)
        return _TiledMLP.apply(self, x, *params)


def is_tiled_mlp(module: nn.Module) -> bool:
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


def tile_mlps(model: nn.Module, tile_tokens: int) -> int:
    """Run every decoder block's gated MLP over tiles of at most `tile_tokens` tokens (0: untiled
    again). Returns how many MLPs are tiled. Idempotent and reversible; module names, parameters
    and state-dict keys do not change."""
    if isinstance(tile_tokens, bool) or not isinstance(tile_tokens, int) or tile_tokens < 0:
        raise TiledMLPError(f"train.mlp_tile_tokens: must be an integer >= 0, got {tile_tokens!r}")
    mlps = find_mlps(model)
    for mlp in mlps.values():
        if is_tiled_mlp(mlp):
            del mlp.forward
        if tile_tokens:
            mlp.forward = TiledForward(mlp, tile_tokens)
    if tile_tokens and not mlps:
        raise TiledMLPError(f"train.mlp_tile_tokens: {type(model).__name__} has no gated MLP to tile "
                            f"(a module named 'mlp' with children {' / '.join(map(str, TILED_MLP_CHILDREN))})")
    return len(mlps) if tile_tokens else 0
