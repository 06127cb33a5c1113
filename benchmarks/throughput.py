"""Training throughput: this engine vs HF Trainer + PEFT vs the seed's recipe, measured in one run.

    python benchmarks/throughput.py                       # CPU, SmolLM2-135M, quickstart data (<= 10 min idle)
    python benchmarks/throughput.py --data seed           # the seed's own file
    python benchmarks/throughput.py --precision bf16      # every configuration in bf16 (CPUs with AVX512-BF16 / AMX)
    python benchmarks/throughput.py --model tiny --steps 2 --repeats 1
    python benchmarks/throughput.py --device cuda --t4 --model shape:llama-3.1-8b --method qlora \
        --data synthetic --seq-len 2048                   # GPU, "T4 mode" (fp16, 14.7 GiB cap)

Configurations (`--configs`, run in this order, rotated every repeat so none always runs first
or last; each run is a fresh subprocess, so peak RSS is per configuration):
  engine          this engine's real step: build_model, engine.data (packed rows of --seq-len),
                  engine.train.forward_backward (chunked loss, fused LoRA, packed attention),
                  loss scaler, clip, AdamW
  engine_nofuse   the same with train.fused_lora=false (what that switch buys)
  engine_dense_attn  the same with train.packed_attention=false (SDPA over T x T with a mask)
  engine_sdpa_short  the same with train.cpu_short_attention=0 (acts on a CPU under bf16 only:
                  SDPA's flash kernel for every document instead of the explicit short-document one)
  engine_doc_nodes    the same with train.batch_short_documents=false (one attention node per
                  short document, with its splits and concatenations, instead of one per layer)
  engine_eager_norms  the same with train.compile_norms=false (RMSNorm as transformers' eager
                  ops; by default a CPU compiles each norm into one kernel, paid in the warmup)
  engine_eager_loss   the same with train.compile_loss=false (the chunked loss's eager cross-entropy)
  engine_ungrouped    the same with train.grouped_lora=false (one A matmul per LoRA layer)
  engine_compiled the same with compile_norms and compile_loss forced true (auto leaves them off on
                  a GPU, where they are not measured yet: scripts/gpu_check.sh measures this row)
  engine_malloc_default  the same with train.retain_host_memory=false (glibc's own malloc thresholds:
                  the step's large blocks go back to the kernel and are faulted in again)
  engine_ckpt     the same with activation checkpointing (+ offload with --offload)
  hf_padded       HF Trainer + PEFT LoRA, SDPA, the same tokenized documents and labels, one
                  document per row, padded to the longest in the batch (the common HF setup)
  hf_flat         HF Trainer + PEFT with DataCollatorWithFlattening (padding-free, position_ids
                  restart per document): the best HF configuration transformers supports
  seed            the seed's recipe: each JSONL line rendered with Python's str(), left-padded
                  to 512, loss on every token, batch 2 (HF Trainer + PEFT, same LoRA config)
  seed_ckpt       the same with gradient checkpointing always on, as the seed notebook trained
                  (../shared/seed/NOTES.md): the recipe as its users ran it
  seed_retained   the seed recipe in a process that retains host memory as the engine does
                  (engine.speed.host_memory.retain before the model is built): what that setting alone
                  would give the seed's users
Every configuration uses the same model, LoRA config (r, alpha, targets, dropout 0), optimizer
(AdamW, lr 2e-4, clip 1.0), precision and checkpointing setting (seed_ckpt excepted). HF padded / flat take
round(seq_len / mean document length) documents per step so a step holds about as many tokens
as one engine row.

Reported per configuration (median over repeats): useful tokens/s (non-pad tokens), loss
tokens/s (tokens that carry loss), padded tokens/s (every position computed), peak memory
(CPU: the worker's peak RSS; GPU: torch.cuda.max_memory_allocated), and MFU:

    FLOPs = 4 P_lin N + 6 P_lora N + 4 P_head N_loss + 12 L d_attn S
      P_lin  frozen linear weights of the decoder blocks (4-bit ones counted as out x in)
      P_lora LoRA A and B weights; P_head = vocab x hidden (lm_head)
      N useful tokens, N_loss loss-carrying tokens, S = sum over documents of n(n+1)/2 (the
      causal query-key pairs), L layers, d_attn = heads x head_dim
    frozen weights: forward 2 P + backward 2 P (activation gradient only, no weight gradient);
    LoRA weights: 2 + 2 + 2 (forward, activation and weight gradients); the lm_head is needed
    only where a label is; attention: QK^T and PV are 2 x 2 d_attn FLOPs per pair forward, x3
    with backward. Recomputation (checkpointing) and padding are not counted: MFU is the needed
    work over time, divided by the machine's peak, which this script measures in the same run in
    the precision the configurations train in (2048^3 matmul loop on CPU with the same thread
    count: fp32, or bf16 with --precision bf16; 8192^3 fp16 / bf16 on a GPU).
Writes benchmarks/results/throughput_<tag>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RESULTS = os.path.join(ROOT, "benchmarks", "results")
QUICKSTART = os.path.join(ROOT, "data", "quickstart", "train.jsonl")
SEED_TRAIN = os.path.join(os.path.dirname(ROOT), "shared", "seed", "formatted_train_set.jsonl")
BENCH_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "engine", "bench")
T4_BYTES = 14.7 * 2**30
SEED_MAX_LEN, SEED_BATCH = 512, 2
SEED_CONFIGS = ("seed", "seed_ckpt", "seed_retained")  # the seed's recipe (its str(line) JSONL text)
ALL_CONFIGS = ("engine", "engine_nofuse", "engine_dense_attn", "engine_sdpa_short", "engine_doc_nodes", "engine_eager_norms",
               "engine_eager_loss", "engine_ungrouped", "engine_compiled", "engine_malloc_default", "engine_ckpt", "hf_padded", "hf_flat", "seed",
               "seed_ckpt", "seed_retained")
LABELS = {"engine": "engine (packed, chunked loss, fused + grouped LoRA, packed attention, compiled kernels=auto)",
          "engine_nofuse": "engine, fused_lora=false",
          "engine_dense_attn": "engine, packed_attention=false",
          "engine_sdpa_short": "engine, cpu_short_attention=0 (SDPA for every document)",
          "engine_doc_nodes": "engine, batch_short_documents=false (an attention node per document)",
          "engine_eager_norms": "engine, compile_norms=false (eager RMSNorm)",
          "engine_eager_loss": "engine, compile_loss=false (eager cross-entropy)",
          "engine_ungrouped": "engine, grouped_lora=false",
          "engine_compiled": "engine, compile_norms=true, compile_loss=true",
          "engine_malloc_default": "engine, retain_host_memory=false (glibc's malloc thresholds)",
          "engine_ckpt": "engine + activation checkpointing",
          "hf_padded": "HF Trainer + PEFT, padded to longest",
          "hf_flat": "HF Trainer + PEFT, padding-free (best HF)",
          "seed": "seed recipe (str(line), pad 512, batch 2)",
          "seed_ckpt": "seed recipe as the notebook ran it (+ gradient checkpointing)",
          "seed_retained": "seed recipe, host memory retained as the engine does"}


# ----------------------------------------------------------------------------- models

def smollm2_hf_dir() -> str:
    """SmolLM2-135M-Instruct as an HF directory (the GGUF dequantized once, then cached): both
    the engine and HF load the same fp32 weights in about a second instead of ~15-40 s."""
    out = os.path.join(BENCH_CACHE, "smollm2-135m-instruct")
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.model.build import default_model_path

    gguf = default_model_path()
    directory, name = os.path.dirname(gguf), os.path.basename(gguf)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    tmp = tempfile.mkdtemp(dir=BENCH_CACHE if os.path.isdir(BENCH_CACHE) else None)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k not in tied},
              os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the gguf marker: the weights are plain fp32 now
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    tokenizer.save_pretrained(tmp)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    os.replace(tmp, out)
    return out


def tiny_dir() -> str:
    """A seeded random 4-layer Llama (hidden 256) with SmolLM2's tokenizer: quick checks."""
    out = os.path.join(BENCH_CACHE, "tiny-llama-256")
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(smollm2_hf_dir())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tmp = tempfile.mkdtemp(dir=BENCH_CACHE)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def resolve_model(spec: str) -> str:
    """smollm2 | tiny | shape:NAME (random init, config only) | an HF model directory."""
    os.makedirs(BENCH_CACHE, exist_ok=True)
    if spec == "smollm2":
        return smollm2_hf_dir()
    if spec == "tiny":
        return tiny_dir()
    if spec.startswith("shape:") or os.path.isdir(spec):
        return spec
    raise SystemExit(f"--model {spec!r}: not smollm2, tiny, shape:NAME or an HF model directory")


