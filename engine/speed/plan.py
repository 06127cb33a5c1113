"""The speed plan: every device-specific speed choice of a run, resolved once, printed once, applied once.

The core (layers, loss, model building, the training step) computes the same math on every device
and exposes hooks; this module decides which fast implementation plugs into each hook here:

    switch                  hook in the core                          what it buys
    fused_lora              LoRALinear.fused                          B's GEMM adds into the base output (addmm_)
    grouped_lora            engine.layers.groups (parent hooks)       one A matmul for q/k/v, one for gate/up
    fused_blocks            engine.model.fused_blocks (module swap)   LoRA q/k/v, o, the gated MLP and RMSNorm as
                            autograd Functions with their own backward: about half the host's ops per layer
    packed_attention        engine.model.attention (AttentionInterface) per-document attention, O(sum n_i^2)
    short_attention         a DocumentKernel (engine.speed.cpu_attention) CPU bf16: short documents as explicit matmuls
    batch_short_documents   the same kernel, one autograd node per layer
    row_attention           a DocumentKernel (engine.speed.row_attention) rows of up to this many tokens (and no
                            kernel above): one masked SDPA call per layer instead of one per document
                            (a 16-bit row on a CPU: in fp32, whose CPU backward is several times faster)
    varlen_attention        a DocumentKernel (engine.speed.cuda_attention) CUDA: one kernel call per layer for every
                            document of the micro-batch (flash_varlen on sm80+ in fp16 / bf16, nested_sdpa
                            elsewhere, a T4 included), cu_seqlens from the loader
    compile_norms           RMSNorm forwards swapped (engine.speed.compiled) one fused kernel each way
    compile_loss            StepKernels.cross_entropy (engine.training.loss) the chunked loss in two fused passes
    retain_host_memory      StepKernels.max_chunk_bytes + glibc mallopt   a CPU step reuses its memory
    offload_activations     checkpointed blocks' inputs to pinned host    long context (a memory trick)
    rollout_merge           generate_rollouts(merge_lora, merged_layout)  GRPO rollouts decode on merged LoRA
                            copies W + s*B@A, one GEMM per layer (engine.layers.decode_merge), stored
                            in oneDNN's blocked layout on a CPU that has it (engine.speed.onednn_decode:
                            the lean step's GEMMs ~15% faster than MKL's; transformers' forward takes
                            [in, out] then: MKL's decode GEMMs 15-25% faster than [out, in]), [out, in]
                            on a GPU
    rollout_dequantize      generate_rollouts(dequantize_4bit)        a 4-bit base gets a 16-bit merged decode copy
                            too (CPU: bitsandbytes dequantizes W in every call, ~1.6x per decode step;
                            a GPU keeps QLoRA's memory: off there)
    rollout_lean_decode     generate_rollouts(lean_decode)            decode steps of 37 aten ops per layer instead
                            of transformers' 98 (engine.model.lean_decode: q/k/v and gate/up as one GEMM
                            each, RoPE on q and k together), for the families it computes, checked
                            against the model's forward once per model
    cuda_graphs             StepKernels.forward_backward (engine.speed.cuda_graphs)   CUDA: each micro-batch's
                            forward + backward padded to a shape bucket, captured once per bucket and
                            replayed (one launch instead of thousands: a host-bound step stops idling the
                            GPU). auto: on CUDA with flash varlen attention in bf16 / fp32 for SFT; off
                            (said why) under FSDP, offload_activations, fp16, speed.compile and other
                            objectives. Unmeasured on a GPU until scripts/gpu_check.sh runs

`resolve` turns the user's `speed` config (auto / off, plus per-switch opt-outs) into a `SpeedPlan`
for (device, precision, model, FSDP); `apply` swaps the implementations in and returns the
`StepKernels` the training step passes to the loss. Every switch computes the same math as with it
off (tests/speed/), and each has a benchmark row (benchmarks/throughput.py, results in
benchmarks/results/).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

import torch
from torch import nn

from engine.config import SpeedConfig
from engine.layers.groups import set_grouped_lora
from engine.layers.lora import set_fused_lora
from engine.model.fused_blocks import set_fused_blocks
from engine.model.lean_decode import default_layout
from engine.model.attention import NAME, register_packed_attention, sdpa_per_document, set_attention
import engine.speed.compiled as compiled
import engine.speed.cuda_attention as cuda_attention
import engine.speed.cuda_graphs as cuda_graphs
import engine.speed.host_memory as host_memory
import engine.speed.onednn_decode as onednn_decode
from engine.speed.cpu_attention import short_document_kernel
from engine.speed.row_attention import row_mask_kernel
from engine.speed.offload import install_offload
from engine.training.loss import StepKernels

SHORT_ATTENTION_MAX_LEN = 256
"""Longest document the CPU short-attention kernel takes: its saved probabilities grow as n^2; at
n <= 4 head_dim they are no larger than q, k, v and the output together."""

ROW_ATTENTION_MAX_LEN = 256
"""Longest row the one-call-per-layer masked kernel takes (row_attention): it computes all T^2
query-key pairs of a row; at <= 256 tokens those cost less than a call per document does."""


@dataclass(frozen=True)
class SpeedPlan:
    """What runs fast where (see the module docstring). Built by `resolve`; fields are plain values
    so a benchmark can flip one (`dataclasses.replace`) and measure what it buys."""

    fused_lora: bool = True
    grouped_lora: bool = True
    fused_blocks: bool = True
    packed_attention: bool = True
    short_attention: int = 0
    batch_short_documents: bool = False
    row_attention: int = 0
    varlen_attention: str = ""
    compile_norms: bool = False
    compile_loss: bool = False
    retain_host_memory: bool = False
    offload_activations: bool = False
    rollout_merge: str = ""
    rollout_dequantize: bool = False
    rollout_lean_decode: bool = False
    cuda_graphs: bool = False
    notes: tuple[str, ...] = ()

    SWITCHES = ("fused_lora", "grouped_lora", "fused_blocks", "packed_attention", "short_attention", "batch_short_documents",
                "row_attention", "varlen_attention", "compile_norms", "compile_loss", "retain_host_memory", "rollout_merge",
                "rollout_dequantize", "rollout_lean_decode", "cuda_graphs")
    VALUED = ("short_attention", "row_attention", "varlen_attention", "rollout_merge")  # said with their value; off is 0 / ""

    def describe(self) -> str:
        """One line: the switches that are on, and why auto left any off."""
        kernels = ("short_attention", "batch_short_documents", "row_attention", "varlen_attention")  # packed path
        on = [f"{name}={getattr(self, name)}" if name in self.VALUED else name
              for name in self.SWITCHES if getattr(self, name)
              and (name not in kernels or self.packed_attention)
              and (name != "batch_short_documents" or self.short_attention)  # it batches that kernel
              and (name != "row_attention" or not (self.short_attention or self.varlen_attention))]
        if self.offload_activations:
            on.append("offload_activations")
        line = "speed: " + (", ".join(on) if on else "reference path (every switch off)")
        return line + (f" ({'; '.join(self.notes)})" if self.notes else "")

    def off(self, *names: str) -> "SpeedPlan":
        """This plan with `names` switched off (benchmark rows, tests)."""
        unknown = set(names) - set(self.SWITCHES)
        if unknown:
            raise ValueError(f"unknown speed switches {sorted(unknown)} (known: {', '.join(self.SWITCHES)})")
        return replace(self, **{n: type(getattr(self, n))() for n in names})  # 0, "" or False


def resolve(cfg: SpeedConfig, *, device: torch.device, precision: str, fsdp: bool = False,
            offload_activations: bool = False, objective: str = "sft") -> SpeedPlan:
    """The plan for this run: `cfg.mode=off` is the reference path (every switch off); `auto` turns
    on what is measured to pay on this device (and possible here), minus `cfg.disable`.
    `objective`: the run's objective.name (CUDA graphs bucket SFT's batches only)."""
    if cfg.mode == "off":
        return SpeedPlan(fused_lora=False, grouped_lora=False, fused_blocks=False, packed_attention=False,
                         offload_activations=offload_activations)
    notes = []
    cpu_bf16 = device.type == "cpu" and precision == "bf16"
    varlen, why = cuda_attention.choose_varlen_attention(cuda_attention.cuda_capability(device), precision,
                                                        cuda_attention.torch_attention_features())
    if why and "varlen_attention" not in cfg.disable:
        notes.append(why)  # which kernel a GPU's packed rows take, said once with the plan
    compile_on = _compile_choice(cfg.compile, device, fsdp, precision, notes)
    retain = host_memory.choose(cfg.retain_host_memory, device.type, notes)
    graphs = _cuda_graphs_choice(device, precision, fsdp=fsdp, offload=offload_activations, varlen=varlen,
                                 compile_on=compile_on, objective=objective,
                                 notes=notes if "cuda_graphs" not in cfg.disable else [])
    plan = SpeedPlan(
        fused_lora=True,
        grouped_lora=not fsdp,  # FSDP's parameters are DTensor shards outside the block's forward
        fused_blocks=not fsdp,  # the same
        packed_attention=True,
        short_attention=SHORT_ATTENTION_MAX_LEN if cpu_bf16 else 0,
        batch_short_documents=cpu_bf16,
        row_attention=ROW_ATTENTION_MAX_LEN if device.type == "cpu" else 0,  # a GPU's packed rows: varlen
        varlen_attention=varlen,
        compile_norms=compile_on, compile_loss=compile_on,
        retain_host_memory=retain, offload_activations=offload_activations,
        # FSDP: the weights are DTensor shards outside the block's forward, a merged copy would be a shard
        rollout_merge="" if fsdp else onednn_decode.NAME if onednn_decode.available(device) else default_layout(device),
        rollout_dequantize=device.type == "cpu" and not fsdp,
        rollout_lean_decode=not fsdp,  # FSDP: the same (its copies would be built from shards)
        cuda_graphs=graphs,
        notes=tuple(notes))
    return plan.off(*cfg.disable) if cfg.disable else plan


def _compile_choice(mode, device: torch.device, fsdp: bool, precision: str, notes: list) -> bool:
    """speed.compile: auto = on a CPU training in bf16 where inductor can compile, outside FSDP (the
    only place it is measured to pay); true = on, or CompileError saying why it cannot be."""
    if mode is False:
        return False
    if mode is not True and (device.type != "cpu" or fsdp or precision != "bf16"):
        return False  # decided before probing for a compiler, which imports inductor (~1 s)
    reason = compiled.unavailable_reason(device, fsdp)
    if mode is True:
        if reason:
            raise compiled.CompileError(f"speed.compile=true: {reason}; set speed.compile=false")
        return True
    if reason:
        notes.append(f"compile off: {reason}")
    return reason is None


def _cuda_graphs_choice(device: torch.device, precision: str, *, fsdp: bool, offload: bool, varlen: str,
                        compile_on: bool, objective: str, notes: list) -> bool:
    """cuda_graphs under auto: on a CUDA device unless something in the run cannot be captured per
    bucket (each such reason said in the plan line). What keeps it, checked one by one: data parallel
    without FSDP (the gradient all-reduce runs after the replays, outside the graphs); LoRA and
    attention dropout (graph-safe Philox: new masks per replay); DoRA (its weight norm is device work
    per forward, no cache, no sync); sequence tiling (its tiles follow the bucket's fixed length);
    activation checkpointing (the RNG rewind is capturable in a torch with pytorch#162505); NEFTune (its scale comes
    from cu_seqlens on the device); QLoRA (bitsandbytes launches on the current stream: unverified).
    What cannot be captured at run time (a model's own sync, dynamic RoPE's host branch) fails its
    capture, and the run goes on eagerly, said once (engine/speed/cuda_graphs.py)."""
    if device.type != "cuda":
        return False
    why = ("FSDP gathers parameter shards inside the forward" if fsdp
           else "offload_activations copies to host memory and waits on events inside the step" if offload
           else "fp16: the fp16 guard may move modules to fp32 mid-run, which a captured graph would not follow"
           if precision == "fp16"
           else "needs flash varlen attention; a bucket's zero-length padding documents are unverified on "
                "nested SDPA" if varlen != "flash_varlen"
           else "speed.compile: inductor's kernels under capture are not measured" if compile_on
           else f"objective {objective}: its batches are not bucketed" if objective != "sft"
           else "")
    if why:
        notes.append(f"cuda_graphs off: {why}")
    return not why


def prepare(plan: SpeedPlan) -> None:
    """The plan's process settings, taken before the model is built: with host memory retained, the
    model's own allocations already come from the heap whose thresholds the steps rely on (a step
    then faults in a few hundred pages instead of thousands)."""
    if plan.retain_host_memory:
        host_memory.retain()


def apply(plan: SpeedPlan, model: nn.Module) -> StepKernels:
    """Swap the plan's implementations into `model` (and this process) and return the kernels the
    training step hands to the loss. Idempotent; applying another plan undoes what it turns off
    (except retained host memory: a process setting without undo)."""
    prepare(plan)  # idempotent: engine.train has called it before building the model
    set_fused_lora(model, plan.fused_lora)
    set_grouped_lora(model, plan.grouped_lora)
    chosen = document_kernel(plan)
    set_attention(model, register_packed_attention(*chosen) if chosen else None)
    if plan.compile_norms:  # compiled norms replace the fused ones (one kernel each way)
        blocks = set_fused_blocks(model, plan.fused_blocks, norms=False)
        compiled.set_compiled_norms(model, True)
    else:
        compiled.set_compiled_norms(model, False)
        blocks = set_fused_blocks(model, plan.fused_blocks)
    if plan.fused_blocks and blocks.left:  # what falls back, said once beside the plan line
        print(f"speed: {blocks.describe()}", file=sys.stderr)
    if plan.offload_activations and not getattr(model, "_activation_offloader", None):
        install_offload(model, use_reentrant=False)
    graphs = None
    if plan.cuda_graphs:
        why = cuda_graphs.unsupported_model_reason(model)
        if why:
            print(f"speed: cuda_graphs off: {why}", file=sys.stderr)
        else:
            graphs = cuda_graphs.GraphedForwardBackward()
    return StepKernels(cross_entropy=compiled.compiled_cross_entropy() if plan.compile_loss else None,
                       max_chunk_bytes=host_memory.HEAP_BLOCK_LIMIT if plan.retain_host_memory else None,
                       rollout_merge=plan.rollout_merge,
                       rollout_dequantize=bool(plan.rollout_merge) and plan.rollout_dequantize,
                       rollout_lean_decode=plan.rollout_lean_decode,
                       forward_backward=graphs)


def document_kernel(plan: SpeedPlan) -> tuple[str, object] | None:
    """(registered name, DocumentKernel) of the plan's packed attention; None: transformers' SDPA."""
    if not plan.packed_attention:
        return None
    if plan.varlen_attention:
        return f"engine_packed_{plan.varlen_attention}", cuda_attention.KERNELS[plan.varlen_attention]()
    if plan.short_attention:
        return (f"engine_packed_short{plan.short_attention}{'_batched' if plan.batch_short_documents else ''}",
                short_document_kernel(plan.short_attention, plan.batch_short_documents))
    if plan.row_attention:
        return f"engine_packed_rows{plan.row_attention}", row_mask_kernel(plan.row_attention)
    return NAME, sdpa_per_document


def announce(plan: SpeedPlan) -> None:
    print(plan.describe(), file=sys.stderr)


__all__ = ["SpeedPlan", "resolve", "prepare", "apply", "announce", "document_kernel", "SHORT_ATTENTION_MAX_LEN",
           "ROW_ATTENTION_MAX_LEN"]
