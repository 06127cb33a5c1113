"""Generation with base + adapter: batched, left-padded, stopping at the template's end of turn.

    python -m engine.generate --model default --adapter runs/quickstart/adapter --prompt "Hi!"
    python -m engine.generate --adapter DIR                  # interactive chat when stdin is a TTY
    echo "Hi!" | python -m engine.generate --adapter DIR     # one prompt per line otherwise

Greedy by default (reproducible); `--temperature T` (> 0) samples, with `--top-p`, `--top-k`
and `--seed`. Decoding is transformers' `model.generate` with a KV cache (our LoRALinear layers
sit inside the HF model, so nothing special is needed); tokens stream to stdout as they come.

A prompt is the conversation rendered with the tokenizer's chat template and
add_generation_prompt=True. Generation stops at EOS or at the token(s) the template closes an
assistant turn with (found by rendering a probe reply, see `stop_token_ids`), so a model whose
end-of-turn is not its EOS (Llama 3's <|eot_id|>, Phi-3's <|end|>) still stops.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from engine.cli import run_cli
from engine.data.render import resolve_template, special_token_ids
from engine.export.adapter import adapter_chat_template, load_adapter, read_adapter_config
from engine.layers.quant import QuantSpec
from engine.model.build import load_base_model, load_tokenizer, resolve_dtype
from engine.parallel.distributed import resolve_device
from engine.training import amp

_PROBE = "PROBE_REPLY_7f3a"


class GenerateError(ValueError):
    """Bad generation input (prompt file, options); the message says which."""


# ----------------------------------------------------------------------------- prompts

def chat_template(tokenizer) -> str:
    return resolve_template(tokenizer)[0]


def stop_token_ids(tokenizer, template: str | None = None) -> list[int]:
    """EOS plus the special token the chat template writes right after an assistant reply.

    Found by rendering [user, assistant=PROBE] and tokenizing what follows PROBE: if its first
    token is a special token (ChatML's <|im_end|>, Llama 3's <|eot_id|>) it ends a turn."""

    stops: list[int] = []
    eos = tokenizer.eos_token_id
    for tid in (eos if isinstance(eos, list) else [eos]):
        if tid is not None and tid not in stops:
            stops.append(int(tid))
    template = template or chat_template(tokenizer)
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": _PROBE}],
                                             chat_template=template, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render this probe: EOS only
        return stops
    tail = text[text.find(_PROBE) + len(_PROBE):] if _PROBE in text else ""
    ids = tokenizer(tail.lstrip(), add_special_tokens=False)["input_ids"] if tail.strip() else []
    if ids and ids[0] in special_token_ids(tokenizer) and ids[0] not in stops:
        stops.append(int(ids[0]))
    return stops


def render_prompt(tokenizer, messages: list[dict], template: str | None = None) -> str:
    """The conversation so far, rendered up to the assistant header that the model continues."""
    return tokenizer.apply_chat_template(messages, chat_template=template or chat_template(tokenizer),
                                         tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer, messages: list[dict], template: str | None = None, max_tokens: int | None = None) -> list[int]:
    """Token ids of `render_prompt` (the template holds the special tokens: none added). A prompt
    longer than max_tokens keeps its last max_tokens tokens (the question and the turn header)."""
    ids = tokenizer(render_prompt(tokenizer, messages, template), add_special_tokens=False)["input_ids"]
    return ids[-max_tokens:] if max_tokens else ids


# ----------------------------------------------------------------------------- decoding

def left_pad(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [B, T] padded on the left and attention_mask [B, T] (1 = real token): every row's
    last prompt token sits at column T-1, so all rows generate their next token together."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[b, T - len(p):] = 1
    return ids, mask


def cut_at_stop(tokens: list[int], stops: list[int]) -> list[int]:
    """The generated tokens before the first stop token (the stop token itself is not text)."""
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[:i]
    return tokens


@torch.no_grad()
def generate_tokens(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int = 8,
                    temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                    device: torch.device | str = "cpu", precision: str = "fp32", stops: list[int] | None = None,
                    streamer=None) -> list[list[int]]:
    """New token ids for each prompt (stop tokens and what follows cut off), in prompt order.

    Greedy when temperature == 0 (argmax, reproducible), otherwise sampling from
    softmax(logits / T) restricted to the top_k tokens (0: all) and the smallest top_p nucleus
    (Holtzman et al. 2020), from torch's RNG seeded with `seed`. Batches of `batch_size` prompts
    are left-padded; transformers derives each row's positions from the attention mask.
    """
    from transformers import GenerationConfig

    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise GenerateError("a prompt has no tokens")
    device = torch.device(device)
    stops = stops if stops is not None else stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    sample = temperature > 0
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample, eos_token_id=stops, pad_token_id=pad,
                              use_cache=True, num_beams=1,
                              **({"temperature": temperature, "top_p": top_p, "top_k": top_k} if sample else {}))
    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    try:
        for start in range(0, len(prompts), batch_size):
            ids, mask = left_pad(prompts[start:start + batch_size], pad)
            with amp.autocast(precision, device):
                generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                           generation_config=config, streamer=streamer)
            # sync: the new tokens go to the host to be decoded
            for row in generated[:, ids.shape[1]:].tolist():
                out.append(cut_at_stop(row, stops))
    finally:
        model.train(was_training)
    return out


def decode(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


# ----------------------------------------------------------------------------- loading

def adapter_training_info(adapter_dir: str | None) -> dict:
    """How the adapter was trained, as far as the files tell: {"method", "quant_type",
    "double_quant", "compute_dtype"} from `engine_adapter.json` next to the adapter, else from the
    run's config.yaml (an adapter saved by engine.train lives in <run>/adapter or
    <run>/checkpoints/step-N/adapter); {} when nothing says."""
    if not adapter_dir:
        return {}
    adapter = Path(adapter_dir)
    meta = adapter / "engine_adapter.json"
    if meta.is_file():
        try:
            return dict(json.loads(meta.read_text()))
        except json.JSONDecodeError as err:
            raise GenerateError(f"{meta}: not valid JSON ({err})") from None
    for run_config in (adapter.parent / "config.yaml", adapter.parent.parent.parent / "config.yaml"):
        if run_config.is_file():
            from omegaconf import OmegaConf
            peft = OmegaConf.to_container(OmegaConf.load(run_config)).get("peft") or {}
            return {k: peft[k] for k in ("method", "quant_type", "double_quant", "compute_dtype") if k in peft}
    return {}


def load_for_inference(model_path: str, adapter_dir: str | None, *, method: str | None = None,
                       device: str | torch.device = "auto", trust_remote_code: bool = False,
                       precision: str = "auto"):
    """(model, tokenizer, info): the base as it was trained on (4-bit for qlora, float
    otherwise) with the adapter loaded, eval mode. `method` None = what the adapter's run says.

    info = {"method", "precision", "device", ...the quantization settings}."""

    device = resolve_device(device) if isinstance(device, str) else device
    if adapter_dir is not None:
        read_adapter_config(adapter_dir)  # a missing / malformed adapter fails before the slow load
    info = {"method": "lora", "quant_type": "nf4", "double_quant": True, "compute_dtype": "auto",
            **adapter_training_info(adapter_dir)}
    if method is not None:
        info["method"] = method
    if info["method"] not in ("lora", "qlora"):
        raise GenerateError(f"method must be lora or qlora, got {info['method']!r}")
    precision = amp.resolve_precision(precision, device)
    compute = amp.DTYPES[precision]
    quant = None
    if info["method"] == "qlora":
        quant = QuantSpec(info["quant_type"], bool(info["double_quant"]),
                          compute if info["compute_dtype"] == "auto" else amp.DTYPES[info["compute_dtype"]])
    model = load_base_model(model_path, dtype=resolve_dtype("auto", device, compute), device=device, quant=quant,
                            trust_remote_code=trust_remote_code)
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
    tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
    trained_template = adapter_chat_template(adapter_dir)  # data.chat_template of the run
    if trained_template is not None:
        tokenizer.chat_template = trained_template
    info.update(precision=precision, device=str(device))
    return model.eval(), tokenizer, info


# ----------------------------------------------------------------------------- CLI

def _prompts_from_file(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise GenerateError(f"prompt file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        prompts = [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise GenerateError(f"prompt file {path!r} holds no prompt (one per line)")
    return prompts


def _answer(model, tokenizer, messages: list[dict], args, device, precision, stops, stream: bool) -> str:
    from transformers import TextStreamer

    ids = encode_prompt(tokenizer, messages)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    tokens = generate_tokens(model, tokenizer, [ids], max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                             device=device, precision=precision, stops=stops, streamer=streamer)[0]
    return decode(tokenizer, tokens)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m engine.generate", description="Chat with a base model + LoRA adapter.")
    p.add_argument("--model", default="default", help="HF model dir, .gguf file, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", default=None, help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--method", choices=("lora", "qlora"), default=None,
                   help="base as trained: float (lora) or 4-bit (qlora); default: what the adapter's run says")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="one user message")
    src.add_argument("--prompt-file", default=None, help="a text file, one user message per line")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                   help="auto: bf16 on a GPU or CPU that has it, fp16 on older GPUs, fp32 elsewhere")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be >= 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        p.error("need --temperature >= 0, 0 < --top-p <= 1, --top-k >= 0")
    return args


def main(argv: list[str] | None = None) -> int:

    args = parse_args(argv)

    def body() -> int:
        prompts = ([args.prompt] if args.prompt is not None
                   else _prompts_from_file(args.prompt_file) if args.prompt_file else None)
        model, tokenizer, info = load_for_inference(args.model, args.adapter, method=args.method, device=args.device,
                                                    precision=args.precision)
        device, precision = torch.device(info["device"]), info["precision"]
        stops = stop_token_ids(tokenizer)
        system = [{"role": "system", "content": args.system}] if args.system else []
        if prompts is None and sys.stdin.isatty():
            return _repl(model, tokenizer, args, device, precision, stops, system)
        if prompts is None:
            prompts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
        for i, prompt in enumerate(prompts):
            if len(prompts) > 1:
                print(f"### {prompt}", flush=True)
            _answer(model, tokenizer, system + [{"role": "user", "content": prompt}], args, device, precision,
                    stops, stream=True)
            if i + 1 < len(prompts):
                print(flush=True)
        return 0

    return run_cli(body)


def _repl(model, tokenizer, args, device, precision, stops, system: list[dict]) -> int:
    """Multi-turn chat: the conversation grows turn by turn; /reset forgets it, /quit or Ctrl-D ends."""
    print("chat with the model: /reset clears the conversation, /quit (or Ctrl-D) leaves", file=sys.stderr)
    messages = list(system)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        if line.strip() in ("/quit", "/exit"):
            return 0
        if line.strip() == "/reset":
            messages = list(system)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        reply = _answer(model, tokenizer, messages, args, device, precision, stops, stream=True)
        messages.append({"role": "assistant", "content": reply})


if __name__ == "__main__":
    sys.exit(main())
