"""fp16 overflow guard (train.fp16_guard=auto): modules whose activations leave fp16's range run in fp32.

Loss scaling (engine/training/amp.py) protects the gradients, not the forward: a model whose
activations pass fp16's largest value (65,504) gives an inf loss on every step, and every step is
skipped. Gemma 2 / 3 residual streams, some Qwen3 and MoE layers do; which ones is measured here,
not listed by architecture:

    1. probe, fp32   one real micro-batch, every decoder block run in fp32 (autocast off inside,
                     16-bit weights upcast for the call and put back: one block's fp32 copy at a time),
                     forward hooks record max |input| and max |output| of every module in the blocks
       decide        limit = 65,504 / MARGIN
                       a block whose output passes it       -> residual stream in fp32 from that block on
                                                              (the block's hidden_states input upcast;
                                                               the adds then stay fp32, matmuls stay fp16)
                       a module whose output passes it      -> that module in fp32 (innermost one)
                       a module whose input passes it       -> that module, and its parent (the op that
                                                               made the input), in fp32
    2. probe, fp16   the same batch under autocast with those modules in fp32; while the decoder's
                     output is not finite, the first module (in execution order: the innermost,
                     earliest) whose output is inf/NaN from finite inputs joins the set (a block: its
                     residual stream); stops when it is finite, or fails when no new module can be named.

The probes run the decoder body (`decoder_hidden`: what the blocks make of a batch), first on the
packing probe's rows before anything else runs a forward (engine.train: the packing probe and the
held-out loss before training must not meet the overflow), then on the first real micro-batch.

A module "in fp32" has its `forward` replaced by `Fp32Forward`: autocast off inside, its
floating inputs upcast, its 16-bit frozen weights upcast for good (bitsandbytes Linear4bit: its
compute_dtype), so it returns fp32 and every module inside it computes in fp32. Its output stays
fp32 downstream (autocast casts the next matmul's input itself). The weight copies are counted by
the memory planner (`fp32_weight_bytes`).

During training a forward that still overflows (a later batch, weights that have moved) shows as a
non-finite loss sum, kept on the device per step (`watch`: host bookkeeping only, no device op);
gradient overflow (a finite loss) is the loss scaler's. On the next log step (`at_log_step`: one
read of the window's loss flags) the guard re-probes that step's batch, widens the set, gives back
the loss scale those skips cost, and goes on; it raises `amp.Fp16Overflow` only if the widened set
does not make that batch's loss finite.

Modules are found by structure, not by name: the decoder blocks are the outermost nn.ModuleList
of same-class modules (with parameters); inside them every module counts except the pieces of a
LoRA layer (its base layer, A, B, dropout), so any family works. Under FSDP the guard is off (the
sharded weights cannot be upcast per module).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from engine.layers.lora import LoRALinear
from engine.model.tiling import is_tiled
from engine.training import amp
from engine.training.loss import decoder_hidden
from engine.training.step import to_device

FP16_MAX = 65504.0
MARGIN = 4.0
"""A module is kept in fp32 when its fp32 activations come within this factor of fp16's range:
training moves the weights, and a run must not overflow on step 300 what it missed on step 0."""
LIMIT = FP16_MAX / MARGIN
MAX_HELD_STEPS = 64
"""Steps of the current log window whose batches the guard holds (references, no copies) for a re-probe."""


# ---------------------------------------------------------------- finding the modules
def decoder_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The decoder blocks: the outermost nn.ModuleList whose members share one class and hold
    parameters (a model's `layers` / `h` / `blocks`, not an MoE block's experts inside them)."""
    best: list[tuple[str, nn.Module]] = []
    best_depth = math.inf
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1 or next(module[0].parameters(), None) is None:
            continue
        depth = name.count(".")
        if depth < best_depth or (depth == best_depth and len(module) > len(best)):
            best, best_depth = [(f"{name}.{i}", m) for i, m in enumerate(module)], depth
    return best


def watched_modules(block_name: str, block: nn.Module) -> dict[str, nn.Module]:
    """Every module of a block (the block itself included), a LoRA layer counted as one module."""
    inside_lora = set()
    found = {}
    for name, module in block.named_modules():
        full = f"{block_name}.{name}" if name else block_name
        if any(full.startswith(prefix + ".") for prefix in inside_lora):
            continue
        if isinstance(module, LoRALinear):
            inside_lora.add(full)
        if isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.Dropout, nn.Identity)):
            continue
        found[full] = module
    return found


