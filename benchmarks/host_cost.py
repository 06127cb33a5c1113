"""Host cost of one training step: ms and aten ops per step, engine vs transformers + PEFT, in one run.

    python benchmarks/host_cost.py                              # Llama-3.1-8B skeleton (32 layers, hidden 64)
    python benchmarks/host_cost.py --shape phi-3-mini           # another known shape, shrunk the same way
    python benchmarks/host_cost.py --family qwen3 --layers 8    # any family transformers knows, tiny defaults
    python benchmarks/host_cost.py --disable fused_blocks       # what a switch buys (engine side only)
    python benchmarks/host_cost.py --no-checkpointing --precision fp32
    python benchmarks/host_cost.py --device cuda --shape phi-3-mini --hidden 0 --layers 8   # a GPU: real widths,
                                                                # GPU ms (CUDA events) beside host ms (scripts/gpu_check.sh)
    python benchmarks/host_cost.py --device cuda --hidden 0 --cuda-graphs   # the engine's micro-batches replayed
                                                                # from CUDA graphs (speed.cuda_graphs; a GPU only)

What it measures: the work the host issues per step when arithmetic is negligible. A real model's
layer structure (32 decoder layers for Llama-3.1-8B) with every width shrunk (hidden 64, head_dim 16,
heads and the MLP scaled by the real ratios, vocabulary 2,048), bf16 autocast, activation
checkpointing, LoRA r16 on every linear of the decoder blocks, rows of 128 tokens, and the speed plan
a GPU gets (no compile, no CPU attention kernels, no host-memory setting: `gpu_plan`), eager: the
plan's cuda_graphs switch off unless --cuda-graphs (then each engine micro-batch is replayed from the
CUDA graph of its shape bucket, engine/speed/cuda_graphs.py: the warm-up steps capture, the timed
steps replay; the capture / replay counts are in the results). On a GPU these ops are kernel
launches the host must issue; a GPU step shorter than this host time idles.

Configurations, alternated every repeat in this process (so load on the machine hits both):
  engine     engine.training.step.train_step with the GPU speed plan (packed rows of --seq-len)
  hf_peft    transformers + PEFT LoRA (same base weights, same LoRA targets, r, alpha), the same
             documents one per row padded to the longest, same checkpointing (non-reentrant), a plain
             loop: forward with labels, backward, clip 1.0, torch AdamW (no Trainer: its own host work
             would only add to HF's side)
Reported: median ms per step (wall and process CPU), aten ops per step (every op dispatched, forward
and backward, engine.speed.measure.AtenOps, on one extra step), the CPU ms spent inside GEMMs and
attention kernels (engine.speed.measure.KernelTime, one more step: arithmetic, which on a CPU is
not negligible even at hidden 64 -- bf16 GEMMs of these sizes take 40-200 us each here -- and which
a GPU runs, so the CPU ms outside them is the host's own share), ops per decoder layer (the step's ops
minus those of the same model with one layer, divided by layers - 1) with the largest op names.
Writes benchmarks/results/host_cost_<tag>.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import torch  # noqa: E402

from engine.speed.measure import AtenOps, KernelTime  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
GRAPH_WARMUP_QUIET, GRAPH_WARMUP_MAX = 8, 60
"""--cuda-graphs: engine steps before timing, until this many in a row captured no new bucket (at most
the second number): the timed steps then replay, as a long run's steps do."""
CPU_ONLY_SWITCHES = ("short_attention", "batch_short_documents", "compile_norms", "compile_loss",
                     "retain_host_memory")
"""What a CPU's plan adds to a GPU's: off here, so the engine runs what it runs on a GPU."""


