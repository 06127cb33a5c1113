"""CUDA graphs for the step's micro-batch forward + backward: captured once per shape bucket, replayed after.

Why: a LoRA step on a fast GPU is host-bound (issue 28: 0.45 s of CPU per 0.18 s of GPU on Phi-3-mini).
A replay issues the micro-batch's thousands of kernels with one launch; Python, the dispatcher and
autograd run once per bucket, at capture.

A graph replays fixed shapes and the host decisions taken at capture, so each micro-batch is padded,
on the device, into the static buffers of its *bucket*:

    key     (rows B, length T_b, documents D_b, labels N_b, several, training)
    T_b     the row length T rounded up to a multiple of max(128, 2^floor(log2 T) / 8): 128, 256, ...,
            1024, 1152, 1280, ..., 2048, 2304, ...: eight buckets per octave, so above 1k tokens the
            padding is under 1/8 of the row (a shorter row pays more, but it is cheap on a GPU)
    D_b     the documents (padding documents included) rounded up to a power of two, at least 8
    N_b     the labelled tokens rounded up to a multiple of B * T_b / 8 (at most 8 label buckets)
    several does some row hold more than one document (packed attention's varlen path) or not
            (one causal SDPA over the batch): a path decided in Python, so part of the key
    training the model's training flag (dropout on or off): a replay keeps what its capture recorded

    row b before:  [ doc 0 | doc 1 | pad (p) ]                        T tokens
    row b after:   [ doc 0 | doc 1 | pad (p) | pad' (T_b - T) ]       T_b tokens; pad' is one more
                   document (it attends only to itself, carries no label, token 0 at position 0:
                   it never raises max(position_ids), which longrope reads to pick its frequencies)
    cu_seqlens     the padded rows' offsets, then the last offset repeated to D_b + 1 entries
                   (zero-length documents, which a varlen kernel skips)
    max_seqlen     T_b: packing.max_doc_length raised to the bound, the same at every replay (so a
                   sliding window is always applied inside flash varlen, never decided per batch)
    label_index    the N real flat indices remapped to rows of T_b (i + (i // T) * (T_b - T)), then
                   N_b - N entries at token 0 with label_mask 0: engine.training.loss multiplies each
                   row's loss and gradient by the mask, so they add exactly 0
    weight         scale / count as a 0-dim device tensor (the loss unit weight changes every step)
The loss sum and the LoRA gradients are the unpadded batch's (tests/speed/test_cuda_graphs.py).

How it is captured: `torch.cuda.graph` around one micro-batch's whole forward and backward, the
gradients taken with `torch.autograd.grad` w.r.t. the trainable parameters and copied, inside the
graph, into one set of gradient buffers that every bucket shares (allocated once, outside the
graphs: 32 buckets of an 8B model's r16 adapters would otherwise hold 32 x 168 MB of outputs), then
added into `.grad` outside the graph (one multi-tensor add per micro-batch). Chosen over
`torch.cuda.make_graphed_callables` because
  - one graph per bucket with forward and backward together: one replay per micro-batch, no autograd
    Function around it (make_graphed_callables captures two graphs, replayed from a Function);
  - the callable needs host facts beside tensors (the packing context: document lengths, the bound
    max_seqlen), and make_graphed_callables takes tensors only;
  - every bucket's graph shares one memory pool: a micro-batch's outputs (its loss, its gradients,
    its metrics) are consumed before the next replay and graphs never run concurrently, so they can
    reuse each other's activation memory (the pool holds about one micro-batch's activations, not
    one per bucket);
  - AccumulateGrad stays out of the graph: `zero_grad(set_to_none=True)`, clipping, the fp16
    unscale and the optimizer (fused AdamW: a few multi-tensor kernels, eager) work as they do.
Before a capture: warm-up iterations on a side stream, as PyTorch's CUDA graph notes require
(cuBLAS handles and workspaces, lazy inits), then the LoRA factor caches are invalidated so the
captured forward re-makes them at every replay (`engine.layers.fused_lora.invalidate_factor_caches`:
a replay runs no Python, and a cache fresh at capture would never see a later optimizer step).
autocast runs with cache_enabled=False (the notes' requirement). Nothing in the region reads the
device or branches on device data (the step is sync-free: tests/training/test_sync_free.py); what
Python decides per batch (attention path, windows, loss chunks) depends only on the bucket key.
Dropout draws new masks at every replay (graphs advance the Philox offset); activation checkpointing
rewinds the RNG under capture (a torch with pytorch#162505, Sept. 2025; in an older one the capture
fails, see below).
torch.cuda.graph synchronises the device on entry: a deliberate sync, once per bucket, with
CUDA's sync debug mode suspended around it.

Eager replay (`capture=False`, what a CPU runs in tests): the same bucketing, padding, static
buffers and gradient accumulation, the captured function run eagerly at "capture" and "replay".

Checked once per run: the first replay after an optimizer step is compared with the same
micro-batch run eagerly right after it (loss and gradient norm, without dropout): a graph that
missed a change made outside it since capture (a cache it found fresh) would show there; on a
disagreement the run goes on eagerly.

Fallback: a micro-batch no bucket can hold runs the eager `forward_backward`, its reason counted in
`stats` and said once on stderr: unpacked rows (a padding mask), tree documents (GRPO's shared
prompts), a row longer than `max_length`, more than `max_documents` documents, an objective whose
loss is not bucketed (`bucketed` attribute: SFT's CausalLM has it), more than `max_graphs` buckets,
any error during a capture, or a replay that disagreed with the eager step (these two: every later
micro-batch too).
Memory: the pool (one micro-batch's activations) sits beside the eager allocator's cache, so a run
that also takes the eager path holds both.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections import Counter
from dataclasses import dataclass
from itertools import accumulate

import torch
from torch import nn

from engine.layers.fused_lora import invalidate_factor_caches
from engine.model.packing import PackingContext
from engine.training import amp
from engine.training.loss import IGNORE_INDEX
from engine.training.step import forward_backward, to_device

MAX_LENGTH = 32768
"""Longest row a bucket takes: a row this long keeps the GPU busy for hundreds of ms per micro-batch
(the host keeps up without a graph), while its bucket's padding and pool memory grow with it."""
MAX_DOCUMENTS = 1024
"""Most documents (padding documents included) of one micro-batch a bucket holds."""
MAX_GRAPHS = 32
"""Most buckets captured in one run (each costs a capture, warm-ups included, and its outputs)."""
REPLAY_RTOL = 1e-2
"""How far a replay's loss and gradient norm may be from the eager run's (relative): the same
kernels on the same inputs differ only by atomics' order; a stale input differs by far more."""
WARMUP_ITERS = 3
"""Eager iterations on a side stream before the run's first capture (PyTorch's examples use 3);
later buckets warm up once: only their shapes' first calls are left to run."""


