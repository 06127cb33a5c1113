"""The throughput benchmark's workers: one configuration's training steps in this process.

`run_engine` builds the model as `engine.train` does (speed plan, packing probe, loader) and times
`engine.training.step.train_step`, the engine's one training step; `run_hf` times the HF Trainer +
PEFT (its own step); `run_probe` finds the longest sequence whose step fits the memory cap, with
the planner's prediction beside each measurement. None of them has a backward or optimizer step
of its own.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time

from throughput_inputs import (ALL_CONFIGS, SEED_BATCH, SEED_CONFIGS, T4_BYTES, _model_config, _peak_memory,
                               _precision, _setup_torch, data_path, doc_stats, engine_docs, flop_terms, measure_peak,
                               random_base_model, seed_features)

from engine.speed.measure import AttentionCalls  # noqa: E402  (throughput_inputs put the checkout on sys.path)


def build_engine(spec: dict, torch, device, precision: str):
    """(model, tokenizer or None, pad id, kernels, activation offloader or None): the model as
    engine.train builds it, with the configuration's train and speed settings."""
    from engine import speed
    from engine.config import ModelConfig, PeftConfig, SpeedConfig
    from engine.layers.inject import inject_lora
    from engine.layers.lora import mark_only_lora_trainable
    from engine.model.build import build_model, enable_activation_checkpointing
    from engine.model.tiling import resolve_tile_tokens, tile_mlps, tile_norms
    from engine.train import seed_everything
    from engine.training import amp

    tc, sc = spec["engine"]["train"], SpeedConfig(**spec["engine"]["speed"])
    plan = speed.resolve(sc, device=device, precision=precision,
                         offload_activations=tc.get("offload_activations", False))
    print(plan.describe(), file=sys.stderr)
    speed.prepare(plan)  # as engine.train does: process settings before the model is built
    seed_everything(0)
    peft = PeftConfig(method=spec["method"], r=spec["r"], alpha=spec["alpha"], targets=spec["targets"])
    if spec["model"].startswith("shape:"):
        config = _model_config(spec["model"])
        model = random_base_model(config, method=spec["method"], device=device, dtype=amp.DTYPES[precision])
        inject_lora(model, peft.targets, peft.r, peft.alpha)
        mark_only_lora_trainable(model)
        tokenizer, pad_id = None, 0
    else:
        model, tokenizer = build_model(ModelConfig(path=spec["model"], attn_implementation="sdpa"), peft,
                                       device=device, compute_dtype=amp.DTYPES[precision])
        pad_id = tokenizer.pad_token_id
    if tc.get("activation_checkpointing"):
        enable_activation_checkpointing(model)
    for key, tile in (("mlp_tile_tokens", tile_mlps), ("norm_tile_tokens", tile_norms)):  # as engine.train does
        if tc.get(key):
            tile(model, resolve_tile_tokens(tc[key], model.config.hidden_size, f"train.{key}"))
    kernels = speed.apply(plan, model)
    return model, tokenizer, pad_id, kernels, getattr(model, "_activation_offloader", None)