def skeleton_config(args):
    """The model's transformers config: --shape (a known real config) or --family (transformers'
    defaults), every width shrunk to --hidden with the real ratios (--hidden 0: the real widths),
    --layers if given."""
    from transformers import AutoConfig

    if args.family:
        config = AutoConfig.for_model(args.family)
    else:
        from engine.plan import known_config
        config = known_config(args.shape)
    if not args.hidden:
        if args.layers:
            config.num_hidden_layers = args.layers
        config.pad_token_id = 0
        return config
    heads = max(1, args.hidden // args.head_dim)
    ratio = config.num_attention_heads // max(1, getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    inter = getattr(config, "intermediate_size", None) or 4 * config.hidden_size
    config.intermediate_size = int(round(args.hidden * inter / config.hidden_size / 16)) * 16
    config.hidden_size, config.num_attention_heads = args.hidden, heads
    config.num_key_value_heads = max(1, heads // ratio)
    config.head_dim = args.head_dim
    config.vocab_size = args.vocab
    config.tie_word_embeddings = False
    config.pad_token_id = config.bos_token_id = config.eos_token_id = 0
    if args.layers:
        config.num_hidden_layers = args.layers
    shrink_rope_factors(config, args.head_dim)
    if hasattr(config, "layer_types") and config.layer_types is not None:
        config.layer_types = [config.layer_types[i % len(config.layer_types)] for i in range(config.num_hidden_layers)]
    return config


def shrink_rope_factors(config, head_dim: int) -> None:
    """Per-frequency RoPE factors (Phi-3's longrope short_factor / long_factor: one per rotary pair of
    the real head_dim) resampled to the shrunk head's pairs, evenly spaced over the real ones."""
    for name in ("rope_parameters", "rope_scaling"):
        params = getattr(config, name, None)
        if not isinstance(params, dict):
            continue
        pairs = int(head_dim * params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0) or 1.0)) // 2
        for key in ("short_factor", "long_factor"):
            factors = params.get(key)
            if isinstance(factors, list) and len(factors) != pairs:
                params[key] = [factors[i * len(factors) // pairs] for i in range(pairs)]


def gpu_plan(disable: tuple[str, ...], precision: str, device: torch.device, cuda_graphs: bool = False):
    """The plan a GPU gets: on a GPU, its own; on a CPU, the CPU's without its CPU-only switches.
    Eager unless `cuda_graphs` (which must then be on in the GPU's plan: SystemExit saying why not)."""
    from engine import speed
    from engine.config import SpeedConfig

    plan = speed.resolve(SpeedConfig(), device=device, precision=precision)
    if cuda_graphs and not plan.cuda_graphs:
        raise SystemExit(f"--cuda-graphs: this run's plan leaves cuda_graphs off: {plan.describe()}")
    graphs = () if cuda_graphs else ("cuda_graphs",)
    return plan.off(*(CPU_ONLY_SWITCHES if device.type == "cpu" else ()), *graphs, *disable)


def build_base(config, precision: str, device: torch.device):
    from throughput_inputs import random_base_model

    from engine.training.amp import DTYPES
    return random_base_model(config, method="lora", device=device, dtype=DTYPES[precision])


class EngineRun:
    """The engine's step (engine.train's pieces in the loop's order) on packed rows."""

    def __init__(self, config, args, docs):
        from engine import speed
        from engine.config import OptimConfig
        from engine.data import make_loader
        from engine.layers.inject import inject_lora
        from engine.layers.lora import mark_only_lora_trainable
        from engine.model.build import enable_activation_checkpointing
        from engine.train import seed_everything, trainable_parameters
        from engine.training import amp
        from engine.training.objective import CausalLM
        from engine.training.optim import build_optimizer

        self.args, self.precision, self.device = args, args.precision, torch.device(args.device)
        self.plan = gpu_plan(tuple(args.disable), args.precision, self.device, args.cuda_graphs)
        seed_everything(0)
        model = build_base(config, args.precision, self.device)
        inject_lora(model, "all-linear", args.r, 2 * args.r)
        mark_only_lora_trainable(model)
        if args.checkpointing:
            enable_activation_checkpointing(model)
        kernels = speed.apply(self.plan, model)
        self.model = model.train()
        self.loader = iter(make_loader(docs, max_seq_len=args.seq_len, micro_batch_size=args.rows, packing=True,
                                       seed=0, pad_token_id=0, pin_memory=self.device.type == "cuda"))
        self.optimizer = build_optimizer(model, OptimConfig(lr=2e-4))
        self.scaler = amp.DynamicLossScaler(enabled=False, device=self.device)
        self.objective = CausalLM(1024, kernels)
        self.graphs = kernels.forward_backward   # speed.cuda_graphs (None: eager)
        self.params = trainable_parameters(model)

    def step(self):
        from engine.training.step import train_step

        return train_step(self.model, [next(self.loader)], objective=self.objective, params=self.params,
                          optimizer=self.optimizer, scheduler=None, scaler=self.scaler, precision=self.precision,
                          device=self.device, max_grad_norm=1.0, forward_backward_fn=self.graphs).loss_sum


class HFRun:
    """transformers + PEFT: one document per row, padded to the longest of the batch."""

    def __init__(self, config, args, docs):
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        self.device = torch.device(args.device)
        model = build_base(config, args.precision, self.device)
        model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0, bias="none",
                                                 task_type="CAUSAL_LM", target_modules="all-linear"))
        if args.checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()  # as Trainer + PEFT set it up
        self.model = model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=2e-4)
        mean = statistics.mean(len(d["input_ids"]) for d in docs)
        self.batch = max(1, round(args.seq_len * args.rows / mean))  # about as many tokens as the engine's step
        self.docs, self.position, self.precision = docs, 0, args.precision

    def _next(self):
        docs = [self.docs[(self.position + i) % len(self.docs)] for i in range(self.batch)]
        self.position += self.batch
        n = max(len(d["input_ids"]) for d in docs)
        ids = torch.zeros(len(docs), n, dtype=torch.long)
        labels = torch.full((len(docs), n), -100, dtype=torch.long)
        mask = torch.zeros(len(docs), n, dtype=torch.long)
        for i, d in enumerate(docs):
            k = len(d["input_ids"])
            ids[i, :k] = torch.tensor(d["input_ids"])
            labels[i, 1:k] = torch.tensor(d["labels"][:k - 1])  # HF shifts labels itself
            mask[i, :k] = 1
        return ids.to(self.device), mask.to(self.device), labels.to(self.device)

    def step(self):
        ids, mask, labels = self._next()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            loss = self.model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def count_ops(run) -> AtenOps:
    with AtenOps() as ops:
        run.step()
    return ops


