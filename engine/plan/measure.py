"""Measuring what a step really holds (CPU or GPU): live tensor bytes and saved activations,
the ground truth the planner's formulas are checked against (tests/plan/test_plan.py)."""


from __future__ import annotations

import weakref
from engine.training.loss import lm_head_loss, logit_transform
from engine.training.loss import causal_lm_loss

# ----------------------------------------------------------------------------- measurement (CPU or GPU)

class LiveBytes:
    """Context manager counting the bytes of tensor storages created inside it that are still
    alive, and their peak. Storages that existed before (weights, inputs) are not counted.

    A TorchDispatchMode sees every op's outputs (forward and backward); a storage is counted
    once, when first seen, and uncounted by a weakref finalizer when it is freed (torch keeps one
    Python object per storage, so the finalizer fires exactly when the memory goes back).
    """

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self
        self.current = self.peak = 0
        self._sizes: dict[int, int] = {}
        self._before: set[int] = set()

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                result = func(*args, **(kwargs or {}))
                for t in tree_flatten(result)[0]:
                    if hasattr(t, "untyped_storage") and t.device.type != "meta":
                        tracker._see(t)
                return result

        self._mode = _Mode()

    def exclude(self, tensors) -> None:
        """Never count these tensors' storages (call before entering, e.g. with the parameters)."""
        for t in tensors:
            self._before.add(t.untyped_storage().data_ptr())

    def _see(self, t) -> None:
        if t.is_mkldnn:  # oneDNN's opaque layout has no storage to read: its logical bytes, freed with it
            key = id(t)
            if key not in self._sizes:
                self._sizes[key] = t.numel() * t.element_size()
                self.current += self._sizes[key]
                self.peak = max(self.peak, self.current)
                weakref.finalize(t, self._free, key)
            return
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._sizes or storage.data_ptr() in self._before or storage.nbytes() == 0:
            return
        self._sizes[key] = storage.nbytes()
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._sizes.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def saved_tensor_bytes(fn, exclude=()) -> tuple[object, int]:
    """(fn(), bytes of the distinct storages autograd saved for backward while fn ran), counted
    with `torch.autograd.graph.saved_tensors_hooks` and deduplicated by storage data_ptr;
    storages of `exclude` (the parameters) are skipped. Does not see inside checkpointed blocks."""
    import torch

    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip and ptr not in seen:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(seen.values())


def measure_step(model, batch: dict, *, chunk_size: int | None, precision: str = "fp32") -> dict:
    """Measured bytes of one forward + backward of `model` (our LoRA, our loss) on `batch`:
    saved (saved_tensors_hooks, decoder forward), activations (storages alive after the decoder
    forward, checkpoints and masks included), loss_peak (peak of lm_head + cross-entropy forward
    and backward on the final hidden state, above what was alive before), step_peak (peak of the
    whole forward + backward above the start). Runs under autocast when precision is 16-bit."""
    import torch


    device = next(model.parameters()).device
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    params = list(model.parameters()) + list(model.buffers())
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "position_ids", "attention_mask")}

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def decoder():
        with autocast():
            return model.get_decoder()(**inputs, use_cache=False).last_hidden_state

    _, saved = saved_tensor_bytes(decoder, exclude=params + list(inputs.values()))
    model.zero_grad(set_to_none=True)
    tracker = LiveBytes()
    tracker.exclude(params + list(batch_tensors(batch)))
    with tracker:
        hidden = decoder()
        activations = tracker.current
    del hidden
    model.zero_grad(set_to_none=True)

    head, transform = model.get_output_embeddings(), logit_transform(model.config)
    with torch.no_grad():
        hidden = decoder()
    hidden.requires_grad_(True)
    loss_tracker = LiveBytes()
    loss_tracker.exclude(params + list(batch_tensors(batch)) + [hidden])
    with loss_tracker:
        with autocast():
            loss = lm_head_loss(hidden, batch["labels"], head, transform=transform, chunk_size=chunk_size)
        loss.backward()
    del loss, hidden
    model.zero_grad(set_to_none=True)

    step_tracker = LiveBytes()
    step_tracker.exclude(params + list(batch_tensors(batch)))
    with step_tracker:
        with autocast():
            loss, _ = causal_lm_loss(model, batch, chunk_size=chunk_size)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return {"saved": saved, "activations": activations, "loss_peak": loss_tracker.peak,
            "step_peak": step_tracker.peak}


def batch_tensors(batch: dict) -> list:
    return [v for v in batch.values() if hasattr(v, "untyped_storage")]
