"""The lean decode step (engine/model/lean_decode.py) against transformers' forward: logits per
decode step within fp32 rounding and greedy rollouts token for token, per family and variant
(biases, partial rotary, a sliding window that bites, Qwen3's q/k norms, a 4-bit base with and
without its decode copy, DoRA, no merged copies); the families it refuses, and why; the probe
check catching a forward it does not compute; bf16 autocast; and the ops it saves."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from engine.grpo.rollout import RolloutCache, _forward_keywords, _lean_decoder, generate_rollouts
from engine.layers.inject import inject_lora
from engine.layers.lora import lora_modules
import engine.speed.onednn_decode  # noqa: F401 (registers the "onednn" layout, as the speed plan does)
from engine.model.lean_decode import LeanDecoder, layouts
from tests.conftest import make_tiny_model
from tests.grpo.test_rollout import lora_model, random_prompts, transformers_generate

LEAN = [("llama", {}), ("phi3", {}), ("qwen2", {}), ("mistral", {}), ("gemma", {}), ("qwen3", {}),
        ("llama", {"attention_bias": True, "mlp_bias": True}),
        ("phi3", {"partial_rotary_factor": 0.5}),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
        ("mistral", {"sliding_window": 3}),
        ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 16}})]


def _ids(cases):
    return [f + "".join(f"-{k}" for k in o) for f, o in cases]


def _rollouts(model, tokenizer, prompts, **kw):
    kw.setdefault("temperature", 0.0)
    return generate_rollouts(model, prompts, num_generations=2, max_new_tokens=kw.pop("max_new_tokens", 14),
                             stop_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id, **kw)


@pytest.mark.parametrize("family,overrides", LEAN, ids=_ids(LEAN))
@pytest.mark.parametrize("layout", layouts())
def test_lean_steps_give_transformers_logits_and_tokens(family, overrides, layout):
    model, tokenizer = lora_model(family, **overrides)
    model.eval()
    prompts = random_prompts(model)
    lean = _rollouts(model, tokenizer, prompts, merged_layout=layout)
    assert lean.decode.startswith("lean decode: 2 layers"), lean.decode
    assert lean.completion_ids == _rollouts(model, tokenizer, prompts, lean_decode=False).completion_ids
    assert lean.completion_ids == transformers_generate(model, prompts, 2, 14, [tokenizer.eos_token_id],
                                                        tokenizer.pad_token_id, do_sample=False)
    # logits, step by step, on one prompt longer than any window: the lean step vs the model's forward
    ids = torch.tensor([random_prompts(model, lengths=(9,), seed=3)[0]])
    with torch.no_grad():
        decoder, _ = _lean_decoder(model, ids[0].tolist(), torch.float32, layout, False)
        lean_cache, ref_cache = RolloutCache(2, 16), RolloutCache(2, 16)
        for cache in (lean_cache, ref_cache):
            model(input_ids=ids[:, :5], **_forward_keywords(model, cache))
        for t in range(5, 9):
            want = model(input_ids=ids[:, t:t + 1], **_forward_keywords(model, ref_cache)).logits[:, -1]
            got = decoder.step(ids[:, t], torch.tensor([t]), lean_cache, torch.zeros(1, 1, 1, 16))
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert lean_cache.layers[0].length == 9


REFUSED = [("gemma2", {}, "logit soft-capping"), ("olmo2", {}, "norms after its sub-blocks"),
           ("mixtral", {}, "is not a gated MLP"), ("stablelm", {}, "not an RMSNorm of a known form"),
           ("gpt_neox", {}, "no model.layers"),
           ("granite", {"residual_multiplier": 0.5, "logits_scaling": 2.0},
            "the config scales the stream (residual_multiplier, logits_scaling)")]


@pytest.mark.parametrize("family,overrides,why", REFUSED, ids=_ids([(f, o) for f, o, _ in REFUSED]))
def test_families_it_does_not_compute_decode_with_transformers_and_say_why(family, overrides, why):
    model, tokenizer = lora_model(family, **overrides)
    prompts = random_prompts(model)
    got = _rollouts(model, tokenizer, prompts)
    assert got.decode.startswith("transformers' forward (lean decode: ") and why in got.decode, got.decode
    assert got.completion_ids == transformers_generate(model, prompts, 2, 14, [tokenizer.eos_token_id],
                                                       tokenizer.pad_token_id, do_sample=False)


def test_the_probe_check_catches_a_forward_the_step_does_not_compute():
    """A family whose blocks do something more (here: a hook scaling the first block's output) passes
    the structural recognition; the probe's logits differ and the rollout keeps transformers' forward."""
    model, tokenizer = lora_model("llama")
    model.model.layers[0].register_forward_hook(lambda m, args, out: (out[0] * 1.5, *out[1:]) if isinstance(out, tuple)
                                                else out * 1.5)
    prompts = random_prompts(model)
    got = _rollouts(model, tokenizer, prompts)
    assert "logits differ from the model's forward on a probe" in got.decode
    assert got.completion_ids == transformers_generate(model, prompts, 2, 14, [tokenizer.eos_token_id],
                                                       tokenizer.pad_token_id, do_sample=False)


@pytest.mark.parametrize("dequantize", [True, False], ids=["decode_copy", "4bit_modules"])
def test_a_4bit_base_decodes_lean_with_or_without_its_copy(dequantize):
    model, tokenizer = lora_model("llama", four_bit=True)
    prompts = random_prompts(model)
    got = _rollouts(model, tokenizer, prompts, dequantize_4bit=dequantize)
    assert got.decode.startswith("lean decode")
    # without the copy each 4-bit projection runs as its module (LoRA branch included): no copies
    # but the unadapted lm_head's
    head = model.lm_head.weight.numel() * 4
    assert (f"{head / 2**20:.0f} MiB" in got.decode) != dequantize or head / 2**20 < 1
    assert got.completion_ids == transformers_generate(model, prompts, 2, 14, [tokenizer.eos_token_id],
                                                       tokenizer.pad_token_id, do_sample=False)


def test_dora_and_no_merged_copies_decode_the_same_tokens():
    model, tokenizer = make_tiny_model("qwen2")
    torch.manual_seed(1)
    inject_lora(model, "all-linear", r=4, alpha=8, use_dora=True)
    for m in lora_modules(model).values():
        nn.init.normal_(m.lora_B.weight, std=0.1)
    prompts = random_prompts(model)
    want = transformers_generate(model, prompts, 2, 14, [tokenizer.eos_token_id], tokenizer.pad_token_id,
                                 do_sample=False)
    merged = _rollouts(model, tokenizer, prompts)
    unmerged = _rollouts(model, tokenizer, prompts, merge_lora=False)
    assert merged.decode.startswith("lean decode") and "merged decode copies" in merged.decode
    assert unmerged.decode.startswith("lean decode") and "merged" not in unmerged.decode
    assert merged.completion_ids == unmerged.completion_ids == want


@pytest.mark.parametrize("layout", layouts())
def test_bf16_autocast_logits_stay_close_to_transformers(layout):
    """Under autocast the copies are bf16 and the residual stream stays in fp32, as transformers has it."""
    model, tokenizer = lora_model("llama")
    model.eval()
    ids = torch.tensor([random_prompts(model, lengths=(8,))[0]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        decoder, line = _lean_decoder(model, ids[0].tolist(), torch.bfloat16, layout, False)
        assert decoder is not None, line
        assert decoder.layers[0].qkv.weight_t.dtype == torch.bfloat16
        lean_cache, ref_cache = RolloutCache(2, 8), RolloutCache(2, 8)
        for cache in (lean_cache, ref_cache):
            model(input_ids=ids[:, :7], **_forward_keywords(model, cache))
        lean_cache.to_dtype(torch.bfloat16)
        want = model(input_ids=ids[:, 7:], **_forward_keywords(model, ref_cache)).logits[:, -1].float()
        got = decoder.step(ids[:, 7], torch.tensor([7]), lean_cache, torch.zeros(1, 1, 1, 8, dtype=torch.bfloat16))
    assert (got - want).abs().max() <= 3e-2 * want.abs().max()


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _ops_per_step(layers: int) -> tuple[int, int]:
    """(lean step, transformers' forward on merged decode copies): aten ops for one decode step of 4 rows."""
    from engine.layers.decode_merge import lora_merged_for_decode

    model, _ = lora_model("llama", num_hidden_layers=layers)
    model.eval()
    ids = torch.tensor([random_prompts(model, lengths=(6,))[0]] * 4)
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        decoder = LeanDecoder.build(model, torch.float32, "in_out", False)
        caches = RolloutCache(layers, 8), RolloutCache(layers, 8)
        for cache in caches:
            model(input_ids=ids[:, :5], **_forward_keywords(model, cache))
        with _Count() as lean:
            decoder.step(ids[:, 5], torch.full((4,), 5), caches[0], torch.zeros(4, 1, 1, 8))
        with lora_merged_for_decode(model, layout="in_out"), _Count() as reference:
            model(input_ids=ids[:, 5:], attention_mask=torch.ones(4, 6, dtype=torch.bool),
                  position_ids=torch.full((4, 1), 5), **_forward_keywords(model, caches[1]))
    return lean.n, reference.n


def test_a_lean_layer_issues_under_half_the_ops_of_transformers_layer():
    """Per decoder layer (the difference between a 4- and a 2-layer model): ~37 aten ops vs ~98."""
    (lean2, ref2), (lean4, ref4) = _ops_per_step(2), _ops_per_step(4)
    lean, reference = (lean4 - lean2) / 2, (ref4 - ref2) / 2
    assert lean <= 0.45 * reference, (lean, reference)
    assert lean4 < ref4 / 2
