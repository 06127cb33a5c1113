"""Read and write safetensors files one tensor at a time, so memory holds one tensor, not a shard.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length N,
N bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}
(padded with spaces to a multiple of 8), then the tensors' raw little-endian bytes, back to back
in offset order. Because every output shape and dtype is known before any data is written (a
merge keeps shapes; the dtype is chosen up front), the header goes first and each tensor is then
appended as it is produced. Reading seeks to a tensor's offsets and reads just its bytes (no
memory map: mapped pages of a whole shard would count in the process's resident memory).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
          "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
          "F64": torch.float64}
NAMES = {v: k for k, v in DTYPES.items()}
COPY_CHUNK = 4 << 20  # bytes moved per read when a tensor is copied unchanged


class SafetensorsFormatError(ValueError):
    """A safetensors file is malformed or holds an unsupported dtype; the message names the file."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """name -> TensorInfo for every tensor of `path`, in file order (offsets absolute)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsFormatError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, MemoryError, OverflowError) as err:
            raise SafetensorsFormatError(f"{path}: unreadable safetensors header ({err})") from None
    base = 8 + n
    infos = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in DTYPES:
            raise SafetensorsFormatError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, not one of "
                                         f"{', '.join(DTYPES)}")
        begin, end = entry["data_offsets"]
        infos[name] = TensorInfo(DTYPES[entry["dtype"]], tuple(entry["shape"]), base + begin, base + end)
    return dict(sorted(infos.items(), key=lambda kv: kv[1].begin))


def read_tensor(f, info: TensorInfo) -> torch.Tensor:
    """The tensor at `info` of the open binary file `f`, in memory it owns."""
    if not info.shape:
        return read_rows(f, info, 0, 1).reshape(())
    return read_rows(f, info, 0, info.shape[0])


def read_rows(f, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
    """Rows start:stop (along dim 0) of the tensor at `info`: one contiguous byte range."""
    rows = info.shape[0] if info.shape else 1
    row_bytes = info.nbytes // rows if rows else 0
    shape = (stop - start, *info.shape[1:])
    n = (stop - start) * row_bytes
    if n == 0:
        return torch.empty(shape, dtype=info.dtype)
    f.seek(info.begin + start * row_bytes)
    buf = bytearray(n)
    if f.readinto(buf) != n:
        raise SafetensorsFormatError(f"{getattr(f, 'name', '?')}: file ends inside a tensor (truncated?)")
    return torch.frombuffer(buf, dtype=info.dtype).reshape(shape)


def row_blocks(shape: tuple[int, ...], block_bytes: int, element_size: int = 4) -> list[tuple[int, int]]:
    """(start, stop) row ranges along dim 0 of about block_bytes each (at element_size bytes per value)."""
    if not shape:
        return [(0, 1)]
    row = max(1, torch.Size(shape[1:]).numel() * element_size)
    step = max(1, block_bytes // row)
    return [(i, min(i + step, shape[0])) for i in range(0, shape[0], step)] or [(0, 0)]


class StreamWriter:
    """Writes a safetensors file whose tensors are given up front as (name, dtype, shape) and
    then appended in that order with `write`; `close` checks every one was written."""

    def __init__(self, path: str | Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        self._expected = []
        offset = 0
        for name, dtype, shape in entries:
            if dtype not in NAMES:
                raise SafetensorsFormatError(f"{path}: tensor {name!r}: dtype {dtype} cannot be written")
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._expected.append((name, dtype, tuple(shape)))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.path = Path(path)
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def _check(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        if self._next >= len(self._expected):
            raise SafetensorsFormatError(f"{self.path}: tensor {name!r} written after the last one planned")
        expected = self._expected[self._next]
        if (name, dtype, tuple(shape)) != expected:
            raise SafetensorsFormatError(f"{self.path}: expected tensor {expected[0]!r} {expected[1]} "
                                         f"{expected[2]} next, got {name!r} {dtype} {tuple(shape)}")
        self._next += 1

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._check(name, tensor.dtype, tuple(tensor.shape))
        if tensor.numel():
            self._f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())

    def write_blocks(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], blocks) -> None:
        """Append tensor `name` given as consecutive row blocks (an iterable of tensors of `dtype`)."""
        self._check(name, dtype, shape)
        expected = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        written = 0
        for block in blocks:
            if block.dtype != dtype:
                raise SafetensorsFormatError(f"{self.path}: tensor {name!r}: a block of dtype {block.dtype}, not {dtype}")
            if block.numel():
                self._f.write(block.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            written += block.numel() * block.element_size()
        if written != expected:
            raise SafetensorsFormatError(f"{self.path}: tensor {name!r}: blocks gave {written} bytes, not {expected}")

    def copy_from(self, name: str, src, info: TensorInfo) -> None:
        """Append tensor `name` as the raw bytes at `info` of the open file `src` (same dtype), in chunks."""
        self._check(name, info.dtype, info.shape)
        src.seek(info.begin)
        left = info.nbytes
        while left:
            chunk = src.read(min(left, COPY_CHUNK))
            if not chunk:
                raise SafetensorsFormatError(f"{getattr(src, 'name', '?')}: file ends inside tensor {name!r}")
            self._f.write(chunk)
            left -= len(chunk)

    def close(self) -> None:
        self._f.close()
        if self._next != len(self._expected):
            raise SafetensorsFormatError(f"{self.path}: only {self._next} of {len(self._expected)} tensors were "
                                         f"written (next: {self._expected[self._next][0]!r})")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        else:
            self._f.close()
