"""Write a (merged) model and its tokenizer as one GGUF file, streamed tensor by tensor.

GGUF (llama.cpp's format, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) is one file:
key-value metadata, tensor infos, then the tensors' data. gguf-py's GGUFWriter can take every
tensor's name, shape and type first and the data afterwards one tensor at a time
(add_tensor_info ... write_tensor_data), so `export_gguf_dir` reads a safetensors directory
twice: headers for the infos, then each tensor in blocks of rows (engine/export/safetensors_io.py).
Memory is one block of rows and its quantized copy, not the model (nor its largest tensor).

Per-family names and layouts: engine/export/gguf_arch.py; the tokenizer: engine/export/gguf_vocab.py.

Types: one file type ("mix") per file, each tensor's ggml type chosen as llama.cpp's quantizer
chooses it (engine/export/gguf_mix.py):
  f16 / bf16   2-D weights in 16 bits
  q8_0         blocks of 32 weights: 8-bit ints and one f16 scale  (8.5 bits per weight)
  q4_0         blocks of 32: 4-bit ints and one f16 scale (4.5 bpw); the output head Q6_K
  q4_k_m / q4_k_s / q5_k_m / q5_k_s / q6_k   K-quant super-blocks of 256 (engine/export/kquants.py),
               attention V, FFN down and the output head in more bits as llama.cpp picks them
1-D tensors (norms, biases) stay f32, as llama.cpp writes them. Quantized types are made from the
weights' f16 values, as llama-quantize makes them from a converted f16 file: the file is byte for
byte what `llama-quantize model-f16.gguf out.gguf Q4_K_M` writes from this writer's f16 file.
Q8_0 / Q4_0 / Q5_0 / Q5_1 blocks come from gguf-py's quantizer (the same bytes as llama.cpp's).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np
import torch
from engine.export.gguf_arch import add_hparams, family_of, gguf_tensor, GGUFExportError
from engine.export.gguf_mix import choose_types, MIXES, ModelShape
from engine.export import kquants
from engine.export.gguf_vocab import add_tokenizer
from engine.export.safetensors_io import read_header, read_rows, row_blocks


GGUF_TYPES = tuple(MIXES)
BLOCK_BYTES = 4 << 20  # fp32 bytes of one block of rows converted at a time
# Mean KL(p_merged || p_gguf) per position a file of each type may drift from the HF model it was
# written from, as read back by transformers (merge_report.json flags a file above it). The
# rounding of 16-bit weights moves next-token distributions by ~1e-6..1e-5, 8-bit blocks by
# ~1e-4 (tiny models) to ~2e-3 (SmolLM2-135M), 4-bit blocks by ~1e-2 to ~1e-1: SmolLM2-135M's
# q4_k_m, byte-identical to llama.cpp's own Q4_K_M of the same f16 file, drifts by 0.11 (its
# 576-wide rows are mostly Q5_0). 5- and 6-bit K-quants sit between.
DRIFT_TOLERANCE = {"f16": 1e-4, "bf16": 1e-3, "q8_0": 1e-2, "q4_0": 1e-1, "q4_k_s": 2e-1, "q4_k_m": 2e-1,
                   "q5_k_s": 1e-1, "q5_k_m": 1e-1, "q6_k": 2e-2}
_K_QUANTS = {gguf.GGMLQuantizationType.Q4_K: "q4_k", gguf.GGMLQuantizationType.Q5_K: "q5_k",
             gguf.GGMLQuantizationType.Q6_K: "q6_k"}


def check_gguf_type(qtype: str) -> None:
    if qtype not in MIXES:
        raise GGUFExportError(f"GGUF type must be one of {', '.join(GGUF_TYPES)}, got {qtype!r}")


def _encode(tensor: torch.Tensor, ggml_type: gguf.GGMLQuantizationType) -> np.ndarray:
    data = tensor.detach().float().cpu().numpy()
    if ggml_type == gguf.GGMLQuantizationType.F32:
        return data.astype(np.float32)
    if ggml_type == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    if ggml_type == gguf.GGMLQuantizationType.BF16:
        return gguf.quants.quantize(data, ggml_type)
    # quantize the f16 values, as llama-quantize does from an f16 file (where they fit in f16)
    half = data.astype(np.float16).astype(np.float32)
    data = np.where(np.isinf(half), data, half)
    if ggml_type in _K_QUANTS:
        return kquants.quantize(data, _K_QUANTS[ggml_type])
    return gguf.quants.quantize(data, ggml_type)


def _nbytes(shape: tuple[int, ...], ggml_type: gguf.GGMLQuantizationType) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    n = int(np.prod(shape))
    return n // block * type_size


def _write_blocks(writer: gguf.GGUFWriter, arrays, nbytes: int) -> None:
    """GGUFWriter.write_tensor_data for the next planned tensor, given as consecutive row blocks
    (gguf-py 0.19 writes a tensor whole; its padding rules are repeated here)."""
    from gguf.gguf_writer import WriterState

    file_id = next(i for i, planned in enumerate(writer.tensors) if planned)
    fout = writer.fout[file_id]
    name = next(iter(writer.tensors[file_id]))
    info = writer.tensors[file_id].pop(name)
    writer.write_padding(fout, fout.tell())
    written = 0
    for array in arrays:
        array.tofile(fout)
        written += array.nbytes
    if written != info.nbytes or written != nbytes:
        raise GGUFExportError(f"GGUF export: tensor {name!r} came to {written} bytes, {info.nbytes} were planned")
    writer.write_padding(fout, written)
    writer.state = WriterState.WEIGHTS


def write_gguf(config, tokenizer, tensors, path: str | Path, qtype: str = "f16", name: str | None = None,
               progress: bool = False) -> Path:
    """Write GGUF `path` from `config`, `tokenizer` and `tensors`: a callable returning a fresh
    iterator of (HF name, shape, rows) where rows(start, stop) gives those rows (dim 0) of the
    tensor; called twice (infos, data). Tensors are converted and quantized in blocks of rows of
    ~4 MiB of fp32 (ggml blocks run along rows, so the bytes are those of the whole tensor at once),
    except Llama Q/K weights, which are permuted across a head's rows, and 1-D tensors.
    `progress` shows a bar of weights written. The file appears under `path` only when complete."""
    from tqdm import tqdm

    check_gguf_type(qtype)
    family = family_of(config)
    name_map = gguf.get_tensor_name_map(family.model_arch, config.num_hidden_layers)
    path = Path(path)
    writer = gguf.GGUFWriter(None, arch=family.arch)
    with written_in_place(writer, path) as partial:
        writer.add_name(llama_cpp_safe_name(name or "merged model", tokenizer))
        add_hparams(writer, config, family)
        writer.add_file_type(MIXES[qtype].file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)  # as convert_hf_to_gguf.py and llama-quantize
        add_tokenizer(writer, tokenizer, config.vocab_size)
        meta = torch.empty(0, device="meta")
        mapped = []  # (hf name, gguf name, shape)
        for hf_name, shape, _ in tensors():
            gguf_named = gguf_tensor(family, config, name_map, hf_name, meta.new_empty(shape))
            if gguf_named is not None:
                mapped.append((hf_name, gguf_named[0], tuple(shape)))
        n_head = config.num_attention_heads
        shape = ModelShape(family.arch, config.num_hidden_layers, n_head,
                           getattr(config, "num_key_value_heads", None) or n_head)
        types = choose_types(qtype, [(g, s) for _, g, s in mapped], shape)
        plan = []  # (hf name, gguf name, ggml type, bytes)
        for hf_name, gguf_name, gguf_shape in mapped:
            nbytes = _nbytes(gguf_shape, types[gguf_name])
            writer.add_tensor_info(gguf_name, gguf_shape, np.dtype(np.float32), nbytes, raw_dtype=types[gguf_name])
            plan.append((hf_name, gguf_name, types[gguf_name], nbytes))
        writer.write_header_to_file(partial)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        todo, planned = iter(plan), {p[0] for p in plan}
        bar = tqdm(total=sum(int(np.prod(s)) for _, _, s in mapped), unit="w", unit_scale=True,
                   desc=f"GGUF {qtype}", disable=not progress)
        for hf_name, shape, rows in tensors():
            if hf_name not in planned:
                continue
            expected, gguf_name, ggml_type, nbytes = next(todo)
            if expected != hf_name:
                raise GGUFExportError(f"GGUF export: tensors came in a different order the second time "
                                      f"({hf_name!r} where {expected!r} was planned)")
            permuted = family.permute_qk and ("self_attn.q_proj." in hf_name or "self_attn.k_proj." in hf_name)
            blocks = [(0, shape[0])] if permuted or len(shape) < 2 else row_blocks(shape, BLOCK_BYTES)
            arrays = (_encode(gguf_tensor(family, config, name_map, hf_name, rows(a, b))[1], ggml_type)
                      for a, b in blocks)
            _write_blocks(writer, arrays, nbytes)
            bar.update(int(np.prod(shape)))
        bar.close()
    return path


PHI3_NAME_TOKENS = ("<unk>", "<s>", "</s>", "<|endoftext|>")


def llama_cpp_safe_name(name: str, tokenizer) -> str:
    """general.name as llama.cpp can load it. llama.cpp keys token attributes on the name: one that
    contains "phi3" or "phi-3" (any case) makes it look up <unk>, <s>, </s> and <|endoftext|>
    (llama-vocab.cpp, `_set_token_attr` -> token_to_id.at), and a vocabulary without them fails to
    load with "error loading model vocabulary: unordered_map::at" (a Phi-3 fine-tuned with another
    tokenizer, a tiny test model named tiny-phi3). Phi-3's own SentencePiece vocabulary has all four
    and keeps its name; otherwise the name is written with "phi 3"."""
    lowered = name.lower()
    if "phi3" not in lowered and "phi-3" not in lowered:
        return name
    vocab = tokenizer.get_vocab()
    if all(token in vocab for token in PHI3_NAME_TOKENS):
        return name
    import re
    return re.sub(r"phi-?3", "phi 3", name, flags=re.IGNORECASE)


@contextmanager
def written_in_place(writer: gguf.GGUFWriter, path: Path) -> Iterator[Path]:
    """Yield the `.partial` file beside `path` for `writer` to write; on success close the writer and
    move the file to `path`, on any failure (Ctrl-C included) close it and delete the partial file:
    `path` never holds a half-written GGUF, and a complete one already there survives a failed export."""
    partial = path.with_name(path.name + ".partial")
    try:
        yield partial
        writer.close()
        partial.replace(path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise


def export_gguf(model, tokenizer, path: str | Path, qtype: str = "f16", name: str | None = None,
                progress: bool = False) -> Path:
    """GGUF of an in-memory transformers model (LoRA already merged); a tied lm_head is left out."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and emb is not None and head.weight is emb.weight
    state = {k: v.detach() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    return write_gguf(model.config, tokenizer,
                      lambda: ((k, tuple(v.shape), (lambda a, b, v=v: v[a:b])) for k, v in state.items()),
                      path, qtype, name, progress)


def export_gguf_dir(directory: str | Path, tokenizer, path: str | Path, qtype: str = "f16",
                    name: str | None = None, progress: bool = False) -> Path:
    """GGUF of a safetensors model directory (config.json + shards), one tensor in memory at a time."""
    import json

    from transformers import AutoConfig


    directory = Path(directory)
    config = AutoConfig.from_pretrained(directory)
    index = directory / "model.safetensors.index.json"
    files = ([directory / f for f in dict.fromkeys(json.loads(index.read_text())["weight_map"].values())]
             if index.is_file() else [directory / "model.safetensors"])
    headers = [(file, read_header(file)) for file in files]
    tied = bool(getattr(config, "tie_word_embeddings", False))

    def tensors():
        for file, infos in headers:
            with open(file, "rb") as f:
                for name, info in infos.items():
                    if tied and name == "lm_head.weight":
                        continue  # GGUF ties by leaving output.weight out
                    yield name, info.shape, (lambda a, b, info=info, f=f: read_rows(f, info, a, b))
    return write_gguf(config, tokenizer, tensors, path, qtype, name, progress)