def random_base_model(config, *, method: str, device, dtype, quant_type: str = "nf4", seed: int = 0):
    """The frozen base of a real architecture with random weights (N(0, 0.02), norms 1), built
    the way engine.model.build.load_base_model builds one: parameters on the meta device, decoder
    linears swapped for empty 4-bit layers for qlora, then each tensor made on `device` and
    quantized as it arrives; so an 8B-shaped QLoRA base never exists in 16 bits at once."""
    import torch
    from transformers import AutoModelForCausalLM

    from engine.model.build import _slots, decoder_linear_names, params_on_meta
    from engine.layers.quant import QuantSpec, is_linear4bit, set_4bit_weight, swap_in_empty_linear4bit

    device = torch.device(device)
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    if method == "qlora":
        spec = QuantSpec(quant_type, True, dtype)
        swap_in_empty_linear4bit(model, decoder_linear_names(model), spec)
    gen = torch.Generator(device=device).manual_seed(seed)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    for key, (module, name, is_param) in _slots(model).items():
        if key in tied:
            continue
        current = module._parameters[name] if is_param else module._buffers[name]
        if is_linear4bit(module) and name == "weight":
            w = torch.empty(module.out_features, module.in_features, device=device, dtype=dtype)
            set_4bit_weight(module, w.normal_(0.0, 0.02, generator=gen), device)
            continue
        t = torch.empty(current.shape, device=device, dtype=current.dtype)
        if "norm" in key and t.dim() == 1:
            t.fill_(1.0)
        elif t.is_floating_point():
            t.normal_(0.0, 0.02, generator=gen)
        else:
            t.zero_()
        if is_param:
            module._parameters[name] = torch.nn.Parameter(t, requires_grad=False)
        else:
            module._buffers[name] = t
    if tied:
        model.tie_weights()
    model.config.use_cache = False
    return model.to(device)


# ----------------------------------------------------------------------------- data

