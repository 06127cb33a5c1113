"""Write a (merged) model and its tokenizer as one GGUF file, streamed tensor by tensor.

GGUF (llama.cpp's format, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) is one file:
key-value metadata, tensor infos, then the tensors' data. gguf-py's GGUFWriter can take every
tensor's name, shape and type first and the data afterwards one tensor at a time
(add_tensor_info ... write_tensor_data), so `export_gguf_dir` reads a safetensors directory
twice: headers for the infos, then each tensor in blocks of rows (engine/export/safetensors_io.py).
Memory is one block of rows and its quantized copy, not the model (nor its largest tensor).

Per-family names and layouts: engine/export/gguf_arch.py; the tokenizer: engine/export/gguf_vocab.py.

Types (llama.cpp's, via gguf-py's quantizer):
  f16 / bf16   2-D weights in 16 bits
  q8_0         blocks of 32 weights: 8-bit ints and one f16 scale  (8.5 bits per weight)
  q4_0         blocks of 32 weights: 4-bit ints and one f16 scale  (4.5 bits per weight)
1-D tensors (norms, biases) stay f32, as llama.cpp writes them; a 2-D weight whose row length is
not a multiple of the block size (32) is written f16. K-quants (q4_k_m, ...) are not offered:
gguf-py 0.19 has no quantizer for them (quantize raises NotImplementedError); write f16 and run
llama.cpp's `llama-quantize model-f16.gguf model-q4_k_m.gguf Q4_K_M`.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import gguf
import numpy as np
import torch
from engine.export.gguf_arch import add_hparams, family_of, gguf_tensor, GGUFExportError
from engine.export.gguf_vocab import add_tokenizer
from engine.export.safetensors_io import read_header, read_rows, row_blocks


QTYPES = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
          "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
FILE_TYPES = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
GGUF_TYPES = tuple(QTYPES)
BLOCK_BYTES = 4 << 20  # fp32 bytes of one block of rows converted at a time
# Mean KL(p_merged || p_gguf) per position a file of each type may drift from the HF model it was
# written from, as read back by transformers (merge_report.json flags a file above it). The
# rounding of 16-bit weights moves next-token distributions by ~1e-6..1e-5, 8-bit blocks by
# ~1e-4, 4-bit blocks by ~1e-2 (llama.cpp's own q4_0 perplexity gap is of that order).
DRIFT_TOLERANCE = {"f16": 1e-4, "bf16": 1e-3, "q8_0": 1e-2, "q4_0": 1e-1}


def check_gguf_type(qtype: str) -> None:
    if qtype in QTYPES:
        return
    hint = (" (K-quants: gguf-py has no quantizer for them; write f16, then llama.cpp's "
            f"`llama-quantize model-f16.gguf model-{qtype}.gguf {qtype.upper()}`)") if "_k" in qtype.lower() else ""
    raise GGUFExportError(f"GGUF type must be one of {', '.join(GGUF_TYPES)}, got {qtype!r}{hint}")


def _ggml_type(tensor: torch.Tensor, qtype: str) -> gguf.GGMLQuantizationType:
    """The type one tensor is stored in: f32 for 1-D, the file's type where blocks fit, else f16."""
    if tensor.dim() == 1:
        return gguf.GGMLQuantizationType.F32
    q = QTYPES[qtype]
    block = gguf.GGML_QUANT_SIZES[q][0]
    return q if tensor.shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def _encode(tensor: torch.Tensor, ggml_type: gguf.GGMLQuantizationType) -> np.ndarray:
    data = tensor.detach().float().cpu().numpy()
    if ggml_type == gguf.GGMLQuantizationType.F32:
        return data.astype(np.float32)
    if ggml_type == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
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


def write_gguf(config, tokenizer, tensors, path: str | Path, qtype: str = "f16", name: str | None = None) -> Path:
    """Write GGUF `path` from `config`, `tokenizer` and `tensors`: a callable returning a fresh
    iterator of (HF name, shape, rows) where rows(start, stop) gives those rows (dim 0) of the
    tensor; called twice (infos, data). Tensors are converted and quantized in blocks of rows of
    ~4 MiB of fp32 (ggml blocks run along rows, so the bytes are those of the whole tensor at once),
    except Llama Q/K weights, which are permuted across a head's rows, and 1-D tensors.
    The file appears under `path` only when complete."""
    check_gguf_type(qtype)
    family = family_of(config)
    name_map = gguf.get_tensor_name_map(family.model_arch, config.num_hidden_layers)
    path = Path(path)
    writer = gguf.GGUFWriter(None, arch=family.arch)
    with written_in_place(writer, path) as partial:
        # llama.cpp keys token attributes on general.name (a name with "phi3" in it requires Phi-3's
        # <s>, </s>, <unk> tokens): the default names no family
        writer.add_name(name or "merged model")
        add_hparams(writer, config, family)
        writer.add_file_type(FILE_TYPES[qtype])
        add_tokenizer(writer, tokenizer, config.vocab_size)
        plan = []  # (hf name, gguf name, ggml type)
        meta = torch.empty(0, device="meta")
        for hf_name, shape, _ in tensors():
            mapped = gguf_tensor(family, config, name_map, hf_name, meta.new_empty(shape))
            if mapped is None:
                continue
            ggml_type = _ggml_type(mapped[1], qtype)
            nbytes = _nbytes(shape, ggml_type)
            writer.add_tensor_info(mapped[0], shape, np.dtype(np.float32), nbytes, raw_dtype=ggml_type)
            plan.append((hf_name, mapped[0], ggml_type, nbytes))
        writer.write_header_to_file(partial)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        todo, planned = iter(plan), {p[0] for p in plan}
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
    return path


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


def export_gguf(model, tokenizer, path: str | Path, qtype: str = "f16", name: str | None = None) -> Path:
    """GGUF of an in-memory transformers model (LoRA already merged); a tied lm_head is left out."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and emb is not None and head.weight is emb.weight
    state = {k: v.detach() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    return write_gguf(model.config, tokenizer,
                      lambda: ((k, tuple(v.shape), (lambda a, b, v=v: v[a:b])) for k, v in state.items()),
                      path, qtype, name)


def export_gguf_dir(directory: str | Path, tokenizer, path: str | Path, qtype: str = "f16",
                    name: str | None = None) -> Path:
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
    return write_gguf(config, tokenizer, tensors, path, qtype, name)