def kernel_time(run) -> KernelTime:
    with KernelTime() as kt:
        run.step()
    return kt


def per_layer(full: AtenOps, one: AtenOps, layers: int) -> tuple[float, dict[str, float]]:
    names = {k: (full.by_name[k] - one.by_name.get(k, 0)) / (layers - 1) for k in full.by_name}
    return (full.total - one.total) / (layers - 1), {k: v for k, v in names.items() if abs(v) >= 0.5}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.1-8b", help="a known shape (engine.plan.KNOWN_SHAPE_NAMES)")
    ap.add_argument("--family", default=None, help="instead of --shape: a transformers model_type (qwen3, gemma2, ...)")
    ap.add_argument("--layers", type=int, default=0, help="decoder layers (default: the shape's)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rows", type=int, default=2, help="engine rows per step (HF: as many tokens in documents)")
    ap.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    ap.add_argument("--disable", nargs="*", default=[], help="engine speed switches off (speed.disable)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration and repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu | cuda (then GPU ms from CUDA events too)")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="the engine's micro-batches replayed from CUDA graphs (speed.cuda_graphs; --device cuda)")
    ap.add_argument("--tag", default=None, help="write benchmarks/results/host_cost_TAG.{json,md}")
    ap.add_argument("--out-dir", default=RESULTS)
    args = ap.parse_args(argv)
    if args.cuda_graphs and args.device != "cuda":
        ap.error("--cuda-graphs needs --device cuda: CUDA graphs capture GPU work (on a CPU the switch is off "
                 "and its bucketing is checked by tests/speed/test_cuda_graphs.py)")
    torch.set_num_threads(args.threads)
    from throughput_inputs import synthetic_docs

    config = skeleton_config(args)
    docs = synthetic_docs(args.vocab, args.seq_len, n=512)
    # each side its own config: a model keeps the config object it is built from, and building HF's
    # model would otherwise set the engine model's attention implementation back to "sdpa"
    runs = {"engine": EngineRun(copy.deepcopy(config), args, docs), "hf_peft": HFRun(copy.deepcopy(config), args, docs)}
    print(runs["engine"].plan.describe(), file=sys.stderr)
    times = {k: [] for k in runs}
    cpu = {k: [] for k in runs}
    gpu = {k: [] for k in runs}
    cuda = args.device == "cuda"
    for run in runs.values():  # warm-up: first-call costs (allocator, lazy imports)
        run.step(), run.step()
    graphs = runs["engine"].graphs
    if graphs is not None:  # steady state: every bucket the data reaches captured before timing
        quiet = 0
        for _ in range(GRAPH_WARMUP_MAX):
            before = graphs.stats["captures"]
            runs["engine"].step()
            quiet = quiet + 1 if graphs.stats["captures"] == before else 0
            if quiet == GRAPH_WARMUP_QUIET:
                break
        captured_before_timing = graphs.stats["captures"]
    for rep in range(args.repeats):
        order = list(runs) if rep % 2 == 0 else list(reversed(runs))
        for name in order:
            for _ in range(args.steps):
                if cuda:
                    torch.cuda.synchronize()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                t0, c0 = time.perf_counter(), time.process_time()
                runs[name].step()
                host = time.perf_counter() - t0  # the host's time to issue the step (it does not wait)
                if cuda:
                    end.record()
                    torch.cuda.synchronize()
                    gpu[name].append(start.elapsed_time(end))
                times[name].append(1e3 * (host if cuda else time.perf_counter() - t0))
                cpu[name].append(1e3 * (time.process_time() - c0))
    ops = {k: count_ops(r) for k, r in runs.items()}
    kernels = {k: kernel_time(r) for k, r in runs.items()}
    layers = config.num_hidden_layers
    layer_ops = {}
    if layers > 1:
        one_config = skeleton_config(argparse.Namespace(**{**vars(args), "layers": 1}))
        one = {"engine": EngineRun(copy.deepcopy(one_config), args, docs), "hf_peft": HFRun(one_config, args, docs)}
        for k, r in one.items():
            r.step()
            layer_ops[k] = per_layer(ops[k], count_ops(r), layers)
    result = {"command": "python benchmarks/host_cost.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "torch": torch.__version__, "threads": args.threads, "device": args.device, "load_average": os.getloadavg(),
              "model": {"model_type": config.model_type, "layers": layers, "hidden": config.hidden_size,
                        "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads,
                        "intermediate": config.intermediate_size, "vocab": config.vocab_size},
              "precision": args.precision, "checkpointing": args.checkpointing, "r": args.r,
              "seq_len": args.seq_len, "engine_rows": args.rows, "hf_batch": runs["hf_peft"].batch,
              "plan": runs["engine"].plan.describe(), "cuda_graphs": args.cuda_graphs,
              "graph_counts": dict(graphs.stats) if graphs else None,
              "captures_after_warmup": graphs.stats["captures"] - captured_before_timing if graphs else None,
              "configs": {}}
    for k in runs:
        result["configs"][k] = {"ms_per_step": statistics.median(times[k]), "cpu_ms_per_step": statistics.median(cpu[k]),
                                "gpu_ms_per_step": statistics.median(gpu[k]) if gpu[k] else None,
                                "gemm_cpu_ms": 1e3 * kernels[k].seconds["gemm"],
                                "attention_cpu_ms": 1e3 * kernels[k].seconds["attention"],
                                "gemm_calls": kernels[k].calls["gemm"],
                                "ms_all": times[k], "aten_ops_per_step": ops[k].total,
                                "top_ops": dict(ops[k].by_name.most_common(15))}
        if k in layer_ops:
            total, names = layer_ops[k]
            result["configs"][k]["ops_per_layer"] = total
            result["configs"][k]["ops_per_layer_by_name"] = dict(sorted(names.items(), key=lambda kv: -kv[1])[:15])
    e, h = result["configs"]["engine"], result["configs"]["hf_peft"]
    result["ratio_ms"] = e["ms_per_step"] / h["ms_per_step"]
    result["ratio_cpu_ms"] = e["cpu_ms_per_step"] / h["cpu_ms_per_step"]
    result["ratio_ops"] = e["aten_ops_per_step"] / h["aten_ops_per_step"]
    for c in result["configs"].values():
        c["other_cpu_ms"] = c["cpu_ms_per_step"] - c["gemm_cpu_ms"] - c["attention_cpu_ms"]
    result["ratio_other_cpu_ms"] = e["other_cpu_ms"] / h["other_cpu_ms"]
    result["ratio_gemm_cpu_ms"] = e["gemm_cpu_ms"] / h["gemm_cpu_ms"]
    print(json.dumps({k: result[k] for k in ("ratio_ms", "ratio_cpu_ms", "ratio_ops", "ratio_gemm_cpu_ms",
                                              "ratio_other_cpu_ms")}))
    for k, c in result["configs"].items():
        print(f"{k:8s} {c['ms_per_step']:8.1f} ms  {c['cpu_ms_per_step']:8.1f} cpu-ms  (gemm {c['gemm_cpu_ms']:.1f}, "
              f"attention {c['attention_cpu_ms']:.1f}, other {c['other_cpu_ms']:.1f})  {c['aten_ops_per_step']:7d} ops"
              f"  {c.get('ops_per_layer', 0):6.0f} ops/layer  top: {c.get('ops_per_layer_by_name', c['top_ops'])}")
    if args.tag:
        write(result, args.tag, args.out_dir)
    return 0


