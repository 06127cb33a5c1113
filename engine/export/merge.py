"""Fold a LoRA adapter into its base and export a plain Hugging Face model (and optionally a GGUF).

    python -m engine.export.merge --model default --adapter runs/quickstart/adapter --out merged/ [--gguf q4_k_m,q8_0]

    W_merged = W + s * B @ A          (s = alpha / r, or alpha / sqrt(r) with rsLoRA; Hu et al. 2021)

How. A safetensors checkpoint is merged *streamed*, tensor by tensor (engine/export/stream_merge.py):
host memory is about one weight in fp32 plus the adapter, whatever the model's size. A GGUF base,
.bin weights, or a checkpoint whose tensors transformers fuses on load are loaded whole (fp32)
and merged in memory. The output dtype is the base's unless --dtype says otherwise.

Which W (FIELD.md bug 7, transformers #31293). A QLoRA adapter was trained on top of
W_hat = dequantize(quantize_nf4(W)), not W. Two choices:
  * default: W is the *original 16-bit* weight, read again from disk tensor by tensor (for a
    GGUF base: the GGUF's tensors as transformers dequantizes them). The merged model is a clean
    16-bit model, but the adapter never saw W - W_hat, so it is not exactly what was trained.
  * --from-dequantized: W = W_hat. Exactly the trained function up to the output dtype's
    rounding, but the merged weights keep the 4-bit quantization error.
Drift (--drift auto|on|off; auto = when the fp32 model fits in a quarter of the available
memory, since the check loads it whole): how far the merged model (loaded back from the written
files with plain `AutoModelForCausalLM.from_pretrained`) and the GGUF (through transformers' GGUF
reader) drift from base + adapter *as trained* (4-bit base + LoRA for QLoRA): mean KL(p_trained ||
p_merged) per position and the max |logit difference|, over --drift-examples or a few built-in
chats; printed and saved as merge_report.json.

The output directory holds config.json, model.safetensors (or shards + index beyond
--max-shard-size), the tokenizer files and generation_config.json (stopping at the chat
template's end of turn), and with --gguf one model-<type>.gguf per type (one merge, each file
streamed from the merged shards) and an Ollama Modelfile beside them (engine/export/modelfile.py;
--ollama writes it without a GGUF, FROM the merged directory). It must not exist or be empty:
nothing is ever overwritten (the files are written into a temporary sibling directory and moved
into place at the end).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from engine.cli import run_cli
from engine.data import load_examples
from engine.export.adapter import adapter_chat_template, load_adapter, read_adapter_config
from engine.export.gguf import check_gguf_type, DRIFT_TOLERANCE, export_gguf_dir, GGUF_TYPES
from engine.export.gguf_arch import FAMILIES
from engine.export.modelfile import check_system_prompt, training_system_prompt, write_modelfile
from engine.export.stream_merge import stream_merge, stream_refusal
from engine.generate import adapter_training_info, chat_template, stop_token_ids
from engine.layers.lora import lora_modules, merge_lora
from engine.layers.quant import QuantSpec
from engine.model.build import _resolve, linear_to_conv1d, load_base_model, load_tokenizer, NeedsConversion

GGUF_CHOICES = GGUF_TYPES
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DRIFT_CHATS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "Write a haiku about the sea."},
     {"role": "assistant", "content": "Waves fold into foam, salt wind carries gull voices, the tide keeps its time."}],
    [{"role": "user", "content": "Add 17 and 25, then explain the steps."},
     {"role": "assistant", "content": "17 + 25 = 42: 7 + 5 = 12, write 2 carry 1; 1 + 2 + 1 = 4."}],
    [{"role": "user", "content": "Translate 'good morning' to German and Spanish."},
     {"role": "assistant", "content": "German: Guten Morgen. Spanish: Buenos dias."}],
]


class MergeError(ValueError):
    """Bad merge input (output directory, options, adapter vs base); the message says which."""


def check_output_dir(out: str | Path) -> Path:
    """`out` must not exist, or be an empty directory: a merge never overwrites anything."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise MergeError(f"output path {str(out)!r} exists and is not a directory")
        if any(out.iterdir()):
            raise MergeError(f"output directory {str(out)!r} exists and is not empty; give a new or empty "
                             "directory (nothing is overwritten)")
    return out


