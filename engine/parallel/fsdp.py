"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for LoRA / QLoRA: a base model larger than one GPU.

Data parallelism (engine/parallel/distributed.py) keeps a full copy of the frozen base on every rank. With
`train.fsdp=true` every rank holds 1/W of it instead (Zhao et al. 2023, "PyTorch FSDP",
arXiv:2304.11277; FSDP2 shards each parameter on dim 0 as a DTensor):

    rank r keeps            W_shard[r] = W[r*ceil(N/W) : (r+1)*ceil(N/W)]      (padded on dim 0)
    before a block's forward  W = all_gather(W_shard[0..W-1])                   (freed after it)
    after its backward        g_shard[r] = sum_ranks(g)[rows of shard r]         (reduce-scatter)

Plan (the one torchtune and the Answer.AI FSDP-QLoRA work use):
  * one `fully_shard` group per decoder block, applied bottom-up; then one group for the rest of
    the decoder (embeddings, final norm) together with the lm_head, made with the list form
    `fully_shard([embed_tokens, norm, lm_head])` that FSDP2 offers for chunked losses:
    engine.training.loss runs `model.get_decoder()` and then calls the lm_head chunk by chunk *after* the
    decoder's forward has returned; one group also keeps a tied embedding / lm_head weight whole;
    last the decoder itself (holding no parameters of its own) becomes the FSDP root, the module
    whose forward runs first; when it returns, the head's group is unsharded explicitly (a no-op
    when the embeddings' forward already gathered it) before the loss calls lm_head per chunk.
    A block's all-gather is only alive while it runs;
  * the LoRA A/B weights (fp32, trainable) are sharded with their block's frozen weights and are the
    only ones that get gradients, so the reduce-scatter moves only LoRA gradients;
  * frozen 4-bit weights (bitsandbytes `Params4bit`) are sharded as their packed storage: a
    [N*4 bits / bits(storage), 1] tensor. `quant_storage` is the dtype that storage is *viewed*
    as: bitsandbytes packs two 4-bit codes per uint8 by default; viewed as bf16/fp32 the same bytes
    hold 4/8 codes per element. We view it as the base model's float dtype, so a block's frozen
    parameters all-gather in one dtype (FSDP1 flat parameters require that; FSDP2 otherwise falls
    back to a byte copy) and a shard boundary never splits a byte;
  * the 4-bit `quant_state` (absmax, code table, shape) is small and is *not* sharded: it lives on
    each `Linear4bit` module (`module.quant_state`, set when the weight was quantized), and
    bitsandbytes' `fix_4bit_weight_quant_state_from_module` re-attaches it to the all-gathered
    plain tensor at the start of every forward;
  * gradients are *summed* over ranks (divide factor 1, SUM reductions): the loss is already
    divided by the global count of loss tokens (engine/parallel/distributed.py), exactly as without FSDP.

Checkpoints and adapters stay in the full, unsharded layout: `full_trainable_state` gathers only
the trainable (LoRA) parameters and their optimizer state to rank 0's CPU
(`torch.distributed.checkpoint.state_dict`, full_state_dict + cpu_offload + ignore_frozen_params),
and `load_full_trainable_state` gives every rank its shard back. The trainable weights and the
adapter are the same files with and without FSDP; the optimizer state is keyed by parameter name
under FSDP (by index without it), so resume with the train.fsdp setting the checkpoint was written with.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from engine.parallel.distributed import DistContext


class FsdpError(RuntimeError):
    """FSDP cannot be set up for this model or process layout; the message says why."""


