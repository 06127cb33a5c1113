"""An Ollama Modelfile beside the exported GGUF: FROM, the chat template, stop tokens, system prompt.

    ollama create my-model -f merged/Modelfile && ollama run my-model

Ollama renders prompts with Go templates, not the tokenizer's Jinja chat template, so the template
is written for the family the tokenizer's template belongs to (found by its markers):

  family   marker in the Jinja template    Ollama TEMPLATE (per message, then the assistant header)
  chatml   <|im_start|>                    <|im_start|>{role}\\n{content}<|im_end|>\\n     (Qwen, SmolLM2)
  llama3   <|start_header_id|>             <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>
  phi3     <|user|> ... <|end|>            <|{role}|>\\n{content}<|end|>\\n
  gemma    <start_of_turn>                 <start_of_turn>{user|model}\\n{content}<end_of_turn>\\n  (system as user)
  mistral  [INST]                          [INST] {user} [/INST]{assistant}</s>            (no system role)

BOS is not in the template: llama.cpp adds it when it tokenizes (tokenizer.ggml.add_bos_token).
A template that adds a system prompt when the conversation has none (SmolLM2's, Qwen's) gets it as
SYSTEM, which Ollama puts first in such conversations; a system prompt given here replaces it
(merge's --system, else the system message all the run's training conversations start with). PARAMETER stop: the end-of-turn tokens engine.generate stops at (EOS and the
token the template closes an assistant reply with). Another template: no TEMPLATE line (Ollama then
uses the GGUF's tokenizer.chat_template where it knows it) and a comment saying so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.data import load_examples
from engine.generate import chat_template, stop_token_ids


@dataclass(frozen=True)
class OllamaTemplate:
    family: str
    markers: tuple[str, ...]   # all in the Jinja template
    template: str              # Go template over .Messages (.Role, .Content)
    system_open: str | None    # how the Jinja template opens a system turn (None: no system role)
    system_close: str | None


TEMPLATES = (
    OllamaTemplate("chatml", ("<|im_start|>",),
                   "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
                   "{{ end }}<|im_start|>assistant\n",
                   "<|im_start|>system\n", "<|im_end|>"),
    OllamaTemplate("llama3", ("<|start_header_id|>",),
                   "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
                   "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
                   "<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"),
    OllamaTemplate("phi3", ("<|user|>", "<|end|>"),
                   "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
                   "<|system|>\n", "<|end|>"),
    OllamaTemplate("gemma", ("<start_of_turn>",),
                   "{{- range .Messages }}<start_of_turn>{{ if eq .Role \"assistant\" }}model{{ else }}user{{ end }}\n"
                   "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n",
                   None, None),
    OllamaTemplate("mistral", ("[INST]",),
                   "{{- range .Messages }}{{ if eq .Role \"user\" }}[INST] {{ .Content }} [/INST]"
                   "{{ else if eq .Role \"assistant\" }}{{ .Content }}</s>{{ end }}{{ end }}",
                   None, None),
)


def ollama_template(jinja: str | None) -> OllamaTemplate | None:
    """The Ollama template of the family whose markers the tokenizer's chat template holds."""
    for candidate in TEMPLATES:
        if jinja and all(marker in jinja for marker in candidate.markers):
            return candidate
    return None


def default_system_prompt(tokenizer, template: OllamaTemplate) -> str | None:
    """The system prompt the Jinja template inserts into a conversation that has none."""
    if template.system_open is None:
        return None
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=chat_template(tokenizer),
                                         tokenize=False)
    start = text.find(template.system_open)
    if start < 0:
        return None
    start += len(template.system_open)
    end = text.find(template.system_close, start)
    return text[start:end] if end > start else None


def training_system_prompt(adapter_dir: str | Path) -> str | None:
    """The system message every training conversation of the adapter's run starts with (the run's
    config.yaml beside the adapter, or three levels up for a checkpoint's, names data.train_path);
    None when they do not share one, or the run or its data cannot be found."""
    adapter = Path(adapter_dir)
    for run_config in (adapter.parent / "config.yaml", adapter.parent.parent.parent / "config.yaml"):
        if run_config.is_file():
            from omegaconf import OmegaConf
            data = OmegaConf.to_container(OmegaConf.load(run_config)).get("data") or {}
            path = data.get("train_path")
            if not path or not Path(path).is_file():
                return None
            firsts = {_first_system(ex) for ex in load_examples(path, data.get("format", "auto"), on_bad_line="skip")}
            return firsts.pop() if len(firsts) == 1 else None  # {None}: no system messages
    return None


def _first_system(example: dict) -> str | None:
    messages = example.get("messages") or []
    return messages[0]["content"] if messages and messages[0]["role"] == "system" else None


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _block(text: str) -> str:
    return f'"""{text}"""'


def check_system_prompt(system: str | None) -> None:
    """A SYSTEM block ends at the first \"\"\": such a prompt cannot be written (Ollama has no escape)."""
    if system and '"""' in system:
        raise ValueError(f'the system prompt holds """, which ends a Modelfile block: {system[:80]!r}')


def modelfile_text(gguf_files: list[str], tokenizer, system: str | None = None) -> str:
    """The Modelfile for `gguf_files` (FROM the first; the others as commented alternatives; none:
    FROM the directory, Ollama's safetensors import)."""
    lines = ["# Ollama: ollama create NAME -f Modelfile  (then: ollama run NAME)"]
    lines.append(f"FROM ./{gguf_files[0]}" if gguf_files else "FROM .")
    lines += [f"# FROM ./{other}" for other in gguf_files[1:]]
    template = ollama_template(chat_template(tokenizer))
    if template is None:
        lines.append("# TEMPLATE: this chat template is none of chatml, llama3, phi3, gemma, mistral; Ollama uses the "
                     "GGUF's tokenizer.chat_template where it recognises it")
    else:
        # Mistral's template closes a reply with the EOS token's text (</s>)
        text = template.template.replace("</s>", tokenizer.eos_token or "</s>")
        lines.append(f"TEMPLATE {_block(text)}")
        system = system if system is not None else default_system_prompt(tokenizer, template)
    if system and '"""' in system:
        lines.append('# SYSTEM: the system prompt holds """, which a Modelfile block cannot; set it in Ollama instead')
    elif system:
        lines.append(f"SYSTEM {_block(system)}")
    tokens = tokenizer.convert_ids_to_tokens(stop_token_ids(tokenizer))
    lines += [f"PARAMETER stop {_quoted(token)}" for token in dict.fromkeys(tokens) if token]
    return "\n".join(lines) + "\n"


def write_modelfile(directory: str | Path, gguf_files: list[str], tokenizer, system: str | None = None) -> Path:
    path = Path(directory) / "Modelfile"
    path.write_text(modelfile_text(gguf_files, tokenizer, system))
    return path