def data_path(spec: str) -> str | None:
    if spec == "quickstart":
        return QUICKSTART
    if spec == "seed":
        return SEED_TRAIN
    if spec == "synthetic":
        return None
    if os.path.isfile(spec):
        return spec
    raise SystemExit(f"--data {spec!r}: not quickstart, seed, synthetic or a JSONL file")


def synthetic_docs(vocab: int, seq_len: int, n: int = 256, seed: int = 0) -> list[dict]:
    """Random-token chats for random-weight models: lengths uniform in [seq_len/16, seq_len/2],
    the last third of each document carries loss (a stand-in for the assistant reply)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        length = int(rng.integers(max(8, seq_len // 16), max(9, seq_len // 2) + 1))
        ids = rng.integers(0, vocab, size=length).tolist()
        labels = ids[1:] + [-100]           # shifted (DESIGN.md)
        cut = length - length // 3
        labels = [-100] * cut + labels[cut:]
        labels[-1] = -100
        docs.append({"input_ids": ids, "labels": labels})
    return docs


def engine_docs(spec: dict, tokenizer, vocab: int) -> list[dict]:
    """Tokenized documents with shifted labels: engine.data (real files) or synthetic."""
    path = data_path(spec["data"])
    if path is None:
        return synthetic_docs(vocab, spec["seq_len"])
    from engine.config import DataConfig
    from engine.data import load_dataset

    cfg = DataConfig(train_path=path, max_seq_len=spec["seq_len"],
                     cache_dir=os.path.join(BENCH_CACHE, "tokenized"))
    return [{"input_ids": list(map(int, d["input_ids"])), "labels": list(map(int, d["labels"]))}
            for d in load_dataset(path, tokenizer, cfg).docs]


def doc_stats(lengths: list[int], loss_tokens: int) -> dict:
    """What the FLOP count needs from a dataset: tokens, loss tokens, causal pairs."""
    return {"documents": len(lengths), "tokens": int(sum(lengths)), "loss_tokens": int(loss_tokens),
            "causal_pairs": int(sum(n * (n + 1) // 2 for n in lengths)),
            "mean_length": sum(lengths) / max(1, len(lengths))}


def seed_features(path: str, tokenizer) -> tuple[list[dict], dict]:
    """The seed recipe: str(line's dict), left-padded / truncated to 512, labels = ids (pad -100)."""
    texts = []
    with open(path) as f:
        for line in f:
            if line.strip():
                texts.append(str(json.loads(line)))
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, max_length=SEED_MAX_LEN, truncation=True, padding="max_length")
    feats, lengths = [], []
    for ids, mask in zip(enc["input_ids"], enc["attention_mask"]):
        feats.append({"input_ids": ids, "attention_mask": mask,
                      "labels": [t if m else -100 for t, m in zip(ids, mask)]})
        lengths.append(sum(mask))
    # loss on every non-pad token but the first of each row (the model shifts by one)
    return feats, doc_stats(lengths, sum(max(0, n - 1) for n in lengths))


# ----------------------------------------------------------------------------- FLOPs and peak

def flop_terms(model) -> dict:
    """P_lin, P_lora, P_head, L, d_attn of a built model (see the module docstring)."""
    from engine.layers.quant import logical_numel

    cfg = model.config
    head = model.get_output_embeddings()
    head_w = head.weight if hasattr(head, "weight") else None
    p_lin = p_lora = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            p_lora += p.numel()
        elif name.endswith("weight") and ".layers." in name and p.dim() >= 1 and "norm" not in name:
            p_lin += logical_numel(p)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return {"P_lin": p_lin, "P_lora": p_lora,
            "P_head": int(head_w.shape[0] * head_w.shape[1]) if head_w is not None else 0,
            "layers": cfg.num_hidden_layers, "d_attn": heads * head_dim}


def flops_per_useful_token(terms: dict, stats: dict) -> float:
    n = max(1, stats["tokens"])
    total = (4 * terms["P_lin"] * n + 6 * terms["P_lora"] * n + 4 * terms["P_head"] * stats["loss_tokens"]
             + 12 * terms["layers"] * terms["d_attn"] * stats["causal_pairs"])
    return total / n


def measure_peak(spec: dict) -> dict:
    """Achievable matmul FLOP/s in the run's precision: 2048^3 on CPU (spec threads), 8192^3 on CUDA."""
    import torch

    torch.set_num_threads(spec["threads"])
    cuda = spec["device"].startswith("cuda")
    # the peak of the precision the configurations train in: fp16 / bf16 tensor cores on a GPU,
    # fp32 on a CPU unless --precision bf16 (AVX512-BF16 / AMX: several times the fp32 peak)
    from engine.training.amp import DTYPES

    n, dtype = (8192 if cuda else 2048), DTYPES[_precision(spec)]
    a = torch.randn(n, n, device=spec["device"], dtype=dtype)
    b = torch.randn(n, n, device=spec["device"], dtype=dtype)
    c = torch.empty(n, n, device=spec["device"], dtype=dtype)
    times, cpu_times = [], []
    for i in range(6 if not cuda else 20):
        if cuda:
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        torch.mm(a, b, out=c)
        if cuda:
            torch.cuda.synchronize()
        if i > 0:  # the first call warms up the kernel choice / thread pool
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    best, med = min(times), statistics.median(times)
    # per CPU-second of the process: the load-robust counterpart (CPU only)
    return {"kind": "peak", "matmul": f"{n}x{n}x{n} {str(dtype).replace('torch.', '')}",
            "peak_flops": 2 * n ** 3 / best, "median_flops": 2 * n ** 3 / med,
            "peak_flops_per_cpu_s": None if cuda else 2 * n ** 3 / max(1e-9, min(cpu_times))}


