"""Shared tiny-model fixtures.

`make_tiny_model_dir(tmp_path, family)` writes a seeded random tiny causal LM (hidden 64,
2 layers) with `save_pretrained` plus a real fast tokenizer into `tmp_path/tiny-<family>`.

The tokenizer is a byte-level BPE trained in code on a few sentences (vocab ~330, no download,
built once per session in well under a second), wrapped in a fast tokenizer with a ChatML
chat template; eos == pad == "<|im_end|>" like SmolLM2. Byte-level means any text encodes.
The model's vocab_size equals len(tokenizer), so every token id is valid.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

FAMILIES = ("llama", "phi3", "qwen2", "mistral", "gemma")
# Further decoder families (tests/e2e/test_families.py): config class, and what differs from the
# common tiny shape (hidden 64, 2 layers, 4 heads, 2 KV heads).
MORE_FAMILIES = {
    "gemma2": ("Gemma2Config", {"head_dim": 16}),           # no SDPA in transformers 5: eager
    "gpt_neox": ("GPTNeoXConfig", {}),                      # checkpoint says embed_out, model lm_head
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),  # fused experts
    "qwen2_moe": ("Qwen2MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                                     "shared_expert_intermediate_size": 64}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "opt": ("OPTConfig", {"ffn_dim": 128, "word_embed_proj_dim": 64}),  # positions from the mask: no packing
    "bloom": ("BloomConfig", {}),                           # ALiBi, no SDPA: no packing, eager
    "falcon": ("FalconConfig", {}),
    "stablelm": ("StableLmConfig", {}),
    "phi": ("PhiConfig", {}),
    "granite": ("GraniteConfig", {}),
    "olmo2": ("Olmo2Config", {}),
    "starcoder2": ("Starcoder2Config", {}),
    "gpt2": ("GPT2Config", {"n_inner": 128}),              # Conv1D layers (nn.Linear in the engine)
}
# Loggers in tests never reach a network or an account (engine/tracking/): W&B offline, quiet, no
# console capture under pytest's; MLflow only where a test names a store.
os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CONSOLE="off")
os.environ.pop("WANDB_API_KEY", None)
os.environ.pop("MLFLOW_TRACKING_URI", None)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "You are a helpful assistant. Answer the question in one sentence.",
    "system user assistant: hello, how are you today? I am fine, thank you!",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ; : ! ? ( ) [ ] { } \" '",
    "def add(a, b):\n    return a + b\n",
]
_TOKENIZER = None


def make_tiny_tokenizer():
    """A fast tokenizer (byte-level BPE, ChatML template, eos = pad = <|im_end|>); cached per session."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(_CORPUS * 4, trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                       bos_token=None, unk_token=None)
        fast.chat_template = CHATML_TEMPLATE
        _TOKENIZER = fast
    return copy.deepcopy(_TOKENIZER)


def tiny_config(family: str, vocab_size: int, tie_word_embeddings: bool | None = None, **overrides):
    """A transformers config of `family` with hidden 64, 2 layers, 4 heads (2 KV heads)."""
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  pad_token_id=None, bos_token_id=None, eos_token_id=None)
    classes = {"llama": transformers.LlamaConfig, "phi3": transformers.Phi3Config,
               "qwen2": transformers.Qwen2Config, "mistral": transformers.MistralConfig,
               "gemma": transformers.GemmaConfig}
    classes.update({name: getattr(transformers, cls) for name, (cls, _) in MORE_FAMILIES.items()})
    if family not in classes:
        raise ValueError(f"unknown tiny family {family!r}; one of {FAMILIES + tuple(MORE_FAMILIES)}")
    if family == "gemma":
        common["head_dim"] = 16
    common.update(MORE_FAMILIES.get(family, (None, {}))[1])
    if tie_word_embeddings is not None:
        common["tie_word_embeddings"] = tie_word_embeddings
    common.update(overrides)
    return classes[family](**common)