def _ancestors(name: str) -> list[str]:
    """'a.b.c' -> ['a.b', 'a']: the names of the modules above `name`, innermost first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


# ---------------------------------------------------------------- running a module in fp32
def _to_fp32(value):
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in (torch.float16, torch.bfloat16) else value
    if isinstance(value, (tuple, list)):
        return type(value)(_to_fp32(v) for v in value)
    return value


def upcast_weights(module: nn.Module, frozen_only: bool = True) -> list:
    """16-bit (frozen) floating parameters and buffers of `module` to fp32 in place, and every
    bitsandbytes Linear4bit's compute dtype to fp32; returns what `restore_weights` puts back."""
    undo = []
    for m in module.modules():
        if hasattr(m, "compute_dtype") and getattr(m, "compute_dtype", None) in (torch.float16, torch.bfloat16):
            undo.append((m, "compute_dtype", m.compute_dtype))
            m.compute_dtype = torch.float32
        for tensors in (m._parameters, m._buffers):
            for key, t in tensors.items():
                if t is not None and t.dtype in (torch.float16, torch.bfloat16) and not (frozen_only and t.requires_grad):
                    undo.append((t, "data", t.data))
                    t.data = t.data.float()
    return undo


def restore_weights(undo: list) -> None:
    for owner, attr, value in reversed(undo):
        setattr(owner, attr, value)


def weight_bytes_added(module: nn.Module) -> int:
    """The bytes `upcast_weights` adds: an fp32 copy in place of each 16-bit frozen tensor (a 4-bit
    weight is dequantised per call: nothing kept)."""
    total = 0
    for m in module.modules():
        for t in list(m._parameters.values()) + list(m._buffers.values()):
            if t is not None and t.dtype in (torch.float16, torch.bfloat16) and not t.requires_grad:
                total += t.numel() * 2
    return total


class Fp32Forward:
    """A module's `forward` run with autocast off and its floating inputs upcast: it computes, and
    returns, fp32. `transient`: the 16-bit weights are upcast for the call only (the probe);
    otherwise once, when installed."""

    def __init__(self, module: nn.Module, transient: bool = False):
        self.module, self.transient = module, transient
        self.inner = module.__dict__.get("forward")  # a forward already replaced (tiling, compile) runs inside
        self.fp32_bytes = 0 if transient else weight_bytes_added(module)
        self._undo = None if transient else upcast_weights(module)

    def __call__(self, *args, **kwargs):
        inner = self.inner if self.inner is not None else type(self.module).forward.__get__(self.module)
        device = next((t.device.type for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)), "cpu")
        undo = upcast_weights(self.module, frozen_only=False) if self.transient else None
        try:
            with torch.autocast(device, enabled=False):
                return inner(*_to_fp32(args), **_to_fp32(kwargs))
        finally:
            if undo is not None:
                restore_weights(undo)

    def remove(self) -> None:
        """The module's forward as it was (and its weights, unless the guard keeps them)."""
        if self.inner is not None:
            self.module.forward = self.inner
        else:
            del self.module.forward
        if self._undo:
            restore_weights(self._undo)


def _install_fp32(module: nn.Module, transient: bool = False) -> Fp32Forward:
    wrapper = Fp32Forward(module, transient)
    module.forward = wrapper
    return wrapper


def _residual_fp32(module, args, kwargs):
    """Forward pre-hook of a block: its hidden_states input in fp32, so the residual adds stay fp32."""
    if "hidden_states" in kwargs:
        kwargs = {**kwargs, "hidden_states": _to_fp32(kwargs["hidden_states"])}
    elif args:
        args = (_to_fp32(args[0]),) + tuple(args[1:])
    return args, kwargs


# ---------------------------------------------------------------- probing
def _first_tensor(value) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value if value.is_floating_point() else None
    if isinstance(value, (tuple, list)):
        for v in value:
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


def _inputs(args, kwargs) -> list[torch.Tensor]:
    """The activations a module reads: floating positional arguments and `hidden_states`
    (attention masks and rotary tables, passed by keyword, are not activations)."""
    found = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
    hidden = kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor) and hidden.is_floating_point():
        found.append(hidden)
    return found