# ----------------------------------------------------------------------------- workers

def _setup_torch(spec: dict):
    import torch

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    if spec["t4"]:
        if device.type != "cuda":
            raise SystemExit("--t4 needs --device cuda")
        total = torch.cuda.get_device_properties(device).total_memory
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.set_per_process_memory_fraction(min(1.0, T4_BYTES / total), index)
    return torch, device


def _precision(spec: dict) -> str:
    """--precision, or by default: fp16 in T4 mode, fp32 on CPU, bf16 on other GPUs."""
    if spec.get("precision", "auto") != "auto":
        return spec["precision"]
    return "fp16" if spec["t4"] else ("fp32" if spec["device"] == "cpu" else "bf16")


def _peak_memory(torch, device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


TINY_SHAPES = ("tiny-llama", "tiny-phi3")


def _model_config(path: str):
    """`shape:NAME` -> a real model's config (engine.plan.known_config) or a tiny one for dry runs."""
    from engine.plan import known_config

    if path.startswith("shape:"):
        name = path[len("shape:"):]
        if name in TINY_SHAPES:
            from transformers import LlamaConfig, Phi3Config
            cls = LlamaConfig if name == "tiny-llama" else Phi3Config
            return cls(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384,
                       tie_word_embeddings=False, pad_token_id=0)
        return known_config(name)
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(path)


def engine_step(model, micro: list[dict], optimizer, scaler, *, precision: str, device, chunk_size):
    """One optimizer step of engine.train's loop: forward/backward over `micro`, unscale (fp16),
    skip on overflow, clip to 1.0, step, zero. Returns (summed token loss, loss-token count)."""
    import torch

    from engine.train import forward_backward, trainable_parameters

    n_loss = sum(b["num_loss_tokens"] for b in micro)
    step_loss = forward_backward(model, micro, n_loss=n_loss, scale=scaler.scale, precision=precision,
                                 device=device, chunk_size=chunk_size)
    named = list(trainable_parameters(model))
    overflowed = scaler.unscale_(named)
    scaler.update(found_inf=bool(overflowed))
    if not overflowed:
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, n_loss


def run_engine(spec: dict) -> dict:
    """This engine's real training step (engine.train's pieces, in the loop's order)."""
    torch, device = _setup_torch(spec)
    from engine.training import amp
    from engine.speed import host_memory
    from engine.config import ModelConfig, OptimConfig, PeftConfig, TrainConfig
    from engine.data import make_loader
    from engine.model.isolation import packing_for
    from engine.layers.lora import inject_lora, mark_only_lora_trainable
    from engine.model.build import apply_speed_switches, build_model, enable_activation_checkpointing
    from engine.training.optim import build_optimizer
    from engine.train import seed_everything

    precision = _precision(spec)
    tc = TrainConfig(**spec["engine"])
    host_memory.configure(tc.retain_host_memory, device.type)  # as engine.train does, first
    seed_everything(0)
    peft = PeftConfig(method=spec["method"], r=spec["r"], alpha=spec["alpha"], targets=spec["targets"])
    if spec["model"].startswith("shape:"):
        config = _model_config(spec["model"])
        model = random_base_model(config, method=spec["method"], device=device, dtype=amp.DTYPES[precision])
        inject_lora(model, peft.targets, peft.r, peft.alpha)
        mark_only_lora_trainable(model)
        pad_id = 0
        tokenizer = None
    else:
        model, tokenizer = build_model(ModelConfig(path=spec["model"], attn_implementation="sdpa"), peft,
                                       device=device, compute_dtype=amp.DTYPES[precision])
        pad_id = tokenizer.pad_token_id
    if tc.activation_checkpointing:
        enable_activation_checkpointing(model, offload=tc.offload_activations)
    apply_speed_switches(model, tc, precision=precision)
    packing = packing_for(model, True, precision=precision)  # as engine.train decides it
    docs = engine_docs(spec, tokenizer, model.config.vocab_size)
    stats = doc_stats([len(d["input_ids"]) for d in docs], sum(sum(t != -100 for t in d["labels"]) for d in docs))
    loader = make_loader(docs, max_seq_len=spec["seq_len"], micro_batch_size=spec["micro_batch"], packing=packing,
                         seed=0, pad_token_id=pad_id)
    optimizer = build_optimizer(model, OptimConfig(lr=2e-4))
    scaler = amp.DynamicLossScaler(enabled=precision == "fp16")
    chunk = tc.loss_chunk_size if tc.chunked_loss else None
    batches = iter(loader)
    model.train()
    steps, losses = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(spec["warmup"] + spec["steps"]):
        t0, c0, f0 = time.perf_counter(), time.process_time(), host_memory.minor_faults()
        micro = [next(batches)]
        step_loss, n_loss = engine_step(model, micro, optimizer, scaler, precision=precision, device=device,
                                        chunk_size=chunk)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # time the step, not its launch
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        losses.append(float(step_loss) / max(1, n_loss))  # sync (after the timer): sanity only
        if i >= spec["warmup"]:
            steps.append({"seconds": dt, "cpu_seconds": cpu, "faults": host_memory.minor_faults() - f0,
                          "padded": sum(b["input_ids"].numel() for b in micro),
                          "useful": sum(b["num_tokens"] for b in micro), "loss": n_loss})
    return {"steps": steps, "losses": losses, "peak_memory_bytes": _peak_memory(torch, device),
            "flop_terms": flop_terms(model), "data": stats, "packing": packing}


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
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec["engine"]["activation_checkpointing"])
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

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            ends.append((time.perf_counter(), time.process_time(), host_memory.minor_faults()))

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(features)

        def __getitem__(self, i):
            return features[i]

    total = spec["warmup"] + spec["steps"]
    ckpt = spec["engine"]["activation_checkpointing"] or mode == "seed_ckpt"
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=batch_size, gradient_accumulation_steps=1, max_steps=total,
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
            "peak_memory_bytes": _peak_memory(torch, device), "flop_terms": flop_terms(model), "data": stats}


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
    """Longest single sequence whose engine training step fits the memory cap, with every memory
    switch on (chunked loss, checkpointing + offload, fused LoRA), and the planner's prediction
    (engine.plan.predict) next to each measured max_memory_allocated. Lengths double from
    spec["probe_start"] until a step runs out of memory or reaches spec["probe_max"], then a
    bisection to 512 tokens, within spec["probe_budget_s"]. One document per sequence, loss on
    its last 30%."""
    torch, device = _setup_torch(spec)
    from engine.training import amp
    from engine.config import TrainConfig
    from engine.layers.lora import inject_lora, mark_only_lora_trainable
    from engine.model.build import apply_speed_switches, enable_activation_checkpointing
    from engine.train import forward_backward, seed_everything

    precision = _precision(spec)
    seed_everything(0)
    config = _model_config(spec["model"])
    model = random_base_model(config, method=spec["method"], device=device, dtype=amp.DTYPES[precision])
    inject_lora(model, spec["targets"], spec["r"], spec["alpha"])
    mark_only_lora_trainable(model)
    offloader = enable_activation_checkpointing(model, offload=True)
    apply_speed_switches(model, TrainConfig())  # fused LoRA, packed attention: the defaults
    model.train()
    scaler = amp.DynamicLossScaler(enabled=precision == "fp16")

    def predicted(T: int) -> float | None:
        try:
            from engine.plan import predict
        except ImportError:
            return None
        b = predict(config, seq_len=T, micro_batch=1, method=spec["method"], r=spec["r"], targets=spec["targets"],
                    precision=precision, activation_checkpointing=True, offload_activations=True, chunked_loss=True,
                    loss_chunk_size=1024, masked=False, cuda=device.type == "cuda")
        # max_memory_allocated sees neither the CUDA context nor the allocator's slack: compare
        # it with the allocated part; the total is what must fit the card
        return {"allocated": b.total - b.allocator_slack - b.cuda_context, "total": b.total}

    def step(T: int) -> dict:
        g = torch.Generator().manual_seed(T)
        ids = torch.randint(0, config.vocab_size, (1, T), generator=g)
        labels = torch.roll(ids, -1, 1)
        labels[0, : T - T * 3 // 10] = -100
        labels[0, -1] = -100
        batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(T)[None],
                 "num_loss_tokens": int((labels != -100).sum()), "num_tokens": T}
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        try:
            forward_backward(model, [batch], n_loss=batch["num_loss_tokens"], scale=scaler.scale,
                             precision=precision, device=device, chunk_size=1024)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            ok, error = True, None
        except torch.OutOfMemoryError as err:
            ok, error = False, str(err).splitlines()[0][:200]
        model.zero_grad(set_to_none=True)
        pred = predicted(T) or {}
        return {"seq_len": T, "fits": ok, "error": error, "seconds": time.perf_counter() - t0,
                "measured_bytes": _peak_memory(torch, device) if ok else None,
                "measured_reserved_bytes": torch.cuda.max_memory_reserved(device) if ok and device.type == "cuda" else None,
                "predicted_bytes": pred.get("allocated"), "predicted_total_bytes": pred.get("total"),
                "offloaded_bytes": offloader.stats["offloaded_bytes"]}

    tries, good, bad = [], None, None
    T = spec["probe_start"]
    deadline = time.perf_counter() + spec.get("probe_budget_s", 1e9)  # stop early, keep what was measured
    while T <= spec["probe_max"] and time.perf_counter() < deadline:
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
            offloader.reset_stats()
            tries.append(step(mid))
            good, bad = (mid, bad) if tries[-1]["fits"] else (good, mid)
    return {"kind": "probe", "max_fitting_seq_len": good, "first_failing_seq_len": bad, "tries": tries,
            "cap_bytes": T4_BYTES if spec["t4"] else None, "precision": precision, "losses": []}


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


