"""The throughput benchmark's inputs: the configurations' names, the models (SmolLM2 as an HF directory,
tiny and known shapes, random bases), the data (quickstart, the seed's file, synthetic documents),
FLOPs per token and the machine's measured peak, and the small per-worker torch setup."""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RESULTS = os.path.join(ROOT, "benchmarks", "results")
QUICKSTART = os.path.join(ROOT, "data", "quickstart", "train.jsonl")
SEED_TRAIN = os.path.join(ROOT, "data", "seed_msa", "formatted_train_set.jsonl")
BENCH_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "engine", "bench")
T4_BYTES = 14.7 * 2**30
SEED_MAX_LEN, SEED_BATCH = 512, 2
SEED_CONFIGS = ("seed", "seed_ckpt", "seed_retained")  # the seed's recipe (its str(line) JSONL text)
ALL_CONFIGS = ("engine", "engine_nofuse", "engine_dense_attn", "engine_sdpa_short", "engine_doc_nodes", "engine_eager_norms",
               "engine_eager_loss", "engine_ungrouped", "engine_unfused_blocks", "engine_compiled", "engine_malloc_default", "engine_ckpt", "hf_padded", "hf_flat", "seed",
               "seed_ckpt", "seed_retained")
LABELS = {"engine": "engine (packed, chunked loss, fused + grouped LoRA, packed attention, compiled kernels=auto)",
          "engine_nofuse": "engine, fused_lora=false",
          "engine_dense_attn": "engine, packed_attention=false",
          "engine_sdpa_short": "engine, cpu_short_attention=0 (SDPA for every document)",
          "engine_doc_nodes": "engine, batch_short_documents=false (an attention node per document)",
          "engine_eager_norms": "engine, compile_norms=false (eager RMSNorm)",
          "engine_eager_loss": "engine, compile_loss=false (eager cross-entropy)",
          "engine_ungrouped": "engine, grouped_lora=false",
          "engine_unfused_blocks": "engine, fused_blocks=false",
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


def _setup_torch(spec: dict):
    import torch

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    if spec["t4"] or spec.get("cap_bytes"):
        if device.type != "cuda":
            raise SystemExit("--t4 / --memory-cap-gib need --device cuda")
        total = torch.cuda.get_device_properties(device).total_memory
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.set_per_process_memory_fraction(min(1.0, (spec.get("cap_bytes") or T4_BYTES) / total), index)
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
