"""The planner's GRPO terms (engine/plan/grpo.py): the rollout's KV cache exactly as
generate_rollouts allocates it, the rollout's live bytes measured on CPU against the prediction,
what each moment depends on, the report and its errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engine.grpo.rollout import RolloutCache, generate_rollouts
from engine.layers.decode_merge import decode_copy_bytes
from engine.layers.inject import inject_lora
from engine.plan import GIB, LiveBytes, PlanError, known_config
from engine.plan.grpo import format_grpo, grpo_plan_args, kv_cache_bytes, predict_grpo, training_rows
from engine.plan.report import _qlora
from tests.conftest import make_tiny_model, use_packed_attention

CPU_FP32 = dict(method="lora", precision="fp32", base_dtype="fp32", cuda=False, optimizer="adamw",
                activation_checkpointing=False, chunked_loss=True)


def test_kv_cache_term_is_the_bytes_the_rollout_cache_allocates():
    model, _ = make_tiny_model("qwen2")
    P, G, T, L = 3, 4, 7, 5
    cache = RolloutCache(model.config.num_hidden_layers, T)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 100, (P, T)), cache=cache, use_cache=True)
    assert sum(layer._k.nbytes + layer._v.nbytes for layer in cache.layers) == kv_cache_bytes(model.config, P, T, 4)
    cache.repeat_rows(G, T + L)
    assert sum(layer._k.nbytes + layer._v.nbytes for layer in cache.layers) == \
        kv_cache_bytes(model.config, P * G, T + L, 4)


@pytest.mark.parametrize("top_p,share,lean", [(1.0, True, False), (0.9, True, False), (1.0, False, False),
                                              (1.0, True, True), (0.9, False, True)])
def test_rollout_prediction_bounds_the_measured_live_bytes(top_p, share, lean):
    """generate_rollouts on a tiny Llama under a live-bytes tracker: the predicted rollout bytes
    (the decode copies + KV + the larger of prefill and decoding transients) cover the measured
    peak, within 1.5x; the decode copies' term is exactly what the rollout builds (the merged LoRA
    copies, or the lean step's: every block linear and the transposed lm_head)."""
    from engine.model.lean_decode import LeanDecoder

    model, tokenizer = make_tiny_model("llama", hidden_size=128, intermediate_size=256, num_attention_heads=8,
                                       num_key_value_heads=2, num_hidden_layers=4)
    model.set_attn_implementation("sdpa")  # as engine.train runs it (eager attention keeps [T, T] scores)
    use_packed_attention(model)
    torch.manual_seed(0)
    inject_lora(model, "all-linear", r=4, alpha=8)
    P, G, T, L = 2, 8, 48, 16
    prompts = [torch.randint(3, model.config.vocab_size, (T - i,)).tolist() for i in range(P)]
    tracker = LiveBytes()
    tracker.exclude([p for p in model.parameters()] + [b for b in model.buffers()])
    with tracker:
        out = generate_rollouts(model, prompts, num_generations=G, max_new_tokens=L, temperature=1.0, top_p=top_p,
                                stop_token_ids=[-1], pad_token_id=tokenizer.pad_token_id, share_prefill=share,
                                generator=torch.Generator().manual_seed(0), lean_decode=lean)
    assert out.decode.startswith("lean decode" if lean else "transformers' forward")
    b = predict_grpo(model.config, prompts_per_step=P, num_generations=G, max_completion_length=L, seq_len=T + L,
                     micro_batch=1, top_p=top_p, share_prefill=share, rollout_lean_decode=lean, **CPU_FP32)
    assert b.kv_cache == kv_cache_bytes(model.config, P * G, T + L, 4)
    with torch.no_grad():
        copies = LeanDecoder.build(model, torch.float32, "in_out", False).bytes if lean else decode_copy_bytes(model)
    assert b.decode_weights == copies > 0
    predicted = b.decode_weights + b.rollout_dynamic
    assert tracker.peak <= predicted <= 1.5 * tracker.peak, (tracker.peak, b.as_dict())
    if lean:
        return
    unmerged = predict_grpo(model.config, prompts_per_step=P, num_generations=G, max_completion_length=L,
                            seq_len=T + L, micro_batch=1, top_p=top_p, share_prefill=share, rollout_merge=False,
                            **CPU_FP32)
    assert unmerged.decode_weights == 0 and unmerged.rollout == b.rollout - b.decode_weights


def test_decode_copies_are_the_targeted_weights_and_4bit_bases_get_one_only_when_dequantized():
    config = known_config("smollm2-135m")
    kw = dict(prompts_per_step=2, num_generations=4, max_completion_length=64, seq_len=512, micro_batch=1)
    lora = predict_grpo(config, **kw, **{**CPU_FP32, "targets": "all-linear"})
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    assert lora.decode_weights == 4 * layers * (2 * h * h + 2 * h * kv + 3 * h * i)
    only_q = predict_grpo(config, **kw, **{**CPU_FP32, "targets": ["q_proj"]})
    assert only_q.decode_weights == 4 * layers * h * h
    qlora = {**CPU_FP32, "method": "qlora"}
    assert predict_grpo(config, **kw, **qlora).decode_weights == 0
    assert predict_grpo(config, **kw, **qlora, rollout_dequantize=True).decode_weights == lora.decode_weights
    # the lean step's copies: every block linear whatever the targets, and the transposed lm_head (a CPU)
    head = 4 * config.vocab_size * h
    lean = predict_grpo(config, **kw, **{**CPU_FP32, "targets": ["q_proj"]}, rollout_lean_decode=True)
    assert lean.decode_weights == lora.decode_weights + head
    assert predict_grpo(config, **kw, **qlora, rollout_lean_decode=True).decode_weights == head


