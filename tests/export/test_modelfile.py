"""The Ollama Modelfile: its Go TEMPLATE, rendered for a conversation (tests/export/gotemplate.py,
the subset of Go's text/template the writer emits), equals the tokenizer's Jinja chat template's
rendering for ChatML (SmolLM2's, with its default system prompt), Llama 3, Phi-3, Gemma and Mistral
(v0.2); PARAMETER stop names the end-of-turn tokens; SYSTEM is the run's prompt or the template's default."""

from __future__ import annotations

import re

import pytest

from engine.export.modelfile import modelfile_text, ollama_template
from tests.conftest import make_tiny_tokenizer
from tests.export.gotemplate import render

# the chat templates as the models ship them (tokenizer_config.json)
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
           "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
           "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
           "{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
          "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
PHI3 = ("{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
        "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif "
        "message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
         "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
         "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
         "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == "
           "'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles "
           "are supported!') }}{% endif %}{% endfor %}")
# family: (Jinja template, end-of-turn token, EOS, system role)
CASES = {"chatml": (SMOLLM2, "<|im_end|>", "<|im_end|>", True),
         "llama3": (LLAMA3, "<|eot_id|>", "<|end_of_text|>", True),
         "phi3": (PHI3, "<|end|>", "<|endoftext|>", True),
         "gemma": (GEMMA, "<end_of_turn>", "<eos>", False),
         "mistral": (MISTRAL, "</s>", "</s>", False)}
CHAT = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3 + 3?"}]


def family_tokenizer(family: str):
    template, end_of_turn, eos, _ = CASES[family]
    tokenizer = make_tiny_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "<bos_x>", "eos_token": eos,
                                  "additional_special_tokens": sorted({end_of_turn, eos})})
    tokenizer.chat_template = template
    return tokenizer


def parse(text: str) -> dict:
    blocks = dict(re.findall(r'^(TEMPLATE|SYSTEM) """(.*?)"""$', text, re.S | re.M))
    return {"from": re.search(r"^FROM (.*)$", text, re.M).group(1), **blocks,
            "stop": re.findall(r'^PARAMETER stop "(.*)"$', text, re.M)}


def ollama_render(modelfile: dict, messages: list[dict]) -> str:
    """What Ollama renders: SYSTEM first when the conversation brings no system message."""
    if "SYSTEM" in modelfile and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": modelfile["SYSTEM"]}] + messages
    return render(modelfile["TEMPLATE"], messages)


@pytest.mark.parametrize("family", list(CASES))
def test_template_renders_as_the_tokenizer_does(family):
    tokenizer = family_tokenizer(family)
    assert ollama_template(tokenizer.chat_template).family == family
    modelfile = parse(modelfile_text(["model-q4_k_m.gguf", "model-q8_0.gguf"], tokenizer))
    assert modelfile["from"] == "./model-q4_k_m.gguf"
    conversations = [CHAT, CHAT[:1]]
    if CASES[family][3]:
        conversations.append([{"role": "system", "content": "You answer in one word."}] + CHAT)
    for chat in conversations:
        expected = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        expected = expected.removeprefix(tokenizer.bos_token)  # llama.cpp adds BOS when it tokenizes
        assert ollama_render(modelfile, chat) == expected, family
    _, end_of_turn, eos, _ = CASES[family]
    assert set(modelfile["stop"]) == {end_of_turn, eos}


def test_default_and_run_system_prompts():
    tokenizer = family_tokenizer("chatml")
    default = parse(modelfile_text(["m.gguf"], tokenizer))
    assert default["SYSTEM"] == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    mine = parse(modelfile_text(["m.gguf"], tokenizer, system='Reply in "JSON".'))
    assert mine["SYSTEM"] == 'Reply in "JSON".'
    assert ollama_render(mine, CHAT).startswith('<|im_start|>system\nReply in "JSON".<|im_end|>\n<|im_start|>user\n')
    llama = parse(modelfile_text(["m.gguf"], family_tokenizer("llama3")))
    assert "SYSTEM" not in llama  # Llama 3's template adds none


def test_unknown_template_and_no_gguf():
    tokenizer = make_tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    text = modelfile_text([], tokenizer)
    assert "FROM .\n" in text and "\nTEMPLATE " not in text and "# TEMPLATE: this chat template is none of" in text
    assert parse(text)["stop"] == ["<|im_end|>"]


def test_renderer_rejects_what_it_does_not_know():
    with pytest.raises(ValueError, match="unsupported action"):
        render("{{ .Prompt }}", CHAT)
    assert render("{{- range .Messages }} {{ .Role }} {{- end }}", CHAT) == " user assistant user"


def test_training_system_prompt_from_the_run(tmp_path):
    """The system message every training conversation starts with (the quickstart's), found through
    the run's config.yaml beside the adapter or above a checkpoint's; none when they differ or lack one."""
    import json

    from engine.export.modelfile import training_system_prompt

    def run(name: str, systems: list[str | None]) -> object:
        root = tmp_path / name
        (root / "checkpoints" / "step-2" / "adapter").mkdir(parents=True)
        (root / "adapter").mkdir()
        with open(root / "train.jsonl", "w") as f:
            for system in systems:
                messages = ([{"role": "system", "content": system}] if system else []) + CHAT[:2]
                f.write(json.dumps({"messages": messages}) + "\n")
        (root / "config.yaml").write_text(f"data:\n  train_path: {root / 'train.jsonl'}\n  format: auto\n")
        return root

    same = run("same", ["Reply in JSON.", "Reply in JSON."])
    assert training_system_prompt(same / "adapter") == "Reply in JSON."
    assert training_system_prompt(same / "checkpoints" / "step-2" / "adapter") == "Reply in JSON."
    assert training_system_prompt(run("differ", ["A.", "B."]) / "adapter") is None
    assert training_system_prompt(run("mixed", ["A.", None]) / "adapter") is None
    assert training_system_prompt(run("none", [None, None]) / "adapter") is None
    assert training_system_prompt(tmp_path / "elsewhere" / "adapter") is None


def test_system_prompt_with_triple_quotes(tmp_path):
    """A Modelfile block cannot hold \"\"\": a run's prompt with one is left out with a comment; an
    explicit --system with one is refused before anything is merged."""
    from engine.export.merge import merge, MergeError

    text = modelfile_text(["m.gguf"], family_tokenizer("llama3"), system='Say """hi"""')
    assert "\nSYSTEM" not in text and '# SYSTEM: the system prompt holds """' in text
    with pytest.raises(MergeError, match='--system: the system prompt holds """'):
        merge("default", str(tmp_path / "adapter"), str(tmp_path / "out"), gguf="q4_k_m", system='a """ b')
    assert not (tmp_path / "out").exists()
