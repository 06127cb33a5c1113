"""GRPO rollouts (engine/grpo/rollout.py) against transformers' `generate` on tiny random models:
greedy tokens equal per family (mixed prompt lengths, LoRA with nonzero B, a 4-bit base, windows
that bite, the engine's packed attention); sampled tokens equal too under the same seed (same
temperature / top-k / top-p semantics, same draws); stop handling, truncation, the shared prefill,
the generator, the early stop check and the argument errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.generate import left_pad
from engine.grpo.rollout import RolloutError, Rollouts, generate_rollouts, next_tokens
from engine.layers.inject import inject_lora
from engine.layers.lora import lora_modules
from engine.layers.quant import QuantSpec, quantize_module_linears
from tests.conftest import FAMILIES, make_tiny_model, use_packed_attention

PROMPT_LENGTHS = (5, 11, 3)


def lora_model(family: str = "llama", *, four_bit: bool = False, packed: bool = False, **overrides):
    """A tiny `family` model with LoRA on every linear, B drawn nonzero (the adapter changes the tokens)."""
    model, tokenizer = make_tiny_model(family, **overrides)
    if four_bit:
        quantize_module_linears(model, [n for n, m in model.named_modules()
                                        if isinstance(m, nn.Linear) and "layers" in n], QuantSpec())
    if packed:
        model.set_attn_implementation("sdpa")
        use_packed_attention(model)
    torch.manual_seed(1)
    inject_lora(model, "all-linear", r=4, alpha=8)
    for m in lora_modules(model).values():
        nn.init.normal_(m.lora_B.weight, std=0.1)
    return model, tokenizer


def random_prompts(model, lengths=PROMPT_LENGTHS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]


def cut(row: list[int], stops: list[int]) -> list[int]:
    end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
    return row[:end]


def transformers_generate(model, prompts, G: int, max_new_tokens: int, stops: list[int], pad: int, **sampling):
    """What TRL's GRPOTrainer does: each prompt repeated G times, left-padded, `model.generate`."""
    ids, mask = left_pad([p for p in prompts for _ in range(G)], pad)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_token_id=stops,
                             pad_token_id=pad, **sampling)
    return [cut(row, stops) for row in out[:, ids.shape[1]:].tolist()]


def rollouts(model, tokenizer, prompts, G: int = 2, max_new_tokens: int = 12, stops=None, **kw) -> Rollouts:
    kw.setdefault("temperature", 0.0)
    return generate_rollouts(model, prompts, num_generations=G, max_new_tokens=max_new_tokens,
                             stop_token_ids=stops or [tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id,
                             **kw)


def a_stop_inside(model, tokenizer, prompts, max_new_tokens: int = 12) -> list[int]:
    """EOS plus a token greedy decoding emits mid-way through some completion: so some rows stop
    early and others run to the end, whatever the random model prefers."""
    free = transformers_generate(model, prompts, 1, max_new_tokens, [tokenizer.eos_token_id], tokenizer.pad_token_id,
                                 do_sample=False)
    return [tokenizer.eos_token_id, free[0][max_new_tokens // 2]]


CASES = ([(f, {}, False, False) for f in FAMILIES]
         + [("llama", {}, True, False),                                   # QLoRA: NF4 base
            ("mistral", {"sliding_window": 4}, False, True),              # a window that bites, packed attention
            ("gemma2", {"sliding_window": 4}, False, False),              # hybrid sliding / full layers, soft-capping
            ("qwen2", {}, False, True)])


@pytest.mark.parametrize("family,overrides,four_bit,packed", CASES,
                         ids=[f"{f}{'-4bit' if q else ''}{'-window' if o else ''}{'-packed' if p else ''}"
                              for f, o, q, p in CASES])
def test_greedy_equals_transformers_generate(family, overrides, four_bit, packed):
    model, tokenizer = lora_model(family, four_bit=four_bit, packed=packed, **overrides)
    prompts = random_prompts(model)
    stops = a_stop_inside(model, tokenizer, prompts)
    got = rollouts(model, tokenizer, prompts, G=2, stops=stops)
    expected = transformers_generate(model, prompts, 2, 12, stops, tokenizer.pad_token_id, do_sample=False)
    assert got.completion_ids == expected
    assert got.truncated == [row[-1] not in stops for row in expected]
    assert any(got.truncated) and not all(got.truncated)  # both kinds of row were exercised


@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.7, top_k=20, top_p=0.9),
                                      dict(temperature=1.3, top_p=0.5)])