# ---------------------------------------------------------------- the plan
def decoder_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every decoder block: the entries of the model's layer ModuleList
    (`model.layers` in Llama / Phi-3 / Qwen2 / Mistral / Gemma)."""
    blocks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks"):
            blocks.extend((f"{name}.{i}", m) for i, m in enumerate(module))
    if not blocks:
        raise FsdpError(f"{type(model).__name__}: no decoder block list (a ModuleList named layers, h or blocks) to shard")
    return blocks


def shard_plan(model: nn.Module) -> list[list[str]]:
    """The `fully_shard` groups, as lists of module names, in the order they are applied:
    [block] for every decoder block; [the decoder's other children with parameters (embeddings,
    final norm), lm_head]; [the decoder] last, as the root (what `engine.training.loss.causal_lm_loss`
    runs first; it owns no parameters directly)."""
    names = {id(m): n for n, m in model.named_modules()}
    blocks = decoder_blocks(model)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    if decoder is None or head is None or id(decoder) not in names or id(head) not in names:
        raise FsdpError(f"{type(model).__name__}: needs get_decoder() and get_output_embeddings() submodules to shard")
    block_list = {id(m) for _, m in blocks}
    rest = [names[id(child)] for child in decoder.children()
            if not (isinstance(child, nn.ModuleList) and any(id(m) in block_list for m in child))
            and any(True for _ in child.parameters())]
    groups = [[name] for name, _ in blocks] + [rest + [names[id(head)]], [names[id(decoder)]]]
    covered = {id(p) for group in groups[:-1] for n in group for p in model.get_submodule(n).parameters()}
    stray = [n for n, p in model.named_parameters() if id(p) not in covered]
    if stray:
        raise FsdpError(f"{type(model).__name__}: parameters outside the decoder's children and lm_head "
                        f"would not be sharded: {stray[:3]}")
    return groups


def quant_storage_dtype(model: nn.Module) -> torch.dtype:
    """The dtype to store packed 4-bit weights in: the dtype of the frozen float weights (the
    input embeddings'), so every frozen parameter of a block is gathered in one dtype."""
    return model.get_input_embeddings().weight.dtype


def set_quant_storage_(model: nn.Module, dtype: torch.dtype) -> int:
    """View every quantized `Linear4bit` weight's packed bytes as `dtype` (in place, no copy, the
    codes are unchanged); returns how many layers were changed.

    This is what `Linear4bit(quant_storage=dtype)` produces at quantization time (bitsandbytes'
    quantize_4bit views its uint8 output as quant_storage): [N/2, 1] uint8 -> [N/2/itemsize, 1].
    """
    from bitsandbytes.nn import Linear4bit, Params4bit

    changed = 0
    for name, module in model.named_modules():
        if not isinstance(module, Linear4bit):
            continue
        weight = module.weight
        if not (isinstance(weight, Params4bit) and weight.bnb_quantized):
            raise FsdpError(f"{name}: 4-bit weight is not quantized yet; quantize before sharding")
        if getattr(module, "quant_state", None) is None:
            raise FsdpError(f"{name}: Linear4bit has no module.quant_state; FSDP loses the weight's quant_state "
                            "and needs the module's copy (quantize with engine.layers.quant.set_4bit_weight)")
        raw = weight.data.view(torch.uint8).reshape(-1)  # [N/2] the packed codes
        if raw.numel() % dtype.itemsize:
            raise FsdpError(f"{name}: {raw.numel()} packed bytes are not a multiple of {dtype} ({dtype.itemsize} bytes)")
        data = raw.view(dtype).unsqueeze(-1)               # [N/2/itemsize, 1]
        module.weight = Params4bit(data, requires_grad=False, quant_state=weight.quant_state,
                                   blocksize=weight.blocksize, compress_statistics=weight.compress_statistics,
                                   quant_type=weight.quant_type, quant_storage=dtype, module=module,
                                   bnb_quantized=True)
        module.quant_storage = dtype
        changed += 1
    return changed


# ---------------------------------------------------------------- process group and sharding
def ensure_process_group(ctx: DistContext) -> DistContext:
    """FSDP needs a process group even on one GPU; torchrun --nproc_per_node=1 provides the
    rendezvous env, a plain `python -m` does not (the error says what to run)."""
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise FsdpError("train.fsdp=true needs a process group: launch with torchrun, also on one GPU "
                            "(torchrun --nproc_per_node=1 -m engine.train ...)")
        if ctx.device.type == "cuda":
            torch.cuda.set_device(ctx.device)
        # NCCL for device tensors, gloo for the host's numbers (engine.parallel.distributed.all_reduce_sum_ints)
        dist.init_process_group(backend="cuda:nccl,cpu:gloo" if ctx.device.type == "cuda" else "gloo")
    return DistContext(rank=ctx.rank, world_size=ctx.world_size, local_rank=ctx.local_rank,
                       device=ctx.device, fsdp=True)


VERIFIED_TORCH = (2, 13)


def warn_if_unverified_torch(version: str) -> bool:
    """Warn (and return True) when torch is older than the one FSDP was verified with. On torch
    2.11 + CUDA the sharded model's first chunked-loss lm_head call saw its weight still sharded
    (benchmarks/results/gpu/README.md); torch 2.13 reworked the grouped `fully_shard([...])` hooks
    to support such standalone per-chunk calls, and passes on the CPU."""
    major, minor = (int(x) for x in version.split("+")[0].split(".")[:2])
    if (major, minor) >= VERIFIED_TORCH:
        return False
    import warnings
    warnings.warn(f"train.fsdp: torch {version} is older than {VERIFIED_TORCH[0]}.{VERIFIED_TORCH[1]}, the version "
                  "FSDP was verified with; on torch 2.11 + CUDA the chunked loss's lm_head saw a still-sharded weight "
                  "(a 'mixed torch.Tensor and DTensor' error). Upgrade torch if that happens.", stacklevel=3)
    return True


def apply_fsdp(model: nn.Module, ctx: DistContext, *, reshard_after_forward: bool = True) -> nn.Module:
    """Shard `model` in place per `shard_plan` over all ranks of the default group; returns it.

    Call after LoRA injection, `mark_only_lora_trainable` and activation checkpointing, and
    before building the optimizer (it must see the sharded DTensor parameters).
    reshard_after_forward: free each block's gathered weights after its forward (and gather them
    again in backward): memory ~ 1/W of the base + one block, at the cost of a second all-gather.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise FsdpError("apply_fsdp: no process group (call ensure_process_group first)")
    warn_if_unverified_torch(torch.__version__)
    n4bit = set_quant_storage_(model, quant_storage_dtype(model))
    mesh = init_device_mesh(ctx.device.type, (dist.get_world_size(),))
    *blocks, outer, root = shard_plan(model)
    sharded = []
    for (name,) in blocks:  # bottom-up
        sharded.append(fully_shard(model.get_submodule(name), mesh=mesh, reshard_after_forward=reshard_after_forward))
    # embeddings + final norm + lm_head: kept gathered from forward to backward (the lm_head
    # chunks run after the decoder returns and again first thing in backward)
    outer_modules = [model.get_submodule(n) for n in outer]
    fully_shard(outer_modules, mesh=mesh, reshard_after_forward=False)
    sharded.append(outer_modules[0])  # a grouped call keeps its one FSDP state on the first module
    decoder = fully_shard(model.get_submodule(root[0]), mesh=mesh)
    sharded.append(decoder)
    # The loss calls lm_head chunk by chunk after the decoder returns, outside any forward FSDP
    # hooks run around. Its group was gathered by the embeddings' forward and is kept gathered
    # (reshard_after_forward=False); unsharding it again when the decoder returns (a no-op when
    # it is gathered) makes that explicit, whatever the torch version's grouped-hook behaviour
    # (torch 2.11 + CUDA left the head's weight sharded there: "mixed torch.Tensor and DTensor").
    decoder.register_forward_hook(lambda module, args, output: outer_modules[0].unshard())
    for module in sharded:
        # the loss is already divided by the global loss-token count: sum gradients, never average
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)
    model.fsdp_summary = {"blocks": len(blocks), "linear4bit": n4bit, "world_size": dist.get_world_size()}
    return model


# ---------------------------------------------------------------- full (unsharded) state
def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, ignore_frozen_params=True, **kwargs)


def full_trainable_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Collective (every rank calls it): (trainable parameters by name, optimizer state) gathered
    to full CPU tensors on rank 0 (other ranks get empty dicts). Only LoRA weights and their Adam
    moments move; the frozen base is never gathered. The optimizer state is keyed by parameter
    name (torch.distributed.checkpoint's full layout), not by index."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    params = get_model_state_dict(model, options=_options(cpu_offload=True))
    optim = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    return params, optim


def load_full_trainable_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, params: dict,
                              optim: dict | None = None) -> None:
    """Inverse of `full_trainable_state`: every rank passes the same full dicts (each rank read the
    checkpoint) and keeps its own shard. Names must match the trainable parameters exactly."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != expected:
        raise FsdpError(f"trainable state does not match the model (missing: {sorted(expected - set(params))[:3]}, "
                        f"unexpected: {sorted(set(params) - expected)[:3]})")
    set_model_state_dict(model, dict(params), options=_options(strict=False))  # it replaces the dict's values by shards
    if optimizer is not None and optim is not None:
        set_optimizer_state_dict(model, optimizer, optim, options=_options())


@contextlib.contextmanager
def full_lora_weights(model: nn.Module, params: dict[str, torch.Tensor]) -> Iterator[nn.Module]:
    """On rank 0, temporarily register the gathered full tensors `params` in place of the sharded
    DTensor parameters, so code that reads `module.lora_A.weight` (save_adapter) sees plain full
    tensors; the sharded parameters are put back on exit. Not for forward/backward."""
    swapped = []
    try:
        for name, tensor in params.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            swapped.append((owner, leaf, owner._parameters[leaf]))
            owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
        yield model
    finally:
        for owner, leaf, original in reversed(swapped):
            owner._parameters[leaf] = original