def run_engine(spec: dict) -> dict:
    """This engine's real training step (engine.train's pieces, in the loop's order)."""
    torch, device = _setup_torch(spec)
    from engine.config import OptimConfig
    from engine.data import make_loader
    from engine.model.isolation import packing_for
    from engine.speed import host_memory
    from engine.train import trainable_parameters
    from engine.training import amp
    from engine.training.objective import CausalLM
    from engine.training.optim import build_optimizer
    from engine.training.step import train_step

    precision = _precision(spec)
    tc = spec["engine"]["train"]
    model, tokenizer, pad_id, kernels, _ = build_engine(spec, torch, device, precision)
    packing = packing_for(model, True, precision=precision)  # as engine.train decides it
    docs = engine_docs(spec, tokenizer, model.config.vocab_size)
    stats = doc_stats([len(d["input_ids"]) for d in docs], sum(sum(t != -100 for t in d["labels"]) for d in docs))
    loader = make_loader(docs, max_seq_len=spec["seq_len"], micro_batch_size=spec["micro_batch"], packing=packing,
                         seed=0, pad_token_id=pad_id, pin_memory=device.type == "cuda")
    optimizer = build_optimizer(model, OptimConfig(lr=2e-4))
    scaler = amp.DynamicLossScaler(enabled=precision == "fp16", device=device)
    objective = CausalLM(tc["loss_chunk_size"] if tc.get("chunked_loss", True) else None, kernels)
    params = trainable_parameters(model)
    batches = iter(loader)
    model.train()
    steps, losses = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(spec["warmup"] + spec["steps"]):
        t0, c0, f0 = time.perf_counter(), time.process_time(), host_memory.minor_faults()
        micro = [next(batches)]
        result = train_step(model, micro, objective=objective, params=params, optimizer=optimizer, scheduler=None,
                            scaler=scaler, precision=precision, device=device, max_grad_norm=1.0)
        step_loss, n_loss = result.loss_sum, result.count
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # time the step, not its launch
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        losses.append(float(step_loss) / max(1, n_loss))  # sync (after the timer): sanity only
        if i >= spec["warmup"]:
            steps.append({"seconds": dt, "cpu_seconds": cpu, "faults": host_memory.minor_faults() - f0,
                          "padded": sum(b["input_ids"].numel() for b in micro),
                          "useful": sum(b["num_tokens"] for b in micro), "loss": n_loss})
    peak = _peak_memory(torch, device)
    # one more step, untimed, with every attention kernel launch counted (a dispatch mode slows each op)
    with AttentionCalls() as calls:
        train_step(model, [next(batches)], objective=objective, params=params, optimizer=optimizer, scheduler=None,
                   scaler=scaler, precision=precision, device=device, max_grad_norm=1.0)
    return {"steps": steps, "losses": losses, "peak_memory_bytes": peak, "attention_calls": _calls(calls),
            "flop_terms": flop_terms(model), "data": stats, "packing": packing}


def _calls(calls: AttentionCalls) -> dict:
    return {"forward": calls.forward, "backward": calls.backward, "ops": dict(calls.ops)}