@dataclass(frozen=True)
class BucketKey:
    rows: int
    length: int
    documents: int
    labels: int
    several: bool
    training: bool = True


def bucket_length(T: int) -> int:
    """T rounded up to a multiple of max(128, 2^floor(log2 T) / 8) (see the module docstring)."""
    step = max(128, (1 << (max(T, 1).bit_length() - 1)) // 8)
    return -(-T // step) * step


def bucket_key(batch: dict, *, training: bool = True, max_length: int = MAX_LENGTH,
               max_documents: int = MAX_DOCUMENTS) -> tuple[BucketKey | None, str]:
    """(key, "") for a micro-batch a bucket can hold, else (None, why). Host facts only."""
    packing = batch.get("packing")
    if packing is None or not packing.packed or batch.get("attention_mask") is not None:
        return None, "unpacked rows (a padding mask)"
    if packing.has_trees:
        return None, "tree documents"
    B, T = batch["input_ids"].shape
    if T > max_length:
        return None, f"a row longer than {max_length} tokens"
    T_b = min(bucket_length(T), max_length)
    documents = sum(len(row) for row in packing.doc_lengths) + (B if T_b > T else 0)
    if documents > max_documents:
        return None, f"more than {max_documents} documents in a micro-batch"
    D_b = min(max(8, 1 << (documents - 1).bit_length()), max_documents)
    quantum = max(1, B * T_b // 8)
    N_b = max(1, math.ceil(packing.label_index.numel() / quantum)) * quantum
    several = T_b > T or any(len(row) > 1 for row in packing.doc_lengths)
    return BucketKey(B, T_b, D_b, N_b, several, training), ""


class Bucket:
    """A bucket's static inputs (what a replay reads), its captured graph and which of the shared
    gradient buffers it writes (None where a parameter gets no gradient)."""

    def __init__(self, key: BucketKey, device: torch.device):
        B, T = key.rows, key.length
        self.key = key

        def buffer(*shape, dtype=torch.long, fill=0):
            return torch.full(shape, fill, dtype=dtype, device=device)

        self.input_ids, self.position_ids = buffer(B, T), buffer(B, T)       # [B, T_b]
        self.labels = buffer(B, T, fill=IGNORE_INDEX)                         # [B, T_b]
        self.label_index, self.label_targets = buffer(key.labels), buffer(key.labels)   # [N_b]
        self.label_mask = buffer(key.labels, dtype=torch.float32)             # [N_b]
        self.cu_seqlens = buffer(key.documents + 1, dtype=torch.int32)       # [D_b + 1]
        self.weight = buffer(dtype=torch.float32)                             # 0-dim: scale / count
        self.graph = None
        self.captured_at = 0  # the runner's step count at capture
        self.outputs = None   # (loss_sum, grads, metrics) of the captured run: what a replay rewrites
        self._rows: list[list[int]] = []
        self._host = (0, 0)   # num_tokens, num_loss_tokens of the loaded batch

    def load(self, batch: dict, weight: torch.Tensor | float) -> None:
        """Copy a micro-batch (already on the device) into the buffers, padded (module docstring).
        Device copies and fills, plus one small host-to-device copy of the padded offsets."""
        ids = batch["input_ids"]
        packing: PackingContext = batch["packing"]
        T, T_b = ids.shape[1], self.key.length
        pad = T_b - T
        for buf, src, fill in ((self.input_ids, ids, 0), (self.position_ids, batch["position_ids"], 0),
                               (self.labels, batch["labels"], IGNORE_INDEX)):
            buf[:, :T].copy_(src)
            if pad:  # the tail may hold a longer batch's tokens: rewritten every time
                buf[:, T:].fill_(fill)
        index, N = packing.label_index, packing.label_index.numel()
        if pad:  # flat index b * T + t  ->  b * T_b + t
            torch.add(index, index.div(T, rounding_mode="floor") * pad, out=self.label_index[:N])
        else:
            self.label_index[:N].copy_(index)
        self.label_targets[:N].copy_(packing.label_targets)
        self.label_mask[:N].fill_(1.0)
        for buf in (self.label_index, self.label_targets, self.label_mask):
            buf[N:].zero_()
        self._rows = [list(row) + ([pad] if pad else []) for row in packing.doc_lengths]
        offsets = list(accumulate((n for row in self._rows for n in row), initial=0))
        offsets += [offsets[-1]] * (self.key.documents + 1 - len(offsets))   # zero-length documents
        host = torch.tensor(offsets, dtype=torch.int32)
        if self.cu_seqlens.is_cuda:  # pinned: the copy is asynchronous and the source kept until done
            host = host.pin_memory()
        self.cu_seqlens.copy_(host, non_blocking=True)
        if isinstance(weight, torch.Tensor):
            self.weight.copy_(weight)
        else:
            self.weight.fill_(weight)
        self._host = (packing.num_tokens, packing.num_loss_tokens)

    def batch(self, like: dict) -> dict:
        """The loaded micro-batch as the objective sees it: the buffers and a packing context over them
        (a new one per call: its kernel cache lives for one forward)."""
        ctx = PackingContext(self._rows, self.label_index, self.label_targets, *self._host, packed=True,
                             cu_seqlens=self.cu_seqlens, label_mask=self.label_mask)
        ctx.max_doc_length = self.key.length  # the bound max_seqlen (module docstring)
        return {**like, "input_ids": self.input_ids, "position_ids": self.position_ids, "labels": self.labels,
                "packing": ctx}


class GraphedForwardBackward:
    """`engine.training.step.forward_backward` with each micro-batch replayed from its bucket's graph
    (`StepKernels.forward_backward`; the module docstring says how). capture=None: capture where the
    device is CUDA, eager replay elsewhere. One per model (speed.apply makes one per model): a bucket
    holds that model's trainable parameters."""

    def __init__(self, *, capture: bool | None = None, max_length: int = MAX_LENGTH,
                 max_documents: int = MAX_DOCUMENTS, max_graphs: int = MAX_GRAPHS, warmup: int = WARMUP_ITERS,
                 verify: bool = True):
        self.capture, self.max_length, self.max_documents = capture, max_length, max_documents
        self.max_graphs, self.warmup = max_graphs, warmup
        self.buckets: dict[BucketKey, Bucket] = {}
        self.stats: Counter = Counter()   # captures, replays, "eager: <why>"
        self.broken = ""                  # a failed capture or check: every later micro-batch runs eagerly
        self.pool = None                  # the graphs' shared memory pool
        self.params: list[nn.Parameter] = []        # the model's trainable parameters (first call)
        self.grads: list[torch.Tensor] = []         # one gradient buffer per parameter, every bucket's output
        self.loss = None                            # 0-dim: every bucket's loss output
        self.calls = 0                              # steps seen (one call per train_step)
        self.verify = verify                        # the first replay after an optimizer step still to check

    def __call__(self, model: nn.Module, micro: list[dict], *, objective, count, scale, precision: str,
                 device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.calls += 1
        step_loss = torch.zeros((), device=device)
        metrics: dict[str, torch.Tensor] = {}
        weight = scale / count   # a host float, or a device tensor (fp16's scale, a count over ranks)
        for batch in micro:
            batch = to_device(batch, device)
            key, why = self._route(model, batch, objective)
            graphed = None if key is None else self._graphed(key, model, batch, objective, weight, precision, device)
            if graphed is None:
                self._count(f"eager: {why or self.broken}")
                graphed = forward_backward(model, [batch], objective=objective, count=count, scale=scale,
                                           precision=precision, device=device)
            loss, batch_metrics = graphed
            step_loss += loss
            for name, value in batch_metrics.items():  # a graph's outputs are overwritten by its next replay
                metrics[name] = metrics[name] + value if name in metrics else value.clone()
        return step_loss, metrics

    def describe(self) -> str:
        """One line: captures, replays and eager micro-batches by reason."""
        parts = [f"{n} {what}" for what, n in sorted(self.stats.items())]
        return "cuda_graphs: " + (", ".join(parts) if parts else "no micro-batch yet")

    def _route(self, model: nn.Module, batch: dict, objective) -> tuple[BucketKey | None, str]:
        if self.broken:
            return None, self.broken
        if not getattr(objective, "bucketed", False):
            return None, f"objective {type(objective).__name__} is not bucketed"
        key, why = bucket_key(batch, training=model.training, max_length=self.max_length,
                              max_documents=self.max_documents)
        if key is not None and key not in self.buckets and len(self.buckets) >= self.max_graphs:
            return None, f"more than {self.max_graphs} buckets"
        return key, why

    def _graphed(self, key, model, batch, objective, weight, precision, device):
        """(loss_sum, metrics) of `batch` run from its bucket (captured first if new); None when the
        capture failed (the caller runs it eagerly)."""
        if not self.params:  # outside any graph's pool: the buffers every bucket writes its outputs into
            self.params = [p for p in model.parameters() if p.requires_grad]
            self.grads = [torch.zeros_like(p) for p in self.params]
            self.loss = torch.zeros((), device=device)
        bucket = self.buckets.get(key)
        new = bucket is None
        if new:
            bucket = Bucket(key, device)
        bucket.load(batch, weight)
        capture = device.type == "cuda" if self.capture is None else self.capture
        if not capture:  # eager replay: the captured function, run as it is
            loss, grads, batch_metrics = self._run(model, bucket, batch, objective, precision, device)
        else:
            if new:
                try:
                    self._capture(bucket, model, batch, objective, precision, device)
                except RuntimeError as e:  # an op that cannot be captured: this run stays eager from here
                    self.broken = f"capture failed ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]})"
                    return None
                bucket.captured_at = self.calls
            bucket.graph.replay()
            loss, grads, batch_metrics = bucket.outputs
            if self.verify and self.calls > bucket.captured_at and not _dropout_active(model):
                self.verify = False  # once per run: the first replay after an optimizer step
                disagree, eager = self._check_replay(model, bucket, batch, objective, precision, device)
                if disagree:  # this micro-batch takes the eager run's outputs; every later one runs eagerly
                    self.broken = disagree
                    self._count(f"eager: {self.broken}")
                    loss, grads, batch_metrics = eager
                    _accumulate(self.params, grads)
                    return loss, batch_metrics
        if new:
            self.buckets[key] = bucket
        self.stats["captures" if new else "replays"] += 1
        _accumulate(self.params, grads)
        return loss, batch_metrics

    def _check_replay(self, model, bucket: Bucket, batch: dict, objective, precision: str,
                      device: torch.device) -> tuple[str, tuple]:
        """The replay's loss and gradient norm against the same micro-batch run eagerly right after
        (the same kernels on the same buffers: they agree to atomics' order). A graph that missed a
        change made outside it since its capture (a cache it found fresh, a replaced tensor) shows
        here, at the first step after an optimizer step. The eager outputs replace the replay's in
        the buffers. Returns (why they disagree or "", the eager run's outputs). Reads 4 numbers
        back: a deliberate sync, once per run."""
        replayed = torch.stack([self.loss.float(), _grad_norm(self.grads)])
        eager = self._run(model, bucket, batch, objective, precision, device)
        with _deliberate_sync():
            (loss_r, norm_r), (loss_e, norm_e) = torch.stack([replayed, torch.stack(
                [self.loss.float(), _grad_norm(self.grads)])]).tolist()
        if all(abs(r - e) <= REPLAY_RTOL * abs(e) + 1e-6 for r, e in ((loss_r, loss_e), (norm_r, norm_e))):
            return "", eager
        return (f"a replay disagreed with the eager step after an optimizer step (loss {loss_r:.6g} vs "
                f"{loss_e:.6g}, gradient norm {norm_r:.6g} vs {norm_e:.6g})"), eager

    def _run(self, model, bucket: Bucket, batch: dict, objective, precision: str, device: torch.device):
        """What a graph holds: forward, loss, and the parameters' gradients written into the shared
        buffers (not accumulated): (loss buffer, [buffer or None per parameter], metrics)."""
        with amp.autocast(precision, device, cache_enabled=False):
            loss_sum, batch_metrics = objective.loss_sum(model, bucket.batch(batch))
        grads = torch.autograd.grad(loss_sum * bucket.weight, self.params, allow_unused=True)
        used = [(out, g) for out, g in zip(self.grads, grads) if g is not None]
        if used:
            torch._foreach_copy_([out for out, _ in used], [g for _, g in used])
        self.loss.copy_(loss_sum.detach())
        outs = [out if g is not None else None for out, g in zip(self.grads, grads)]
        return self.loss, outs, {k: v.detach() for k, v in batch_metrics.items()}

    def _capture(self, bucket: Bucket, model, batch: dict, objective, precision: str, device: torch.device) -> None:
        """Warm up on a side stream, then capture `_run` into the bucket's graph (shared pool)."""
        with _deliberate_sync():  # torch.cuda.graph synchronises on entry
            current = torch.cuda.current_stream(device)
            side = torch.cuda.Stream(device)
            side.wait_stream(current)  # the buffers were loaded on the current stream
            # the warm-ups' dropout draws are given back: a run's random stream then depends only on
            # the replays (a resumed run, which captures again, draws what an uninterrupted one does)
            generators = [device] if device.type == "cuda" else []
            with torch.cuda.stream(side), torch.random.fork_rng(devices=generators, device_type="cuda"):
                for _ in range(self.warmup if not self.buckets else 1):
                    self._run(model, bucket, batch, objective, precision, device)
            current.wait_stream(side)
            invalidate_factor_caches()  # the captured forward re-makes the LoRA factors at every replay
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                bucket.outputs = self._run(model, bucket, batch, objective, precision, device)
            bucket.graph = graph


    def _count(self, what: str) -> None:
        if what not in self.stats:
            print(f"speed: cuda_graphs: a micro-batch runs eagerly: {what[len('eager: '):]} "
                  "(said once; counted)", file=sys.stderr)
        self.stats[what] += 1


@contextlib.contextmanager
def _deliberate_sync():
    """CUDA's sync debug mode suspended around a sync made on purpose (a capture, once per bucket;
    the replay check, once per run): tests/training/test_sync_free.py counts the others."""
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(mode)


def _grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm over all gradient buffers (0-dim fp32, on the device)."""
    return torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(grads)]))


def _dropout_active(model: nn.Module) -> bool:
    """Does a training forward draw random masks (LoRA / hidden dropout, attention dropout)? Then a
    replay and an eager run differ by their masks and cannot be compared."""
    if not model.training:
        return False
    attention = getattr(getattr(model, "config", None), "attention_dropout", 0.0) or 0.0
    return attention > 0 or any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())


def _accumulate(params: list[nn.Parameter], grads) -> None:
    """.grad += each gradient: a fresh copy where .grad is None (after zero_grad(set_to_none=True)),
    one multi-tensor add where it exists. The gradient buffers are overwritten by the next replay,
    so they are never stored as .grad themselves."""
    fresh = [(p, g) for p, g in zip(params, grads) if g is not None and p.grad is None]
    held = [(p, g) for p, g in zip(params, grads) if g is not None and p.grad is not None]
    if fresh:
        for (p, _), copy in zip(fresh, torch._foreach_mul([g for _, g in fresh], 1.0)):
            p.grad = copy
    if held:
        torch._foreach_add_([p.grad for p, _ in held], [g for _, g in held])


def unsupported_model_reason(model: nn.Module) -> str:
    """Why `model`'s forward cannot be captured per bucket ("" when it can): attention logit
    softcapping (Gemma 2) runs each document exactly, in a host loop over the batch's documents."""
    if getattr(getattr(model, "config", None), "attn_logit_softcapping", None):
        return "attention logit softcapping runs a host loop over each batch's documents"
    return ""


__all__ = ["BucketKey", "Bucket", "GraphedForwardBackward", "bucket_key", "bucket_length",
           "unsupported_model_reason", "MAX_LENGTH", "MAX_DOCUMENTS", "MAX_GRAPHS"]
