"""Generation: stop tokens from the template, left padding, cached batched greedy decoding equal to
a plain argmax loop, seeded sampling, adapters on/off, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from engine.generate import (adapter_training_info, cut_at_stop, decode, encode_prompt, generate_tokens, left_pad,
                             main, stop_token_ids)
from engine.layers.lora import adapters_disabled, lora_modules
from engine.layers.inject import inject_lora
from tests.conftest import make_tiny_model, make_tiny_model_dir


@pytest.fixture(scope="module")
def lora_model():
    model, tokenizer = make_tiny_model("llama")
    torch.manual_seed(1)
    inject_lora(model, "all-linear", r=4, alpha=8)
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.3)
    return model.eval(), tokenizer


def prompts(tokenizer):
    chats = [[{"role": "user", "content": "hello"}],
             [{"role": "system", "content": "You are a helpful assistant."},
              {"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
             [{"role": "user", "content": "fox"}]]
    return [encode_prompt(tokenizer, c) for c in chats]


def test_stop_tokens_include_the_templates_end_of_turn(tiny_tokenizer):
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(tiny_tokenizer) == [im_end]  # eos is already the end-of-turn token
    # a template whose end of turn is another special token than eos (Llama 3 / Phi-3 style)
    tiny_tokenizer.eos_token = "<|endoftext|>"
    stops = stop_token_ids(tiny_tokenizer)
    assert stops == [tiny_tokenizer.convert_tokens_to_ids("<|endoftext|>"), im_end]


def test_prompt_ends_with_the_assistant_header(tiny_tokenizer):
    ids = encode_prompt(tiny_tokenizer, [{"role": "user", "content": "hi"}])
    assert tiny_tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    assert encode_prompt(tiny_tokenizer, [{"role": "user", "content": "hi"}], max_tokens=3) == ids[-3:]


def test_left_pad_and_cut():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_token_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert cut_at_stop([5, 6, 9, 7], [9]) == [5, 6]
    assert cut_at_stop([5, 6], [9]) == [5, 6]


@torch.no_grad()
def argmax_loop(model, prompt: list[int], n: int, stops: list[int]) -> list[int]:
    """Reference decoder: one full forward per token, no cache, no padding."""
    ids = list(prompt)
    for _ in range(n):
        nxt = int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax())
        if nxt in stops:
            break
        ids.append(nxt)
    return ids[len(prompt):]


def test_batched_cached_greedy_equals_argmax_loop(lora_model):
    model, tokenizer = lora_model
    ps = prompts(tokenizer)
    stops = stop_token_ids(tokenizer)
    batched = generate_tokens(model, tokenizer, ps, max_new_tokens=10, batch_size=3)
    assert batched == [argmax_loop(model, p, 10, stops) for p in ps]
    assert generate_tokens(model, tokenizer, ps, max_new_tokens=10, batch_size=1) == batched
    assert all(len(t) > 0 for t in batched)


def test_stops_at_end_of_turn(lora_model):
    """From the 4th forward on, <|im_end|> is the argmax: every row stops after 3 tokens, and
    those are the tokens it generates without the hook."""
    model, tokenizer = lora_model
    eos, ps = tokenizer.eos_token_id, prompts(tokenizer)[:2]
    free = generate_tokens(model, tokenizer, ps, max_new_tokens=8)
    calls = []

    def force_eos(module, args, output):
        calls.append(1)
        if len(calls) >= 4:
            output = output.clone()
            output[..., eos] = 1e4
        return output

    handle = model.lm_head.register_forward_hook(force_eos)
    try:
        stopped = generate_tokens(model, tokenizer, ps, max_new_tokens=8)
    finally:
        handle.remove()
    assert stopped == [f[:3] for f in free] and all(len(f) > 3 for f in free)


def test_adapters_disabled_generates_the_base_models_tokens(lora_model):
    model, tokenizer = lora_model
    base, _ = make_tiny_model("llama")
    ps = prompts(tokenizer)
    with adapters_disabled(model):
        off = generate_tokens(model, tokenizer, ps, max_new_tokens=8)
    assert off == generate_tokens(base, tokenizer, ps, max_new_tokens=8)
    assert off != generate_tokens(model, tokenizer, ps, max_new_tokens=8)


def test_sampling_is_seeded(lora_model):
    model, tokenizer = lora_model
    ps = prompts(tokenizer)
    kw = dict(max_new_tokens=12, temperature=1.5, top_k=50, top_p=0.95)
    a = generate_tokens(model, tokenizer, ps, seed=3, **kw)
    assert a == generate_tokens(model, tokenizer, ps, seed=3, **kw)
    assert a != generate_tokens(model, tokenizer, ps, seed=4, **kw)


def test_adapter_training_info_reads_the_run_config(tmp_path):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text("peft:\n  method: qlora\n  quant_type: fp4\n  double_quant: false\n  r: 4\n")
    assert adapter_training_info(str(run / "adapter")) == {"method": "qlora", "quant_type": "fp4", "double_quant": False}
    (run / "adapter" / "engine_adapter.json").write_text(json.dumps({"method": "lora"}))
    assert adapter_training_info(str(run / "adapter")) == {"method": "lora"}
    assert adapter_training_info(str(tmp_path / "elsewhere")) == {}


def test_cli_prompt_streams_the_answer(tmp_path, capsys):
    from engine.export.adapter import save_adapter
    from engine.config import PeftConfig
    from engine.model.build import load_base_model, load_tokenizer

    model_dir = make_tiny_model_dir(tmp_path, "llama")
    model, tokenizer = load_base_model(str(model_dir)), load_tokenizer(str(model_dir))
    torch.manual_seed(0)
    inject_lora(model, "all-linear", 4, 8)
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.3)
    save_adapter(model, str(tmp_path / "adapter"), PeftConfig(r=4, alpha=8), str(model_dir))
    capsys.readouterr()
    assert main(["--model", str(model_dir), "--adapter", str(tmp_path / "adapter"), "--prompt", "hello",
                 "--max-new-tokens", "8", "--precision", "fp32"]) == 0
    out = capsys.readouterr().out
    expected = decode(tokenizer, generate_tokens(model, tokenizer, [encode_prompt(
        tokenizer, [{"role": "user", "content": "hello"}])], max_new_tokens=8)[0])
    assert expected and expected in out


def test_cli_bad_inputs(tmp_path, capsys):
    model_dir = make_tiny_model_dir(tmp_path, "llama")
    capsys.readouterr()
    assert main(["--model", str(model_dir), "--adapter", str(tmp_path / "missing"), "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing" in err and "does not exist" in err and "Traceback" not in err
    assert main(["--model", str(model_dir), "--prompt-file", str(tmp_path / "none.txt")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none.txt" in err