# ----------------------------------------------------------------------------- driver

def engine_switches(kind: str, args) -> dict:
    """TrainConfig fields of each configuration (the real switches, nothing benchmark-only)."""
    base = {"chunked_loss": True, "loss_chunk_size": args.loss_chunk_size, "fused_lora": True,
            "packed_attention": True, "activation_checkpointing": args.checkpointing,
            "offload_activations": args.offload}
    if kind == "engine_nofuse":
        base["fused_lora"] = False
    if kind == "engine_dense_attn":
        base["packed_attention"] = False
    if kind == "engine_sdpa_short":
        base["cpu_short_attention"] = 0
    if kind == "engine_doc_nodes":
        base["batch_short_documents"] = False
    if kind == "engine_eager_norms":
        base["compile_norms"] = False
    if kind == "engine_eager_loss":
        base["compile_loss"] = False
    if kind == "engine_ungrouped":
        base["grouped_lora"] = False
    if kind == "engine_compiled":
        base["compile_norms"] = base["compile_loss"] = True
    if kind == "engine_malloc_default":
        base["retain_host_memory"] = False
    if kind == "engine_ckpt":
        base["activation_checkpointing"] = True
    return base


def spawn(spec: dict, timeout: float) -> dict:
    """Run one configuration in a fresh interpreter (separate peak RSS, no warm caches)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"kind": spec["kind"], "error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            result["wall_seconds"] = time.perf_counter() - t0
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-12:]
    return {"kind": spec["kind"], "error": "\n".join(tail) or f"exit code {proc.returncode}"}


def summarize(kind: str, runs: list[dict], peak: float | None, peak_cpu: float | None = None) -> dict:
    ok = [r for r in runs if "error" not in r]
    row = {"config": kind, "label": LABELS[kind], "repeats": len(ok)}
    if not ok:
        row["error"] = runs[-1].get("error", "no run") if runs else "not run"
        return row

    def rate(r, key):
        return sum(s[key] for s in r["steps"]) / sum(s["seconds"] for s in r["steps"])

    for key in ("useful", "loss", "padded"):
        row[f"{key}_tokens_per_s"] = statistics.median(rate(r, key) for r in ok)
    row["useful_tokens_per_s_all"] = [round(rate(r, "useful"), 2) for r in ok]
    # load-robust companion: useful tokens per CPU-second of the process (all its threads)
    row["useful_tokens_per_cpu_s"] = statistics.median(
        sum(s["useful"] for s in r["steps"]) / max(1e-9, sum(s.get("cpu_seconds", 0.0) for s in r["steps"])) for r in ok)
    row["step_seconds_median"] = statistics.median(s["seconds"] for r in ok for s in r["steps"])
    row["minor_faults_per_step"] = statistics.median(s.get("faults", 0) for r in ok for s in r["steps"])
    row["peak_memory_gib"] = statistics.median(r["peak_memory_bytes"] for r in ok) / 2**30
    row["flops_per_useful_token"] = flops_per_useful_token(ok[0]["flop_terms"], ok[0]["data"])
    row["achieved_flops"] = row["useful_tokens_per_s"] * row["flops_per_useful_token"]
    row["mfu"] = row["achieved_flops"] / peak if peak else None
    row["mfu_cpu"] = (row["useful_tokens_per_cpu_s"] * row["flops_per_useful_token"] / peak_cpu) if peak_cpu else None
    row["padding_share"] = 1 - row["useful_tokens_per_s"] / row["padded_tokens_per_s"]
    row["final_loss"] = ok[0]["losses"][-1]
    row["flop_terms"], row["data"] = ok[0]["flop_terms"], ok[0]["data"]
    if "batch_size" in ok[0]:
        row["batch_size"] = ok[0]["batch_size"]
    if "packing" in ok[0]:  # engine rows: packed unless the isolation probe turned it off
        row["packing"] = ok[0]["packing"]
    return row


def write_markdown(path: str, result: dict) -> None:
    rows, meta = result["rows"], result["meta"]
    peak = meta.get("peak_flops")
    lines = [f"# Training throughput: {meta['tag']}", "",
             f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}; torch {meta['torch']}, "
             f"transformers {meta['transformers']}, peft {meta['peft']}; threads {meta['threads']}  ",
             f"Model `{meta['model']}`, data `{meta['data']}`, seq_len {meta['seq_len']}, LoRA r={meta['r']} "
             f"alpha={meta['alpha']} targets={meta['targets']} ({meta['method']}), precision {meta['precision']}, "
             f"activation checkpointing {meta['checkpointing']}  ",
             f"{meta['repeats']} repeats x ({meta['warmup']} warmup + {meta['steps']} timed steps), configurations "
             f"interleaved (rotated each repeat), each in a fresh process; medians.  ",
             (f"Measured matmul peak: {peak / 1e9:.1f} GFLOP/s ({meta['peak_matmul']}, best of a loop, median over "
              f"repeats)" if peak else "Measured matmul peak: n/a")
             + (f"; per CPU-second: {meta['peak_flops_per_cpu_s'] / 1e9:.1f} GFLOP (best over repeats; the MFU (CPU-s) "
                "column divides achieved FLOPs per CPU-second by it)" if meta.get("peak_flops_per_cpu_s") else ""), ""]
    if meta.get("load_note"):
        lines += [f"**Load:** {meta['load_note']}", ""]
    lines += ["| configuration | useful tok/s | loss tok/s | padded tok/s | padding | peak mem GiB | "
              "GFLOP/s | MFU | vs engine | useful tok per CPU-s | vs engine (CPU-s) | MFU (CPU-s) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    engine = next((r for r in rows if r["config"] == "engine" and "error" not in r), None)
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | error: {r['error'].splitlines()[-1][:80]} | | | | | | | | | | |")
            continue
        vs = f"{engine['useful_tokens_per_s'] / r['useful_tokens_per_s']:.2f}x" if engine else "-"
        vs_cpu = f"{engine['useful_tokens_per_cpu_s'] / r['useful_tokens_per_cpu_s']:.2f}x" if engine else "-"
        mfu = f"{100 * r['mfu']:.0f}%" if r.get("mfu") else "-"
        mfu_cpu = f"{100 * r['mfu_cpu']:.0f}%" if r.get("mfu_cpu") else "-"
        lines.append(f"| {r['label']} | {r['useful_tokens_per_s']:.1f} | {r['loss_tokens_per_s']:.1f} | "
                     f"{r['padded_tokens_per_s']:.1f} | {100 * r['padding_share']:.0f}% | {r['peak_memory_gib']:.2f} | "
                     f"{r['achieved_flops'] / 1e9:.1f} | {mfu} | {vs} | {r['useful_tokens_per_cpu_s']:.1f} | {vs_cpu} | "
                     f"{mfu_cpu} |")
    lines += ["", "\"vs engine\" = engine useful tokens/s / this row's useful tokens/s. \"per CPU-s\" divides by the "
              "process's CPU time (time.process_time, all threads) instead of wall time: less sensitive to other "
              "processes on the machine (with several threads it also counts their spin-waits).", "",
              "FLOPs per useful token = (4 P_lin N + 6 P_lora N + 4 P_head N_loss + 12 L d_attn S) / N "
              "(see benchmarks/throughput.py); per configuration:", ""]
    for r in rows:
        if "error" not in r:
            t, d = r["flop_terms"], r["data"]
            lines.append(f"- {r['config']}: P_lin={t['P_lin']:,} P_lora={t['P_lora']:,} P_head={t['P_head']:,} "
                         f"L={t['layers']} d_attn={t['d_attn']}; N={d['tokens']:,} N_loss={d['loss_tokens']:,} "
                         f"S={d['causal_pairs']:,} -> {r['flops_per_useful_token'] / 1e6:.1f} MFLOP/token; "
                         f"useful tok/s per repeat {r['useful_tokens_per_s_all']}"
                         + (f"; batch {r['batch_size']}" if "batch_size" in r else "")
                         + f"; minor page faults per step {r['minor_faults_per_step']:,.0f}"
                         + ("; PADDED rows (the isolation probe found packed documents leaking)"
                            if r.get("packing") is False else ""))
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2 | tiny | shape:NAME | HF model dir")
    p.add_argument("--data", default="quickstart", help="quickstart | seed | synthetic | JSONL path")
    p.add_argument("--seq-len", type=int, default=1024, help="engine packed row length (data.max_seq_len)")
    p.add_argument("--micro-batch", type=int, default=1, help="engine rows per step")
    p.add_argument("--hf-batch", type=int, default=0, help="HF documents per step (0: seq_len / mean length)")
    p.add_argument("--method", default="lora", choices=("lora", "qlora"))
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--targets", default="all-linear")
    p.add_argument("--loss-chunk-size", type=int, default=1024)
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing for every configuration")
    p.add_argument("--offload", action="store_true", help="with checkpointing: offload the checkpoints (engine)")
    p.add_argument("--configs", default="engine,engine_nofuse,engine_dense_attn,hf_padded,hf_flat,seed,seed_ckpt")
    p.add_argument("--device", default="cpu")
    p.add_argument("--t4", action="store_true", help="GPU: fp16 autocast and a 14.7 GiB memory cap")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="every configuration's precision (auto: fp16 with --t4, fp32 on CPU, bf16 on a GPU)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: the physical cores)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900, help="seconds per configuration run")
    p.add_argument("--tag", default=None, help="results file suffix (default: device_model_data)")
    p.add_argument("--out-dir", default=RESULTS)
    p.add_argument("--load-note", default=None, help="say in the results how loaded the machine was")
    p.add_argument("--probe", action="store_true", help="instead: longest sequence that fits (shape: models), "
                   "with every memory switch on, planner vs measured")
    p.add_argument("--probe-start", type=int, default=2048)
    p.add_argument("--probe-max", type=int, default=131072)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print("RESULT " + json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return 0

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in configs:
        if c not in ALL_CONFIGS:
            p.error(f"--configs: unknown configuration {c!r} (known: {', '.join(ALL_CONFIGS)})")
    if args.t4 and args.precision not in ("auto", "fp16"):
        p.error(f"--t4 is fp16 (a T4 has no bf16); drop --precision {args.precision}")
    if args.precision == "fp16" and not args.device.startswith("cuda"):
        p.error("--precision fp16 on a CPU: there are no fast fp16 matmul kernels there (use bf16)")
    if args.offload and not args.checkpointing and "engine_ckpt" not in configs:
        p.error("--offload needs --checkpointing (or the engine_ckpt configuration)")
    threads = args.threads or physical_cores()
    model = resolve_model(args.model)
    data_path(args.data)
    if args.data == "synthetic":  # the seed recipe tokenizes a JSONL file
        configs = [c for c in configs if c not in SEED_CONFIGS]
    targets = args.targets.split(",") if "," in args.targets else args.targets
    base = {"model": model, "data": args.data, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
            "hf_batch": args.hf_batch, "method": args.method, "r": args.r, "alpha": args.alpha, "targets": targets,
            "device": args.device, "t4": args.t4, "precision": args.precision, "threads": threads, "warmup": args.warmup, "steps": args.steps}
    if args.probe:
        return probe_main(args, base)
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    peaks = []
    load = [os.getloadavg()[0]]
    t_start = time.perf_counter()
    for rep in range(args.repeats):
        order = configs[rep % len(configs):] + configs[:rep % len(configs)]
        peak = spawn({**base, "kind": "peak"}, args.timeout)
        if "error" not in peak:
            peaks.append(peak)
        for kind in order:
            result = spawn({**base, "kind": kind, "engine": engine_switches(kind, args)}, args.timeout)
            runs[kind].append(result)
            load.append(os.getloadavg()[0])
            status = result.get("error", "").splitlines()[-1:] if "error" in result else \
                f"{sum(s['useful'] for s in result['steps']) / sum(s['seconds'] for s in result['steps']):.1f} useful tok/s"
            print(f"[repeat {rep + 1}/{args.repeats}] {kind}: {status}", flush=True)
    peak_flops = statistics.median(pk["peak_flops"] for pk in peaks) if peaks else None
    cpu_peaks = [pk["peak_flops_per_cpu_s"] for pk in peaks if pk.get("peak_flops_per_cpu_s")]
    peak_cpu = max(cpu_peaks) if cpu_peaks else None
    rows = [summarize(kind, runs[kind], peak_flops, peak_cpu) for kind in configs]

    import torch
    import transformers
    try:
        import peft
        peft_version = peft.__version__
    except ImportError:
        peft_version = "not installed"
    tag = args.tag or f"{'gpu' if args.device.startswith('cuda') else 'cpu'}_{args.model.replace('shape:', '')}_{args.data}"
    tag = tag.replace("/", "_")
    machine = f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} logical CPUs".strip()
    if args.device.startswith("cuda"):
        machine += f", {torch.cuda.get_device_name(0)}" + (" (T4 mode: fp16, 14.7 GiB cap)" if args.t4 else "")
    load_note = args.load_note
    if load_note is None and max(load) > 1.5 * threads:
        load_note = (f"measured under load: 1-minute load average {min(load):.1f}-{max(load):.1f} on {os.cpu_count()} "
                     "CPUs (other processes were running); absolute numbers are low and noisy, ratios less so")
    meta = {"tag": tag, "command": "python benchmarks/throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": machine, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft_version, "threads": threads, "model": args.model, "data": args.data, "seq_len": args.seq_len,
            "r": args.r, "alpha": args.alpha, "targets": args.targets, "method": args.method,
            "precision": _precision(base), "checkpointing": args.checkpointing, "repeats": args.repeats,
            "warmup": args.warmup, "steps": args.steps, "peak_flops": peak_flops, "peak_flops_per_cpu_s": peak_cpu,
            "peak_matmul": peaks[0]["matmul"] if peaks else None, "load_average": load, "load_note": load_note,
            "wall_seconds": time.perf_counter() - t_start}
    result = {"meta": meta, "rows": rows, "peaks": peaks}
    engine = next((r for r in rows if r["config"] == "engine" and "error" not in r), None)
    if engine:
        result["ratios"] = {f"engine_vs_{r['config']}": engine["useful_tokens_per_s"] / r["useful_tokens_per_s"]
                            for r in rows if r["config"] != "engine" and "error" not in r}
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, f"throughput_{tag}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    write_markdown(stem + ".md", result)
    try:
        from engine.plot import bar_chart
        drawable = [r for r in rows if "error" not in r]
        if drawable:
            bar_chart([{"configuration": r["label"], "useful tokens/s": r["useful_tokens_per_s"]} for r in drawable],
                      "useful tokens/s", stem + ".png", f"Training throughput, {tag}", "useful (non-pad) tokens/s")
    except ImportError:
        pass
    print(open(stem + ".md").read())
    return 0 if all("error" not in r for r in rows) else 1


def probe_main(args, base: dict) -> int:
    if not args.model.startswith("shape:"):
        raise SystemExit("--probe needs --model shape:NAME (a random-initialised real architecture)")
    result = spawn({**base, "kind": "probe", "probe_start": args.probe_start, "probe_max": args.probe_max,
                    "probe_budget_s": 0.6 * args.timeout}, args.timeout)
    tag = args.tag or f"{'gpu' if args.device.startswith('cuda') else 'cpu'}_{args.model.replace('shape:', '')}_probe"
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"throughput_{tag}.json")
    result["command"] = "python benchmarks/throughput.py " + " ".join(sys.argv[1:])
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    if "error" in result:
        print(f"probe failed: {result['error']}")
        return 1
    print(f"longest sequence that fits: {result['max_fitting_seq_len']} (first failing: {result['first_failing_seq_len']})")
    for t in result["tries"]:
        meas = f"{t['measured_bytes'] / 2**30:.2f} GiB" if t["measured_bytes"] else "OOM"
        pred = f"{t['predicted_bytes'] / 2**30:.2f} GiB" if t["predicted_bytes"] else "-"
        print(f"  seq {t['seq_len']:>6}: measured {meas}, predicted {pred}, {t['seconds']:.1f} s, "
              f"offloaded {t['offloaded_bytes'] / 2**20:.0f} MiB")
    print(f"wrote {path}")
    return 0


def physical_cores() -> int:
    """Physical cores available to this process (torch's default thread count on Linux)."""
    try:
        import torch
        return torch.get_num_threads()
    except ImportError:
        return os.cpu_count() or 1


if __name__ == "__main__":
    sys.exit(main())