def _hf_model(spec: dict, torch, device, precision: str):
    """PEFT LoRA on the same base (HF from_pretrained, or the same random base for shapes)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from engine.training.amp import DTYPES

    torch.manual_seed(0)
    dtype = DTYPES[precision]  # the base stored in the training precision, as the engine's
    if spec["model"].startswith("shape:"):
        model = random_base_model(_model_config(spec["model"]), method=spec["method"], device=device, dtype=dtype)
        tokenizer = None
    else:
        from transformers import AutoTokenizer
        if spec["method"] == "qlora":
            from transformers import BitsAndBytesConfig
            quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                       bnb_4bit_compute_dtype=dtype)
        else:
            quant = None
        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype, attn_implementation="sdpa",
                                                     quantization_config=quant).to(device)
        tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model.config.use_cache = False
    if spec["method"] == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec["engine"]["train"]["activation_checkpointing"])
    targets = spec["targets"]
    lora = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      target_modules=targets if targets == "all-linear" or isinstance(targets, list) else targets)
    return get_peft_model(model, lora), tokenizer


def run_hf(spec: dict, mode: str) -> dict:
    """HF Trainer + PEFT: padded to the longest (hf_padded), padding-free (hf_flat), or the seed recipe."""
    torch, device = _setup_torch(spec)
    from transformers import DataCollatorWithFlattening, Trainer, TrainerCallback, TrainingArguments

    precision = _precision(spec)
    from engine.speed import host_memory
    if mode == "seed_retained":
        host_memory.retain()
    model, tokenizer = _hf_model(spec, torch, device, precision)
    if mode in SEED_CONFIGS:
        path = data_path(spec["data"])
        if path is None:
            raise SystemExit("the seed recipe needs a JSONL file (--data quickstart | seed | PATH)")
        features, stats = seed_features(path, tokenizer)
        batch_size, collate = SEED_BATCH, None
    else:
        docs = engine_docs(spec, tokenizer, model.config.vocab_size)
        features = []
        for d in docs:  # HF shifts labels itself: unshift ours (label of t predicts t+1 -> label at t+1)
            features.append({"input_ids": d["input_ids"], "labels": [-100] + d["labels"][:-1]})
        stats = doc_stats([len(d["input_ids"]) for d in docs], sum(sum(t != -100 for t in d["labels"]) for d in docs))
        batch_size = spec["hf_batch"] or max(1, round(spec["seq_len"] / stats["mean_length"]))
        pad_id = (tokenizer.pad_token_id if tokenizer is not None else 0)
        collate = (DataCollatorWithFlattening(return_position_ids=True, separator_id=-100) if mode == "hf_flat"
                   else lambda f: pad_to_longest(f, pad_id))
    seen = []

    def recording_collator(feats):
        import torch as _t
        if collate is None:
            batch = {k: _t.tensor([f[k] for f in feats]) for k in feats[0]}
        else:
            batch = collate(feats)
        mask = batch.get("attention_mask")
        seen.append({"padded": batch["input_ids"].numel(),
                     "useful": int(mask.sum()) if mask is not None else batch["input_ids"].numel(),
                     "loss": int((batch["labels"][:, 1:] != -100).sum())})
        return batch

    ends = []
    total = spec["warmup"] + spec["steps"]
    calls = AttentionCalls()

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == total:  # the extra, untimed step: attention kernel launches counted
                calls.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == total + 1:
                calls.__exit__(None, None, None)
                return
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            ends.append((time.perf_counter(), time.process_time(), host_memory.minor_faults()))

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(features)

        def __getitem__(self, i):
            return features[i]

    ckpt = spec["engine"]["train"]["activation_checkpointing"] or mode == "seed_ckpt"
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=batch_size, gradient_accumulation_steps=1, max_steps=total + 1,
            learning_rate=2e-4, lr_scheduler_type="constant", max_grad_norm=1.0, optim="adamw_torch",
            logging_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
            use_cpu=device.type == "cpu", fp16=precision == "fp16", bf16=precision == "bf16",
            gradient_checkpointing=ckpt, gradient_checkpointing_kwargs={"use_reentrant": False} if ckpt else None,
            remove_unused_columns=False, dataloader_num_workers=0, dataloader_pin_memory=device.type == "cuda")
        trainer = Trainer(model=model, args=args, train_dataset=Rows(), data_collator=recording_collator,
                          callbacks=[Timer()])
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        result = trainer.train()
    steps = [{"seconds": ends[i][0] - ends[i - 1][0], "cpu_seconds": ends[i][1] - ends[i - 1][1],
              "faults": ends[i][2] - ends[i - 1][2], **seen[i]}
             for i in range(spec["warmup"], total)]
    return {"steps": steps, "losses": [float(result.training_loss)], "batch_size": batch_size,
            "peak_memory_bytes": _peak_memory(torch, device), "attention_calls": _calls(calls),
            "flop_terms": flop_terms(model), "data": stats}


def pad_to_longest(features: list[dict], pad_id: int) -> dict:
    """One document per row, right-padded to the longest in the batch (labels -100, mask 0):
    what DataCollatorForSeq2Seq(padding="longest") builds, without needing a tokenizer."""
    import torch

    T = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), T), pad_id, dtype=torch.long)
    labels = torch.full((len(features), T), -100, dtype=torch.long)
    mask = torch.zeros((len(features), T), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        labels[i, :n] = torch.tensor(f["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def run_probe(spec: dict) -> dict:
    """Longest sequence whose engine training step fits the memory cap, with the memory switches
    on (chunked loss, checkpointing, offload unless spec["offload"] is false, the tiles of
    spec["mlp_tile_tokens"] / spec["norm_tile_tokens"]), and the planner's prediction
    (engine.plan.predict) next to each measured max_memory_allocated. Lengths double from
    spec["probe_start"] until a step runs out of memory or reaches spec["probe_max"], then a
    bisection to 512 tokens, within spec["probe_budget_s"]. spec["docs_per_row"] documents of equal
    length per row (packed: positions restart per document), loss on the last 30% of each."""
    torch, device = _setup_torch(spec)
    from engine.training import amp
    from engine.model.packing import packing_context
    from engine.training.objective import CausalLM
    from engine.training.step import forward_backward

    precision = _precision(spec)
    config = _model_config(spec["model"])
    offload, docs = spec.get("offload", True), spec.get("docs_per_row", 1)
    tiles = {"mlp_tile_tokens": spec.get("mlp_tile_tokens", 0), "norm_tile_tokens": spec.get("norm_tile_tokens", 0)}
    spec = {**spec, "engine": {"train": {"activation_checkpointing": True, "offload_activations": offload, **tiles},
                               "speed": {}}}  # the memory switches on, speed as auto decides
    model, _, _, kernels, offloader = build_engine(spec, torch, device, precision)
    objective = CausalLM(1024, kernels)
    model.train()
    scaler = amp.DynamicLossScaler(enabled=precision == "fp16", device=device)

    def predicted(T: int) -> dict:
        from engine.plan import predict
        # masked=False: one document per row has no mask, and the engine's packed attention
        # (speed switch packed_attention) runs packed rows per document without one either
        b = predict(config, seq_len=T, micro_batch=1, method=spec["method"], r=spec["r"], targets=spec["targets"],
                    precision=precision, activation_checkpointing=True, offload_activations=offload, chunked_loss=True,
                    loss_chunk_size=1024, masked=False, cuda=device.type == "cuda", **tiles)
        # max_memory_allocated sees neither the CUDA context nor the allocator's slack: compare
        # it with the allocated part; the total is what must fit the card
        return {"allocated": b.total - b.allocator_slack - b.cuda_context, "total": b.total, "dominant": b.dominant}

    def step(T: int) -> dict:
        g = torch.Generator().manual_seed(T)
        ids = torch.randint(0, config.vocab_size, (1, T), generator=g)
        labels = torch.roll(ids, -1, 1)
        lengths = [T // docs + (1 if d < T % docs else 0) for d in range(docs)]
        start = 0
        for n in lengths:  # loss on the last 30% of each document, none across a boundary
            labels[0, start: start + n - n * 3 // 10] = -100
            labels[0, start + n - 1] = -100
            start += n
        position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
        batch = {"input_ids": ids, "labels": labels, "position_ids": position_ids,
                 "num_loss_tokens": int((labels != -100).sum()), "num_tokens": T,
                 "packing": packing_context(labels, [lengths], num_tokens=T)}
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        try:
            forward_backward(model, [batch], objective=objective, count=batch["num_loss_tokens"],
                             scale=scaler.loss_scale, precision=precision, device=device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            ok, error = True, None
        except torch.OutOfMemoryError as err:
            ok, error = False, str(err).splitlines()[0][:200]
        model.zero_grad(set_to_none=True)
        pred = predicted(T)
        return {"seq_len": T, "fits": ok, "error": error, "seconds": time.perf_counter() - t0,
                "measured_bytes": _peak_memory(torch, device) if ok else None,
                "measured_reserved_bytes": torch.cuda.max_memory_reserved(device) if ok and device.type == "cuda" else None,
                "predicted_bytes": pred["allocated"], "predicted_total_bytes": pred["total"],
                "predicted_dominant": pred["dominant"],
                "offloaded_bytes": offloader.stats["offloaded_bytes"] if offloader else 0}

    tries, good, bad = [], None, None
    T = spec["probe_start"]
    deadline = time.perf_counter() + spec.get("probe_budget_s", 1e9)  # stop early, keep what was measured
    while T <= spec["probe_max"] and time.perf_counter() < deadline:
        if offloader:
            offloader.reset_stats()
        tries.append(step(T))
        if not tries[-1]["fits"]:
            bad = T
            break
        good, T = T, T * 2
    if good is not None and bad is not None:
        while bad - good > 512 and time.perf_counter() < deadline:
            mid = (good + bad) // 2 // 512 * 512
            if mid in (good, bad):
                break
            if offloader:
                offloader.reset_stats()
            tries.append(step(mid))
            good, bad = (mid, bad) if tries[-1]["fits"] else (good, mid)
    return {"kind": "probe", "max_fitting_seq_len": good, "first_failing_seq_len": bad, "tries": tries,
            "cap_bytes": spec.get("cap_bytes") or (T4_BYTES if spec["t4"] else None), "precision": precision,
            "offload": offload, "docs_per_row": docs, **tiles, "losses": []}


def run_worker(spec: dict) -> dict:
    kind = spec["kind"]
    if kind == "peak":
        return measure_peak(spec)
    if kind == "probe":
        return run_probe(spec)
    if kind.startswith("engine"):
        out = run_engine(spec)
    elif kind in ("hf_padded", "hf_flat", *SEED_CONFIGS):
        out = run_hf(spec, kind)
    else:
        raise SystemExit(f"unknown configuration {kind!r} (known: {', '.join(ALL_CONFIGS)})")
    if not all(math.isfinite(x) for x in out["losses"]):
        raise RuntimeError(f"{kind}: non-finite loss {out['losses']}")
    return {"kind": kind, **out}