def test_sampled_tokens_equal_transformers_generate_under_the_same_seed(sampling):
    """Same logits, same warpers in the same order, same multinomial draws from the global RNG.
    top_k and top_p are handed to `generate` as TRL does (transformers' own default top_k is 50)."""
    sampling = {"top_k": 0, "top_p": 1.0, **sampling}
    model, tokenizer = lora_model("qwen2")
    prompts = random_prompts(model)
    torch.manual_seed(5)
    got = rollouts(model, tokenizer, prompts, G=3, compact_rows=False, sampler="multinomial", **sampling)
    torch.manual_seed(5)
    expected = transformers_generate(model, prompts, 3, 12, [tokenizer.eos_token_id], tokenizer.pad_token_id,
                                     do_sample=True, **sampling)
    assert got.completion_ids == expected
    assert len({tuple(c) for c in got.completion_ids}) > 3  # the G samples of a prompt differ


def test_warpers_equal_transformers_logits_processors():
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    hf = TopPLogitsWarper(0.8)(None, TopKLogitsWarper(10)(None, TemperatureLogitsWarper(0.6)(None, logits)))
    draws = torch.multinomial(hf.softmax(-1), 1, generator=torch.Generator().manual_seed(3)).squeeze(1)
    ours = next_tokens(logits, temperature=0.6, top_k=10, top_p=0.8, generator=torch.Generator().manual_seed(3),
                       sampler="multinomial")
    assert torch.equal(ours, draws)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (4, 1.0), (0, 0.7)])