def make_tiny_model(family: str, seed: int = 0, tie_word_embeddings: bool | None = None, **overrides):
    """(model, tokenizer): a seeded random tiny model in fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    tokenizer = make_tiny_tokenizer()
    config = tiny_config(family, len(tokenizer), tie_word_embeddings, **overrides)
    config.eos_token_id = config.pad_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():  # transformers' init std (0.02) is tiny; larger weights make diffs visible
        for name, p in model.named_parameters():
            if p.dim() > 1 or name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    return model.eval(), tokenizer


def make_tiny_model_dir(tmp_path, family: str = "llama", seed: int = 0, tie_word_embeddings: bool | None = None,
                        max_shard_size: str | None = None, **overrides) -> Path:
    """Write a tiny seeded model + tokenizer to tmp_path/tiny-<family>[...] and return the dir.

    max_shard_size (e.g. "100KB") makes a sharded checkpoint with model.safetensors.index.json.
    """
    model, tokenizer = make_tiny_model(family, seed, tie_word_embeddings, **overrides)
    suffix = "" if tie_word_embeddings is None else ("-tied" if tie_word_embeddings else "-untied")
    out = Path(tmp_path) / f"tiny-{family}{suffix}{'-sharded' if max_shard_size else ''}"
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    tokenizer.save_pretrained(out)
    return out


def counting_run_config(root, model_dir, peft, *, max_steps: int = 3, lr: float = 1e-2):
    """A validated RunConfig for a short real run in `root`: 8 "count to i" chats written to
    root/train.jsonl, 64-token rows, micro-batch 2, no plots; `peft` is the PeftConfig to train."""
    import json

    from engine.config import DataConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig

    root = Path(root)
    with open(root / "train.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"count to {i}"},
                                             {"role": "assistant", "content": " ".join(map(str, range(i + 1)))}]}) + "\n")
    return RunConfig(output_dir=str(root / "run"), model=ModelConfig(path=str(model_dir)),
                     data=DataConfig(train_path=str(root / "train.jsonl"), max_seq_len=64, cache_dir=str(root / "cache")),
                     peft=peft, optim=OptimConfig(lr=lr),
                     train=TrainConfig(max_steps=max_steps, micro_batch_size=2, precision="fp32", plots=False)).validate()


@pytest.fixture
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture
def tiny_llama_dir(tmp_path):
    return make_tiny_model_dir(tmp_path, "llama")


@pytest.fixture
def tiny_llama_tied_dir(tmp_path):
    return make_tiny_model_dir(tmp_path, "llama", tie_word_embeddings=True)


@pytest.fixture
def tiny_phi3_dir(tmp_path):
    return make_tiny_model_dir(tmp_path, "phi3")


@pytest.fixture
def tiny_qwen2_dir(tmp_path):
    return make_tiny_model_dir(tmp_path, "qwen2")


@pytest.fixture(params=["llama", "phi3", "qwen2"])
def tiny_model_dir(request, tmp_path):
    return make_tiny_model_dir(tmp_path, request.param)


@pytest.fixture(autouse=True)
def _host_memory_flag_per_test():
    """A test that trains in-process on a CPU makes engine.speed.host_memory retain memory (train.
    retain_host_memory=auto). glibc's thresholds then stay fixed for the rest of the process
    (harmless), but the flag also caps the chunked loss's chunks: reset it so what a later test
    measures does not depend on which tests ran before it."""
    yield
    from engine.speed import host_memory
    host_memory._retained = False


def apply_speed(model, precision: str = "fp32", off=(), **speed):
    """The speed plan engine.train would resolve for `model` on its device under `precision`
    (host memory left alone unless asked), minus the switches in `off`, applied; returns the
    StepKernels for the loss."""
    from engine.config import SpeedConfig
    from engine.speed import plan as speed_plan

    speed.setdefault("retain_host_memory", False)
    plan = speed_plan.resolve(SpeedConfig(**speed), device=next(model.parameters()).device, precision=precision)
    return speed_plan.apply(plan.off(*off) if off else plan, model)


def use_packed_attention(model, enabled: bool = True) -> None:
    """The core's per-document attention (SDPA per document), or plain SDPA again."""
    from engine.model.attention import register_packed_attention, set_attention

    set_attention(model, register_packed_attention() if enabled else None)


def assert_close_reduced(actual: torch.Tensor, expected: torch.Tensor, *, terms: int,
                         dtype: torch.dtype = torch.float32, msg: str = "") -> None:
    """Two computations of the same sums in a different order agree to rounding: each element
    within c * eps(dtype) * sqrt(terms) * max|expected| (a sum of `terms` products rounds with an
    error growing as sqrt(terms) on average; c = 16 covers the tail). The bound comes from the
    dtype and the reduction's size, not from one machine's measurement."""
    import math

    eps = torch.finfo(dtype).eps
    scale = expected.detach().abs().max().item() or 1.0
    tol = 16 * eps * math.sqrt(max(terms, 1)) * scale
    torch.testing.assert_close(actual, expected, atol=tol, rtol=0, msg=msg or None)


def packed_batch(ids: torch.Tensor, doc_lengths: list[list[int]], labels: torch.Tensor | None = None) -> dict:
    """A packed batch as the loader makes it: positions restarting per document and the packing
    context (document lengths, labelled positions)."""
    from engine.model.packing import packing_context

    position_ids = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in doc_lengths])
    if labels is None:
        labels = torch.full_like(ids, -100)
    return {"input_ids": ids, "labels": labels, "position_ids": position_ids,
            "packing": packing_context(labels, doc_lengths, num_tokens=ids.numel())}


def lora_and_peft_twins(base: torch.nn.Module, *, seed: int):
    """(ours, PEFT's): the same tiny model with our LoRA (r=4, alpha=8, all-linear, B != 0 from a
    generator seeded with `seed`: the policy differs from the reference) and PEFT's copy of that
    adapter; the oracle pair of the TRL parity tests."""
    import peft

    from engine.layers.inject import inject_lora, target_modules_for_config
    from engine.layers.lora import lora_state_dict, mark_only_lora_trainable

    ours = copy.deepcopy(base)
    torch.manual_seed(0)
    inject_lora(ours, "all-linear", r=4, alpha=8.0)
    mark_only_lora_trainable(ours)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(lora_state_dict(ours).items()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8.0, lora_dropout=0.0, target_modules=target_modules_for_config(ours, "all-linear"),
        task_type="CAUSAL_LM"))
    peft.set_peft_model_state_dict(theirs, {"base_model.model." + k: v for k, v in lora_state_dict(ours).items()})
    return ours, theirs