class _Recorder:
    """Forward hooks on the watched modules, recording on the device (read once at the end):
    max |input| and max |output| per module, and, per call in execution order, whether the output
    is finite and whether the inputs were."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.names = list(modules)
        self.in_max: dict[str, torch.Tensor] = {}
        self.out_max: dict[str, torch.Tensor] = {}
        self.calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []   # (name, inputs finite, output finite)
        self._handles = []
        for name, module in modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name), with_kwargs=True))

    def _hook(self, name):
        def record(module, args, kwargs, output):
            out = _first_tensor(output)
            if out is None:
                return
            ins = _inputs(args, kwargs)
            out_max = out.detach().abs().amax().float()
            in_max = torch.stack([t.detach().abs().amax().float() for t in ins]).amax() if ins else out_max.new_zeros(())
            self.out_max[name] = torch.maximum(self.out_max[name], out_max) if name in self.out_max else out_max
            self.in_max[name] = torch.maximum(self.in_max[name], in_max) if name in self.in_max else in_max
            self.calls.append((name, torch.isfinite(in_max), torch.isfinite(out_max)))
        return record

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def read(self) -> tuple[dict[str, float], dict[str, float], str | None]:
        """(max |output| per module, max |input| per module, the first module whose output is
        non-finite from finite inputs, or None). One read of the device."""
        names = list(self.out_max)
        if not names:
            return {}, {}, None
        values = torch.stack([self.out_max[n] for n in names] + [self.in_max[n] for n in names]).tolist()  # sync
        flags = torch.stack([torch.stack([a, b]) for _, a, b in self.calls]).tolist()  # sync: outside the steps
        out_max = dict(zip(names, values[:len(names)]))
        in_max = dict(zip(names, values[len(names):2 * len(names)]))
        origin = next((name for (name, _, _), (ins_ok, out_ok) in zip(self.calls, flags) if ins_ok and not out_ok), None)
        return out_max, in_max, origin


@dataclass
class Decision:
    """Why a module runs in fp32 (or a block's residual stream is kept in fp32)."""

    name: str
    residual: bool          # True: the block's residual stream (its input upcast); False: the module in fp32
    why: str

    def describe(self) -> str:
        return f"{self.name}{' residual stream' if self.residual else ''} ({self.why})"


@dataclass
class Fp16Guard:
    """The fp16 guard of one run (see the module docstring). `enabled=False`: every call is a no-op."""

    model: nn.Module
    device: torch.device
    enabled: bool = True
    decisions: dict[str, Decision] = field(default_factory=dict)
    _wrappers: dict[str, Fp32Forward] = field(default_factory=dict)
    _hooks: dict[str, object] = field(default_factory=dict)
    _window: list = field(default_factory=list)     # [(step, loss_sum on the device, micro-batches or None)]

    def __post_init__(self):
        self.blocks = decoder_blocks(self.model) if self.enabled else []
        self.block_index = {name: i for i, (name, _) in enumerate(self.blocks)}
        self.modules: dict[str, nn.Module] = {}
        for name, block in self.blocks:
            self.modules.update(watched_modules(name, block))
        # the nearest watched module above each one (past containers such as an MoE block's expert list)
        self.parent = {name: next(a for a in _ancestors(name) if a in self.modules)
                       for name in self.modules if name not in self.block_index}

    # ------------------------------------------------ before training
    def install(self, micro: list[dict]) -> str:
        """Probe the micro-batch(es), put what overflows in fp32; returns the line for the log."""
        if not self.enabled:
            return "fp16_guard off"
        if not self.blocks:
            self.enabled = False
            return f"fp16_guard off: no decoder blocks found in {type(self.model).__name__}"
        peak = self.heal(micro)
        return self.describe(peak)

    def describe(self, peak: tuple[str, float] | None = None) -> str:
        """`N modules in fp32: ...` (or the largest activation measured, when none is)."""
        if not self.decisions:
            where = f": max |activation| {peak[1]:.3g} at {peak[0]}" if peak else ""
            return f"fp16_guard: no module within {MARGIN:g}x of fp16's range{where}"
        items = sorted(self.decisions.values(), key=lambda d: (self.block_of(d.name), d.name))
        n = len(items)
        copies = self.fp32_weight_bytes
        return (f"{n} module{'s' if n != 1 else ''} in fp32: " + "; ".join(d.describe() for d in items)
                + (f"; their fp32 weight copies take {copies / 2**20:.1f} MiB more" if copies else ""))

    def block_of(self, name: str) -> int:
        while name not in self.block_index and "." in name:
            name = name.rsplit(".", 1)[0]
        return self.block_index.get(name, -1)

    @property
    def fp32_weight_bytes(self) -> int:
        """Bytes the fp32 modules' weight copies take beyond the 16-bit model (the planner's term)."""
        return sum(w.fp32_bytes for w in self._wrappers.values())

    def planner_terms(self) -> dict:
        """What the memory planner counts for the fp32 set (engine/plan/prediction.py::predict); empty
        when nothing runs in fp32 (the planner's defaults)."""
        terms = {"fp32_weight_bytes": self.fp32_weight_bytes, "fp32_residual_blocks": len(self._hooks)}
        return {k: v for k, v in terms.items() if v}

    # ------------------------------------------------ the probes
    def heal(self, micro: list[dict]) -> tuple[str, float] | None:
        """Both probes over `micro` (host or device batches); raises amp.Fp16Overflow if the fp16
        loss of a batch stays non-finite. Returns (module, max |activation|) of the largest seen."""
        peak = None
        for batch in micro:
            if "input_ids" not in batch:  # a batch of another layout (preference pairs): not probed
                continue
            batch = to_device(batch, self.device)
            out_max, in_max, _ = self._probe(batch, fp32=True)
            for name, value in out_max.items():
                if peak is None or value > peak[1]:
                    peak = (name, value)
            self._decide_by_margin(out_max, in_max)
            self._locate_until_finite(batch)
        return peak

    def _probe(self, batch: dict, fp32: bool):
        """One forward of `batch` with the recorder on: every block in fp32 (fp32=True) or as
        training runs it (autocast fp16, the current fp32 set). No grad, eval mode (no dropout),
        the RNG left as it was."""
        was_training = self.model.training
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        recorder = _Recorder(self.modules)
        transient = [_install_fp32(block, transient=True) for name, block in self.blocks
                     if fp32 and name not in self._wrappers]
        self.model.eval()
        try:
            with torch.no_grad(), amp.autocast("fp16", self.device):
                hidden = decoder_hidden(self.model, batch)   # [B, T, h]: what the blocks make of the batch
            out_max, in_max, origin = recorder.read()
            finite = bool(torch.isfinite(hidden).all())  # sync: outside the steps
        finally:
            recorder.remove()
            for wrapper in reversed(transient):
                wrapper.remove()
            self.model.train(was_training)
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, self.device)
        return (out_max, in_max, None) if fp32 else (finite, origin, out_max)

    def _decide_by_margin(self, out_max: dict[str, float], in_max: dict[str, float]) -> None:
        for name, value in out_max.items():
            if name in self.block_index:
                if value > LIMIT:  # the residual sum leaves the range: fp32 from this block on
                    self._residual(name, f"output {value:.3g} in fp32")
                continue
            children = [c for c in out_max if self.parent.get(c) == name]
            if value > LIMIT and not any(out_max[c] > LIMIT for c in children):  # the innermost such module
                self._fp32(name, f"output {value:.3g} in fp32")
            siblings = [c for c in out_max if c != name and self.parent.get(c) == self.parent[name]]
            if in_max.get(name, 0.0) > LIMIT and not any(out_max[c] > LIMIT for c in siblings):
                # no sibling made the input: an op of the parent's own did (a block's: the residual
                # add). The module itself needs nothing more if it computes in fp32 anyway (a norm);
                # if it does not, the fp16 probe names it
                parent = self.parent[name]
                why = f"makes {name.rsplit('.', 1)[-1]}'s input {in_max[name]:.3g} in fp32"
                if parent in self.block_index:
                    self._residual(parent, why)
                else:
                    self._fp32(parent, why)

    def _locate_until_finite(self, batch: dict) -> None:
        for _ in range(len(self.modules) + 1):
            finite, origin, _ = self._probe(batch, fp32=False)
            if finite:
                return
            if origin is None or not self._widen_at(origin):
                where = (f"first non-finite output: {origin}, already in fp32" if origin else
                         "no decoder module turns finite inputs into inf/NaN: the embeddings' output is not finite")
                raise amp.Fp16Overflow(
                    f"fp16_guard: the forward overflows fp16 even with {len(self.decisions)} module(s) in fp32 "
                    f"({where}). Train with train.precision=fp32 (or bf16 on a GPU that has it).")
        raise amp.Fp16Overflow("fp16_guard: no finite loss after putting every decoder module in fp32")

    def _widen_at(self, origin: str) -> bool:
        """Put the module where a non-finite value first appeared in fp32 (a block: its residual
        stream; a block already so: the whole block); False when nothing new can be done."""
        if origin in self.block_index:
            if origin not in self._hooks:
                return self._residual(origin, "non-finite output in fp16")
            return self._fp32(origin, "non-finite output in fp16 with an fp32 residual stream")
        return self._fp32(origin, "non-finite output in fp16")

    # ------------------------------------------------ applying decisions
    def _covered(self, name: str) -> bool:
        """Is `name` already inside a module that runs in fp32?"""
        return any(name == w or name.startswith(w + ".") for w in self._wrappers)

    def _fp32(self, name: str, why: str) -> bool:
        tiled = next((a for a in _ancestors(name) if a in self.modules and is_tiled(self.modules[a])), None)
        if tiled is not None:  # the tiles' backward recomputes the whole module: all of it in fp32
            name, why = tiled, f"{why} in its {name[len(tiled) + 1:]}"
        if self._covered(name):
            return False
        for inner in [w for w in self._wrappers if w.startswith(name + ".")]:  # now inside this one
            self._wrappers.pop(inner).remove()
            self.decisions.pop(inner, None)
        self._wrappers[name] = _install_fp32(self.modules[name])
        self.decisions[name] = Decision(name, residual=False, why=why)
        return True

    def _residual(self, block_name: str, why: str) -> bool:
        """The residual stream in fp32 from `block_name` on (every later block's input upcast too)."""
        start = self.block_index[block_name]
        added = False
        for name, block in self.blocks[start:]:
            if name in self._hooks:
                continue
            self._hooks[name] = block.register_forward_pre_hook(_residual_fp32, with_kwargs=True)
            added = True
        if added and not any(d.residual for d in self.decisions.values() if self.block_of(d.name) <= start):
            for name in [n for n, d in self.decisions.items() if d.residual]:
                self.decisions.pop(name)  # a later block's, now covered by this one
            self.decisions[block_name] = Decision(block_name, residual=True, why=why + f", kept in fp32 "
                                                  f"from block {start} on")
        return added

    def remove(self) -> None:
        """Every fp32 module and residual hook undone (tests, benchmarks)."""
        for wrapper in self._wrappers.values():
            wrapper.remove()
        for handle in self._hooks.values():
            handle.remove()
        self._wrappers.clear()
        self._hooks.clear()
        self.decisions.clear()

    # ------------------------------------------------ during training
    def watch(self, step: int, micro: list[dict], loss_sum: torch.Tensor) -> None:
        """After each step: keep the step's loss sum (a device tensor) and its batches. No device op."""
        if not self.enabled:
            return
        self._window.append([step, loss_sum, micro])
        if len(self._window) > MAX_HELD_STEPS:
            self._window[-MAX_HELD_STEPS - 1][2] = None  # its batch is let go; the flag is kept

    def at_log_step(self, scaler: amp.DynamicLossScaler) -> str | None:
        """On a log step: did a forward of the window overflow (a non-finite loss)? Then re-probe
        that step's batch, widen the fp32 set, give back the loss scale the skips cost, and say so
        (the returned line). One read of the device; None when nothing overflowed."""
        if not self.enabled or not self._window:
            self._window = []
            return None
        window, self._window = self._window, []
        finite = torch.stack([loss.float() for _, loss, _ in window]).isfinite().tolist()  # sync, on log steps
        bad = [(step, micro) for (step, _, micro), ok in zip(window, finite) if not ok]
        if not bad:
            return None
        held = [(step, micro) for step, micro in bad if micro is not None]
        steps = f"{bad[0][0]}" if len(bad) == 1 else f"{len(bad)} steps from {bad[0][0]} to {bad[-1][0]}"
        if not held:
            return (f"fp16_guard: the forward overflowed in {steps} (skipped); their batches are no longer "
                    "held for a re-probe (train.log_every is large): the fp32 set is unchanged")
        before = set(self.decisions)
        step, micro = held[0]
        self.heal(micro)  # raises amp.Fp16Overflow if the widened set does not help
        new = [self.decisions[n].describe() for n in self.decisions if n not in before]
        if not new:  # the decoder's output on that batch is finite: the overflow is past the blocks
            return (f"fp16_guard: the loss overflowed in {steps} (skipped) but the decoder blocks' output on "
                    f"step {step}'s batch is finite in fp16: the lm_head or the loss overflowed, which the "
                    "guard does not cover (train.max_consecutive_skips stops the run if it goes on)")
        scaler.forgive(len(bad))
        return (f"fp16_guard: the forward overflowed in {steps} (skipped, not a gradient overflow); re-probed "
                f"step {step}'s batch: " + "; ".join(new) + f" now in fp32 ({len(self.decisions)} in all); "
                "training goes on")


def guard_for_run(setting: str, model: nn.Module, *, precision: str, device: torch.device,
                  fsdp: bool = False) -> Fp16Guard:
    """train.fp16_guard: auto = on for fp16 runs (not under FSDP), off = never; a disabled guard
    does nothing."""
    if setting == "auto" and precision == "fp16" and fsdp:
        warnings.warn("train.fp16_guard=auto is off under train.fsdp=true (sharded weights are not upcast per "
                      "module): an fp16 forward that overflows skips every step")
    return Fp16Guard(model, device, enabled=setting == "auto" and precision == "fp16" and not fsdp)