def test_inverse_cdf_sampler_draws_the_warped_distribution(top_k, top_p):
    """20,000 draws per case from one row of logits: each token's frequency within 5 sigma of its
    probability after the warpers (transformers' processors), and never a token they removed."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 1.5, 0.2]])
    expected = logits.clone()
    if top_k:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(None, expected)
    p = expected.softmax(-1)[0].double()
    n = 20_000
    draws = next_tokens(logits.expand(n, -1), temperature=1.0, top_k=top_k, top_p=top_p,
                        generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=8).double() / n
    assert torch.all((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-12), (freq, p)
    assert torch.all(freq[p == 0] == 0)


def test_seeded_generator_reproduces_and_top_k_1_is_greedy():
    model, tokenizer = lora_model("llama")
    prompts = random_prompts(model)
    sample = dict(G=4, temperature=1.0)
    first = rollouts(model, tokenizer, prompts, generator=torch.Generator().manual_seed(7), **sample)
    again = rollouts(model, tokenizer, prompts, generator=torch.Generator().manual_seed(7), **sample)
    other = rollouts(model, tokenizer, prompts, generator=torch.Generator().manual_seed(8), **sample)
    assert first.completion_ids == again.completion_ids and first.truncated == again.truncated
    assert first.completion_ids != other.completion_ids
    # a generator that resumes mid-stream (its state saved and restored) draws what it would have
    g = torch.Generator().manual_seed(9)
    rollouts(model, tokenizer, prompts, generator=g, **sample)
    state = g.get_state()
    second = rollouts(model, tokenizer, prompts, generator=g, **sample)
    assert rollouts(model, tokenizer, prompts, generator=torch.Generator().set_state(state),
                    **sample).completion_ids == second.completion_ids
    greedy = rollouts(model, tokenizer, prompts, G=4)
    top1 = rollouts(model, tokenizer, prompts, G=4, temperature=1.5, top_k=1, generator=torch.Generator())
    assert top1.completion_ids == greedy.completion_ids


def test_stopped_rows_emit_pad_and_completions_keep_their_stop_token():
    model, tokenizer = lora_model("llama")
    prompts = random_prompts(model)
    stops = a_stop_inside(model, tokenizer, prompts, max_new_tokens=16)
    r = rollouts(model, tokenizer, prompts, G=3, max_new_tokens=16, stops=stops, temperature=1.0,
                 generator=torch.Generator().manual_seed(0))
    assert len(r.completion_ids) == len(r.truncated) == 9
    for row, completion, truncated in zip(r.tokens.tolist(), r.completion_ids, r.truncated):
        if truncated:
            assert len(completion) == 16 and not set(completion) & set(stops)
        else:
            assert completion[-1] in stops and not set(completion[:-1]) & set(stops)
            assert row[len(completion):] == [tokenizer.pad_token_id] * (len(row) - len(completion))


def test_generation_ends_at_the_first_check_after_every_row_stopped():
    """Every row stops at its first token (all tokens are stop tokens): the loop reads the flag
    after check_every steps and ends there, well before max_new_tokens."""
    model, tokenizer = lora_model("llama")
    prompts = random_prompts(model)
    every = list(range(model.config.vocab_size))
    r = rollouts(model, tokenizer, prompts, G=2, max_new_tokens=40, stops=every, check_every=4)
    assert r.tokens.shape[1] == 4
    assert all(len(c) == 1 for c in r.completion_ids) and not any(r.truncated)


def test_shared_prefill_equals_prefilling_every_row():
    model, tokenizer = lora_model("phi3")
    prompts = random_prompts(model)
    kw = dict(G=3, temperature=1.0)
    shared = rollouts(model, tokenizer, prompts, share_prefill=True, generator=torch.Generator().manual_seed(1), **kw)
    each = rollouts(model, tokenizer, prompts, share_prefill=False, generator=torch.Generator().manual_seed(1), **kw)
    assert shared.completion_ids == each.completion_ids


@pytest.mark.parametrize("lean_decode", [False, True], ids=["transformers_forward", "lean_decode"])
def test_compacted_rows_give_the_same_tokens_and_stop_being_computed(lean_decode):
    """Greedy rows stopping at different steps: with compact_rows the decoding batch shrinks at a
    stop check (seen by the embedding's batch sizes: every forward and lean step reads it) and
    every row's tokens stay the same."""
    model, tokenizer = lora_model("llama")
    prompts = random_prompts(model, lengths=(5, 11, 3, 8))
    stops = a_stop_inside(model, tokenizer, prompts, max_new_tokens=24)
    kw = dict(G=3, max_new_tokens=24, stops=stops, check_every=2, lean_decode=lean_decode)
    full = rollouts(model, tokenizer, prompts, compact_rows=False, **kw)
    assert full.decode.startswith("lean decode" if lean_decode else "transformers' forward")
    batches = []
    hook = model.get_input_embeddings().register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    compact = rollouts(model, tokenizer, prompts, **kw)
    hook.remove()
    assert compact.completion_ids == full.completion_ids and compact.truncated == full.truncated
    assert torch.equal(compact.tokens, full.tokens[:, :compact.tokens.shape[1]])
    assert any(compact.truncated) and not all(compact.truncated)
    assert batches[0] == 4 and batches[1] == 12 and min(batches) < 12  # prefill, then shrinking decode


def _syncs_during(fn) -> list[str]:
    """Every op during fn() that would make the host wait for a GPU (tests/training/test_sync_free.py's
    aten-level and Python-level lists), by name."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    from tests.training.test_sync_free import HOST_READS, SYNCING_OPS, _bool_index

    seen = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in SYNCING_OPS or _bool_index(func, args):
                seen.append(str(func))
            return func(*args, **(kwargs or {}))

    class Reads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in HOST_READS:
                seen.append(func.__name__)
            return func(*args, **(kwargs or {}))

    with Ops(), Reads():
        fn()
    return seen


def test_decoding_reads_the_device_once_per_check_not_per_token():
    """In the training setup (the engine's packed attention): 16 more tokens at check_every=8 add
    exactly two reads (the stopped flags at two more checks), nothing per token."""
    model, tokenizer = lora_model("llama", packed=True)
    prompts = random_prompts(model)

    def run(n):
        return _syncs_during(lambda: rollouts(model, tokenizer, prompts, G=2, max_new_tokens=n, stops=[-1],
                                              temperature=1.0, generator=torch.Generator().manual_seed(0)))

    run(8)  # the lean step's probe check reads the device once per model, before its first rollout
    short, long = run(16), run(32)
    assert sorted(long) == sorted(short + ["tolist", "tolist"]), (short, long)
    assert short.count("tolist") == 1 + 2  # one check (at 8; the 16th token ends the loop) + tokens, flags


def test_training_mode_is_restored_and_nothing_keeps_a_graph():
    model, tokenizer = lora_model("llama")
    model.train()
    r = rollouts(model, tokenizer, random_prompts(model))
    assert model.training and all(m.training for m in model.modules())
    assert not r.tokens.requires_grad
    model.eval()
    rollouts(model, tokenizer, random_prompts(model))
    assert not model.training


def test_rollouts_inside_a_training_setup_equal_the_plain_models():
    """The model as engine.train leaves it, in train mode with activation checkpointing and the
    CPU speed plan applied (packed attention, compiled norms, fused and grouped LoRA), rolls out
    the greedy tokens of the same weights without any of it."""
    import copy

    from engine.model.build import enable_activation_checkpointing
    from tests.conftest import apply_speed

    model, tokenizer = lora_model("qwen2")
    prompts = random_prompts(model)
    stops = a_stop_inside(model, tokenizer, prompts)
    plain = rollouts(model, tokenizer, prompts, G=2, stops=stops)
    trained = copy.deepcopy(model)
    trained.set_attn_implementation("sdpa")
    enable_activation_checkpointing(trained)
    apply_speed(trained)
    trained.train()
    got = rollouts(trained, tokenizer, prompts, G=2, stops=stops)
    assert trained.training and got.completion_ids == plain.completion_ids


def test_bf16_autocast_runs_and_gives_tokens():
    model, tokenizer = lora_model("llama")
    r = rollouts(model, tokenizer, random_prompts(model), autocast_dtype=torch.bfloat16)
    assert len(r.completion_ids) == 6 and all(len(c) >= 1 for c in r.completion_ids)


@pytest.mark.parametrize("kw,message", [
    (dict(prompts=[]), "no prompts"),
    (dict(prompts=[[1, 2], []]), "prompt 1 has no tokens"),
    (dict(num_generations=0), "num_generations >= 1"),
    (dict(max_new_tokens=0), "max_new_tokens >= 1"),
    (dict(check_every=0), "check_every >= 1"),
    (dict(temperature=-1.0), "temperature >= 0"),
    (dict(top_p=0.0), "0 < top_p <= 1"),
    (dict(top_k=-1), "top_k >= 0"),
    (dict(stop_token_ids=[]), "stop_token_ids is empty"),
    (dict(sampler="gumbel"), "sampler must be one of"),
    (dict(merged_layout="packed"), r"merged_layout must be one of \('in_out', 'out_in', 'onednn'\).*'packed'"),
])
def test_bad_arguments_are_refused(kw, message):
    model, tokenizer = make_tiny_model("llama")
    args = dict(prompts=[[1, 2, 3]], num_generations=2, max_new_tokens=4, temperature=1.0, stop_token_ids=[0],
                pad_token_id=0, check_every=8)
    args.update(kw)
    with pytest.raises(RolloutError, match=message):
        generate_rollouts(model, args.pop("prompts"), **args)