# ----------------------------------------------------------------------------- merged model

def merged_model(model_path: str, adapter_dir: str, *, info: dict, from_dequantized: bool, drift_inputs=None,
                 trust_remote_code: bool = False):
    """(plain HF model with the adapter folded in (fp32), reference logits of base + adapter as
    trained on `drift_inputs` (or None), "what W was")."""

    qlora = info["method"] == "qlora"
    if from_dequantized and not qlora:
        raise MergeError("--from-dequantized applies to QLoRA adapters only (this adapter was trained on a "
                         "float base; pass --method qlora if it was not)")
    quant = QuantSpec(info.get("quant_type", "nf4"), bool(info.get("double_quant", True)), torch.float32)

    def load(quantized: bool):
        model = load_base_model(model_path, dtype=torch.float32, quant=quant if quantized else None,
                                trust_remote_code=trust_remote_code)
        return load_adapter(model, adapter_dir)

    model = load(quantized=qlora and from_dequantized)
    reference = None
    if drift_inputs is not None:
        if qlora and not from_dequantized:  # the trained model is the 4-bit one: load it just for this
            trained = load(quantized=True)
            reference = all_logits(trained, drift_inputs)
            del trained
            gc.collect()
        else:
            reference = all_logits(model, drift_inputs)
    tied_head = _lm_head_is_tied(model) and any(n.split(".")[-1] == "lm_head" for n in lora_modules(model))
    merge_lora(model, unload=True)
    linear_to_conv1d(model)  # GPT-2-style models: back to the architecture's own Conv1D layout
    _drop_gguf_quantizer(model)
    if tied_head:  # the merged lm_head now differs from the input embeddings: save both
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False
    into = ("NF4-dequantized 4-bit weights" if from_dequantized else
            "original 16-bit weights (not the 4-bit weights the adapter was trained on)" if qlora else "base weights")
    return model, reference, into