def test_moments_scale_with_what_they_hold():
    llama = known_config("llama-3.1-8b")
    settings = _qlora(activation_checkpointing=True, chunked_loss=True)
    base = dict(prompts_per_step=4, num_generations=8, max_completion_length=512, seq_len=1024, micro_batch=1)
    b = predict_grpo(llama, **base, **settings)
    # 32 rows x 1024 tokens x 32 layers x 2 x 8 KV heads x 128 x fp16
    assert b.kv_cache == 32 * 1024 * 32 * 2 * 8 * 128 * 2 and b.rows == 32 and b.prompt_len == 512
    assert predict_grpo(llama, **{**base, "num_generations": 16}, **settings).kv_cache == 2 * b.kv_cache
    assert predict_grpo(llama, **base, prompt_len=128, **settings).kv_cache == b.kv_cache * (128 + 512) // 1024
    assert b.reference == 0 and b.peak_phase == "rollout"
    with_ref = predict_grpo(llama, **base, beta=0.04, **settings)
    assert with_ref.reference > with_ref.static and with_ref.rollout == b.rollout
    # the training step is the SFT step over the packed rows: micro-batch rows of seq_len tokens
    small = predict_grpo(llama, **{**base, "prompts_per_step": 1, "num_generations": 2, "max_completion_length": 16},
                         prompt_len=16, **settings)
    assert small.peak_phase == "training step" and small.total > small.training_total * 0.99
    no_share = predict_grpo(llama, **base, share_prefill=False, **settings)
    assert no_share.prefill_kv == 0 and no_share.prefill_transient > b.prefill_transient


def test_shared_prompts_fill_fewer_training_rows():
    """One prompt of 100 tokens x 8 completions of 16 in rows of 1,024: unshared, 8 documents of 116
    tokens fill up to 2 rows; shared, one tree document of 228 tokens fills one."""
    llama = known_config("llama-3.1-8b")
    args = dict(prompts_per_step=1, num_generations=8, max_completion_length=16, seq_len=1024, micro_batch=4,
                prompt_len=100, **_qlora())
    assert training_rows(1, 8, 100, 16, 1024, share_prompt=False) == 2
    assert training_rows(1, 8, 100, 16, 1024, share_prompt=True) == 1
    shared, unshared = (predict_grpo(llama, **args, share_prompt=s) for s in (True, False))
    assert shared.training_total < unshared.training_total
    # a group longer than a row (100 + 8 x 16 > 164): two parts of 4 completions, each with the prompt
    assert training_rows(2, 8, 100, 16, 164, share_prompt=True) == 4
    assert training_rows(2, 8, 100, 16, 164, share_prompt=False) == 16


@pytest.mark.parametrize("kw,message", [
    (dict(max_completion_length=1024), "leaves no room for a prompt"),
    (dict(num_generations=0), "objective.num_generations: must be an integer >= 1"),
    (dict(prompts_per_step=0), "objective.prompts_per_step"),
])
def test_bad_grpo_settings_are_refused(kw, message):
    args = dict(prompts_per_step=2, num_generations=4, max_completion_length=256, seq_len=1024, micro_batch=1)
    args.update(kw)
    with pytest.raises(PlanError, match=message):
        predict_grpo(known_config("smollm2-135m"), **args, **CPU_FP32)


def test_plan_args_come_from_the_objective_config_and_the_report_prints_them():
    assert grpo_plan_args(SimpleNamespace(name="sft")) is None
    objective = SimpleNamespace(name="grpo", prompts_per_step=4, num_generations=8, max_completion_length=256,
                                beta=0.0, num_iterations=1, temperature=1.0, top_p=1.0, top_k=0)
    args = grpo_plan_args(objective)
    assert args["num_generations"] == 8 and args["prompts_per_step"] == 4
    with pytest.raises(PlanError, match="lacks \\['num_generations'"):
        grpo_plan_args(SimpleNamespace(name="grpo", prompts_per_step=4))
    b = predict_grpo(known_config("smollm2-135m"), seq_len=1024, micro_batch=2, **args,
                     **_qlora(method="lora", activation_checkpointing=True, chunked_loss=True))
    text = format_grpo(b, int(14.7 * GIB), 4)
    assert "4 prompts x 8 completions per step" in text and "32 rows x (768 prompt + 256 completion)" in text
    assert "fits in the budget of 14.70 GiB" in text


def test_run_plan_adds_the_grpo_moments_for_objective_grpo(monkeypatch, capsys):
    """run_plan reads the GRPO keys from the config's objective section (their dataclass lives in
    engine/config.py; here a stand-in objective with the same names)."""
    from engine.plan import report as plan_report

    real = plan_report.from_dict

    def with_grpo(raw):
        cfg = real(raw)
        cfg.objective = SimpleNamespace(name="grpo", prompts_per_step=2, num_generations=4, max_completion_length=128,
                                        beta=0.04, num_iterations=1, temperature=1.0, top_p=1.0, top_k=0)
        return cfg

    monkeypatch.setattr(plan_report, "from_dict", with_grpo)
    report = plan_report.run_plan({"model": {"path": "shape:smollm2-135m"}, "data": {"max_seq_len": 512}})
    assert report["grpo"]["rows"] == 8 and report["grpo"]["prompt_len"] == 384 and report["grpo"]["reference"] > 0
    assert "GRPO step peak" in capsys.readouterr().out