def write(result: dict, tag: str, out_dir: str = RESULTS) -> None:
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"host_cost_{tag}")
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=1)
    m = result["model"]
    lines = [f"# Host cost per step: engine vs transformers + PEFT ({m['model_type']}, {m['layers']} layers, "
             f"hidden {m['hidden']})", "", f"`{result['command']}`", "",
             f"torch {result['torch']}, {result['threads']} thread(s), load average at the end "
             f"{', '.join(f'{x:.2f}' for x in result['load_average'])} (a shared machine: both sides alternate)",
             f"{result['precision']}, checkpointing={result['checkpointing']}, LoRA r{result['r']} on every block linear, "
             f"rows of {result['seq_len']} tokens (engine: {result['engine_rows']} packed rows; HF: "
             f"{result['hf_batch']} padded documents per step)", "", f"engine plan: `{result['plan']}`"
             + (f"; CUDA graphs: {result['graph_counts']} ({result['captures_after_warmup']} captures after the warm-up)"
                if result.get("cuda_graphs") else "; eager (no CUDA graphs)"), "",
             "| | ms per step (host: wall; on a GPU the time to issue it) | CPU ms per step | of which in GEMMs "
             "(calls) | in attention kernels | CPU ms outside them | GPU ms per step | aten ops per step | ops per layer |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k, c in result["configs"].items():
        g = f"{c['gpu_ms_per_step']:.1f}" if c.get("gpu_ms_per_step") is not None else "-"
        lines.append(f"| {k} | {c['ms_per_step']:.1f} | {c['cpu_ms_per_step']:.1f} | {c['gemm_cpu_ms']:.1f} "
                     f"({c['gemm_calls']:,}) | {c['attention_cpu_ms']:.1f} | {c['other_cpu_ms']:.1f} | {g} | "
                     f"{c['aten_ops_per_step']:,} | {c.get('ops_per_layer', 0):.0f} |")
    lines += ["", f"engine / HF: wall {result['ratio_ms']:.2f}x, CPU {result['ratio_cpu_ms']:.2f}x, "
              f"ops {result['ratio_ops']:.2f}x; CPU in GEMMs {result['ratio_gemm_cpu_ms']:.2f}x, CPU outside GEMMs "
              f"and attention kernels {result['ratio_other_cpu_ms']:.2f}x", "", "Ops per decoder layer by name (forward + recompute + backward):", ""]
    for k, c in result["configs"].items():
        lines.append(f"- {k}: " + ", ".join(f"{n} {v:.0f}" for n, v in c.get("ops_per_layer_by_name", {}).items()))
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