def _drop_gguf_quantizer(model) -> None:
    """A GGUF base comes with transformers' GGUF quantizer attached, which refuses
    save_pretrained. Its weights were dequantized on load (plain float tensors), so the merged
    model is an ordinary float model: detach the quantizer and its config."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    packed = [n for n, p in model.named_parameters() if not p.is_floating_point()]
    if packed:
        raise MergeError("the GGUF base was loaded with its weights still in GGUF blocks (a GGUF kernel is "
                         f"installed); merging needs them dequantized (e.g. {packed[0]})")
    quantizer.remove_quantization_config(model)


def _lm_head_is_tied(model) -> bool:
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and emb is not None and head.weight is emb.weight


# ----------------------------------------------------------------------------- drift

def drift_inputs(tokenizer, path: str | None, max_examples: int = 8, max_tokens: int = 256) -> list[list[int]]:
    """Token ids of up to max_examples documents: the conversations (or texts) of a JSONL file,
    rendered whole with the chat template, or the built-in chats; each cut to max_tokens."""

    if path is None:
        docs = [{"messages": chat} for chat in DRIFT_CHATS]
    else:
        docs = load_examples(path)[:max_examples]
    template = None
    out = []
    for doc in docs[:max_examples]:
        if "messages" in doc:
            template = template or chat_template(tokenizer)
            text = tokenizer.apply_chat_template(doc["messages"], chat_template=template, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(doc["text"])["input_ids"]
        if len(ids) >= 2:
            out.append(ids[:max_tokens])
    if not out:
        raise MergeError(f"{path}: no example gives at least 2 tokens to measure drift on")
    return out


@torch.no_grad()
def all_logits(model, inputs: list[list[int]]) -> list[torch.Tensor]:
    """fp32 logits [T, V] of every document, one forward each (no padding, no cache)."""
    model.eval()
    device = next(model.parameters()).device
    return [model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0].float().cpu()
            for ids in inputs]


def logit_drift(reference: list[torch.Tensor], other: list[torch.Tensor]) -> dict:
    """mean / max over positions of KL(p_ref || p_other) = sum_v p_ref (log p_ref - log p_other),
    and the max |logit difference|, with p = softmax(logits) in fp64."""
    kls, max_abs, positions = [], 0.0, 0
    for a, b in zip(reference, other):
        la, lb = F.log_softmax(a.double(), -1), F.log_softmax(b.double(), -1)
        kls.append((la.exp() * (la - lb)).sum(-1))                  # [T]
        max_abs = max(max_abs, float((a - b).abs().max()))
        positions += a.shape[0]
    kl = torch.cat(kls)
    return {"mean_kl": float(kl.mean()), "max_kl": float(kl.max()), "max_abs_logit_diff": max_abs,
            "positions": positions, "examples": len(reference)}


# ----------------------------------------------------------------------------- writing

def base_dtype(directory: str, gguf_file: str | None) -> str:
    """The base's dtype as a --dtype name: a GGUF's float tensors (bf16 / fp32; anything quantized
    or f16 -> fp16, what llama.cpp computes in), else config.json's dtype (fp32 if it names none).
    The streamed merge reads it from the checkpoint's tensors instead (`checkpoint_dtype`)."""
    if gguf_file is not None:
        import gguf
        types = {t.tensor_type.name for t in gguf.GGUFReader(os.path.join(directory, gguf_file)).tensors
                 if len(t.shape) > 1}
        return "bf16" if "BF16" in types else "fp32" if types == {"F32"} else "fp16"
    config = json.loads(Path(directory, "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return {"float16": "fp16", "bfloat16": "bf16"}.get(str(name), "fp32")


def _fp32_bytes(directory: str, gguf_file: str | None) -> int:
    """A rough size of the model in fp32: weight files x 2 (16-bit) or x 8 (a GGUF, maybe 4-bit)."""
    if gguf_file is not None:
        return 8 * os.path.getsize(os.path.join(directory, gguf_file))
    return 2 * sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def want_drift(drift: str, directory: str, gguf_file: str | None) -> tuple[bool, str]:
    """(measure?, why): --drift on / off, or auto = on when the fp32 model fits in a quarter of
    the available memory (the check loads base + adapter, then the merged files, whole)."""
    if drift not in ("auto", "on", "off"):
        raise MergeError(f"--drift must be auto, on or off, got {drift!r}")
    if drift != "auto":
        return drift == "on", f"--drift {drift}"
    need, available = _fp32_bytes(directory, gguf_file), _available_bytes()
    if available is None or need < available / 4:
        return True, "--drift auto: the fp32 model fits in memory"
    return False, (f"--drift auto: skipped, the fp32 model (~{need / 2**30:.1f} GiB) needs more than a quarter of "
                   f"the available memory ({available / 2**30:.1f} GiB); --drift on forces it")


@torch.no_grad()
def trained_logits(model_path: str, adapter_dir: str, qlora: bool, quant_spec, inputs) -> list[torch.Tensor]:
    """Logits of base + adapter as trained (4-bit base for QLoRA), the drift reference."""

    model = load_adapter(load_base_model(model_path, dtype=torch.float32, quant=quant_spec if qlora else None),
                         adapter_dir)
    logits = all_logits(model, inputs)
    del model
    gc.collect()
    return logits


def write_side_files(tokenizer, out: Path, base_dir: str) -> None:
    """Tokenizer files and generation_config.json (the base's, eos = the template's stop tokens)."""
    from transformers import AutoConfig, GenerationConfig


    tokenizer.save_pretrained(out)
    try:
        gen = GenerationConfig.from_pretrained(base_dir)
    except (OSError, ValueError):
        gen = GenerationConfig.from_model_config(AutoConfig.from_pretrained(out))
    stops = stop_token_ids(tokenizer)
    gen.eos_token_id = stops[0] if len(stops) == 1 else stops
    gen.pad_token_id = tokenizer.pad_token_id
    gen.save_pretrained(out)


def merge(model_path: str, adapter_dir: str, out_dir: str, *, method: str | None = None,
          from_dequantized: bool = False, dtype: str | None = None, max_shard_size: str = "2GB",
          gguf: str | list[str] | None = None, drift: str = "auto", drift_examples: str | None = None,
          streamed: bool | None = None, ollama: bool = False, system: str | None = None) -> dict:
    """Merge, write `out_dir`, measure drift; returns the report (also out_dir/merge_report.json).

    dtype: fp16 | bf16 | fp32, None = the base's. streamed: None = stream whenever the base is a
    safetensors checkpoint (engine/export/stream_merge.py), False = load it whole (the merge of a
    GGUF base, .bin or fused-on-load checkpoints). gguf: one type, a comma list or a list (one file
    each); a Modelfile is written beside them, or FROM the merged directory with `ollama`. system:
    the Modelfile's SYSTEM (default: the system message every training conversation started with)."""
    from transformers import AutoModelForCausalLM


    out = check_output_dir(out_dir)
    if dtype is not None and dtype not in DTYPES:
        raise MergeError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    gguf_types = gguf_type_list(gguf)
    try:
        check_system_prompt(system)
    except ValueError as err:
        raise MergeError(f"--system: {err}") from None
    read_adapter_config(adapter_dir)
    directory, gguf_base = _resolve(model_path)  # a missing model fails here, before anything is loaded
    info = {"method": "lora", **adapter_training_info(adapter_dir)}
    if method is not None:
        info["method"] = method
    qlora = info["method"] == "qlora"
    if from_dequantized and not qlora:
        raise MergeError("--from-dequantized applies to QLoRA adapters only (this adapter was trained on a "
                         "float base; pass --method qlora if it was not)")
    quant = QuantSpec(info.get("quant_type", "nf4"), bool(info.get("double_quant", True)), torch.float32)
    measure, drift_why = want_drift(drift, directory, gguf_base)
    refusal = "it is a GGUF file" if gguf_base is not None else stream_refusal(directory)
    if streamed and refusal is not None:
        raise MergeError(f"{model_path}: cannot be merged streamed: {refusal}")
    stream = refusal is None and streamed is not False
    tokenizer = load_tokenizer(model_path)
    if adapter_chat_template(adapter_dir) is not None:  # trained with data.chat_template: ship that one
        tokenizer.chat_template = adapter_chat_template(adapter_dir)
    inputs = drift_inputs(tokenizer, drift_examples) if measure else None
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        reference, written = None, None
        if stream:
            if measure:
                reference = trained_logits(model_path, adapter_dir, qlora, quant, inputs)
            try:
                written = stream_merge(directory, adapter_dir, tmp, dtype=DTYPES[dtype] if dtype else None,
                                       max_shard_size=max_shard_size,
                                       dequantize_spec=quant if from_dequantized else None)
            except NeedsConversion as fused:
                refusal = f"transformers fuses tensors such as {fused.args[0]!r} on load"
                stream = False
                shutil.rmtree(tmp)
                tmp.mkdir()
        if not stream:
            model, reference, _ = merged_model(model_path, adapter_dir, info=info, from_dequantized=from_dequantized,
                                               drift_inputs=inputs)
            name = dtype or base_dtype(directory, gguf_base)
            model.to(DTYPES[name])
            model.config.use_cache = True
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
            del model
            gc.collect()
            written = {"dtype": DTYPES[name]}
        write_side_files(tokenizer, tmp, directory)
        out_dtype = next(k for k, v in DTYPES.items() if v == written["dtype"])
        into = ("NF4-dequantized 4-bit weights" if from_dequantized else
                "original 16-bit weights (not the 4-bit weights the adapter was trained on)" if qlora
                else "base weights")
        report = {"model": model_path, "adapter": adapter_dir, "method": info["method"], "merged_into": into,
                  "dtype": out_dtype, "streamed": stream, "not_streamed_because": refusal,
                  "reference": "4-bit base + LoRA, as trained" if qlora else "base + LoRA",
                  "drift_examples": (drift_examples or "built-in chats") if measure else None,
                  "drift_measured": drift_why, "drift": None}
        base_name = Path(directory if gguf_base is None else gguf_base).name
        written_ggufs = []  # (type, file, seconds)
        for qtype in gguf_types:
            started = time.perf_counter()
            export_gguf_dir(tmp, tokenizer, tmp / f"model-{qtype}.gguf", qtype,
                            name=f"{base_name} + {Path(adapter_dir).name}", progress=True)
            written_ggufs.append((qtype, f"model-{qtype}.gguf", time.perf_counter() - started))
        if measure:  # drift of the files as written, loaded the plainest way (computed in fp32)
            merged = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
            merged_logits = all_logits(merged, inputs)
            report["drift"] = logit_drift(reference, merged_logits)
            del merged
            gc.collect()
        entries = []
        for qtype, gguf_file, seconds in written_ggufs:
            entry = gguf_drift(tmp, gguf_file, qtype, reference, merged_logits, inputs) if measure else \
                {"file": gguf_file, "type": qtype, "drift": None}
            entries.append({**entry, "seconds": round(seconds, 2)})
        if entries:
            report["gguf"], report["ggufs"] = entries[0], entries  # "gguf": the first type's
        if written_ggufs or ollama:
            system = system if system is not None else training_system_prompt(adapter_dir)
            write_modelfile(tmp, [f for _, f, _ in written_ggufs], tokenizer, system=system)
            report["modelfile"] = "Modelfile"
        (tmp / "merge_report.json").write_text(json.dumps(report, indent=2))
        check_output_dir(out)  # still new or empty: then move the finished files into place
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def gguf_drift(directory: Path, gguf_file: str, qtype: str, reference, merged, inputs) -> dict:
    """The GGUF read back by transformers' GGUF loader: drift vs base + adapter as trained
    ("drift") and vs the merged HF files ("drift_vs_merged": what the GGUF type alone costs), and
    whether the latter is within the type's tolerance (engine.export.gguf.DRIFT_TOLERANCE). A
    family transformers cannot read (gemma) or a read that fails is reported, not raised: the file
    is written for llama.cpp either way."""
    from transformers import AutoConfig, AutoModelForCausalLM


    entry = {"file": gguf_file, "type": qtype, "drift": None, "tolerance_mean_kl": DRIFT_TOLERANCE[qtype]}
    family = FAMILIES[AutoConfig.from_pretrained(directory).model_type]
    if not family.readable:
        entry["not_read_back"] = f"transformers has no GGUF reader for architecture {family.arch!r}"
        return entry
    try:
        back = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    except (RuntimeError, ValueError, KeyError) as err:
        entry["not_read_back"] = f"transformers' GGUF reader failed: {str(err).splitlines()[0][:300]}"
        return entry
    logits = all_logits(back, inputs)
    entry["drift"] = logit_drift(reference, logits)
    entry["drift_vs_merged"] = logit_drift(merged, logits)
    entry["within_tolerance"] = entry["drift_vs_merged"]["mean_kl"] <= DRIFT_TOLERANCE[qtype]
    return entry


def print_report(report: dict, out: str) -> None:
    how = "streamed" if report["streamed"] else f"in memory ({report['not_streamed_because']})"
    print(f"merged {report['adapter']} into the {report['merged_into']} of {report['model']} -> {out} "
          f"({report['dtype']}, {how})")
    d = report["drift"]
    if d is None:
        print(f"drift not measured ({report['drift_measured']})")
    else:
        print(f"drift vs {report['reference']} over {d['examples']} examples / {d['positions']} positions: "
              f"mean KL {d['mean_kl']:.3e}, max KL {d['max_kl']:.3e}, max |logit diff| {d['max_abs_logit_diff']:.3e}")
    for entry in report.get("ggufs", []):
        g = entry["drift"]
        if g is not None:
            verdict = "within" if entry["within_tolerance"] else "ABOVE"
            m = entry["drift_vs_merged"]
            print(f"GGUF {entry['file']} (read back by transformers): mean KL {g['mean_kl']:.3e}, max |logit diff| "
                  f"{g['max_abs_logit_diff']:.3e}; vs the merged files mean KL {m['mean_kl']:.3e} ({verdict} the "
                  f"{entry['type']} tolerance {entry['tolerance_mean_kl']:.0e})")
        else:
            print(f"GGUF {entry['file']}: drift not measured ({entry.get('not_read_back', report['drift_measured'])})")
    if "modelfile" in report:
        print(f"Ollama: ollama create my-model -f {os.path.join(out, report['modelfile'])}")


def gguf_type_list(value: str | list[str] | None) -> list[str]:
    """--gguf's value: None, one type, a comma list ("q4_k_m,q8_0") or a list -> checked types, in
    order, each once."""
    if value is None:
        return []
    types = [t.strip().lower() for t in (value.split(",") if isinstance(value, str) else value)]
    for qtype in types:
        check_gguf_type(qtype)
    return list(dict.fromkeys(types))


def _gguf_types(value: str) -> list[str]:
    for qtype in value.split(","):
        if qtype.strip().lower() not in GGUF_CHOICES:
            raise argparse.ArgumentTypeError(f"invalid choice: {qtype.strip()!r} (choose from "
                                             f"{', '.join(GGUF_CHOICES)}, or a comma list of them)")
    return gguf_type_list(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m engine.export.merge", description="Fold a LoRA adapter into its base model.")
    p.add_argument("--model", default="default", help="HF model dir, .gguf file, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", required=True, help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="output directory (must not exist, or be empty)")
    p.add_argument("--method", choices=("lora", "qlora"), default=None,
                   help="how the adapter was trained; default: what its run's config says, else lora")
    p.add_argument("--from-dequantized", action="store_true",
                   help="QLoRA: merge into the NF4-dequantized weights instead of the original 16-bit ones")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="output dtype (default: the base's)")
    p.add_argument("--max-shard-size", default="2GB", help="largest output safetensors shard (does not change the "
                   "memory a streamed merge needs)")
    p.add_argument("--gguf", type=_gguf_types, default=None, metavar="TYPE[,TYPE...]",
                   help=f"also write a GGUF file of each type ({', '.join(GGUF_CHOICES)}; q4_k_m is what Ollama "
                        "and llama.cpp users usually run), and an Ollama Modelfile")
    p.add_argument("--ollama", action="store_true",
                   help="write an Ollama Modelfile (always written beside a GGUF; without --gguf: FROM the merged "
                        "directory)")
    p.add_argument("--system", default=None,
                   help="the Modelfile's SYSTEM prompt (default: the system message all the run's training "
                        "conversations start with, if they share one)")
    p.add_argument("--drift", choices=("auto", "on", "off"), default="auto",
                   help="measure the logit drift (loads the model whole in fp32); auto: when it fits in memory")
    p.add_argument("--in-memory", action="store_true", help="load the base whole instead of streaming its shards")
    p.add_argument("--drift-examples", default=None, help="JSONL file whose first 8 examples measure the drift")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:

    args = parse_args(argv)

    def body() -> None:
        report = merge(args.model, args.adapter, args.out, method=args.method, from_dequantized=args.from_dequantized,
                       dtype=args.dtype, max_shard_size=args.max_shard_size, gguf=args.gguf, drift=args.drift,
                       drift_examples=args.drift_examples, streamed=False if args.in_memory else None,
                       ollama=args.ollama, system=args.system)
        print_report(report, args.out)

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
