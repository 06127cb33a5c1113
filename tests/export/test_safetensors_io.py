"""The tensor-by-tensor safetensors reader and writer agree with the safetensors library and
name the file and tensor when something is wrong."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.export.safetensors_io import SafetensorsFormatError, StreamWriter, read_header, read_tensor

_G = torch.Generator().manual_seed(0)
TENSORS = {"a.weight": torch.randn(3, 5, generator=_G).bfloat16(), "b.bias": torch.randn(7, generator=_G),
           "c.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
           "d.half": torch.randn(4, generator=_G).half(), "e.empty": torch.empty(0, 3)}


def test_roundtrip_with_the_library(tmp_path):
    save_file(TENSORS, tmp_path / "lib.safetensors")
    infos = read_header(tmp_path / "lib.safetensors")
    assert set(infos) == set(TENSORS)
    with open(tmp_path / "lib.safetensors", "rb") as f:
        for name, info in infos.items():
            assert torch.equal(read_tensor(f, info), TENSORS[name]), name
    # ours, read back by the library: half written from tensors, half copied as raw bytes
    entries = [(n, t.dtype, tuple(t.shape)) for n, t in TENSORS.items()]
    with open(tmp_path / "lib.safetensors", "rb") as src, StreamWriter(tmp_path / "ours.safetensors", entries) as w:
        for i, (name, tensor) in enumerate(TENSORS.items()):
            if i % 2:
                w.copy_from(name, src, infos[name])
            else:
                w.write(name, tensor)
    with safe_open(str(tmp_path / "ours.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        for name, tensor in TENSORS.items():
            assert torch.equal(f.get_tensor(name), tensor), name


def test_writer_checks_order_shape_and_completeness(tmp_path):
    entries = [("x", torch.float32, (2,)), ("y", torch.float32, (3,))]
    w = StreamWriter(tmp_path / "o.safetensors", entries)
    with pytest.raises(SafetensorsFormatError, match=r"o.safetensors: expected tensor 'x' .*\(2,\) next, got 'y'"):
        w.write("y", torch.zeros(3))
    w.write("x", torch.zeros(2))
    with pytest.raises(SafetensorsFormatError, match=r"only 1 of 2 tensors were written \(next: 'y'\)"):
        w.close()
    w = StreamWriter(tmp_path / "b.safetensors", entries)
    with pytest.raises(SafetensorsFormatError, match="tensor 'x': blocks gave 4 bytes, not 8"):
        w.write_blocks("x", torch.float32, (2,), [torch.zeros(1)])
    with pytest.raises(SafetensorsFormatError, match="tensor 'y': a block of dtype torch.float16, not torch.float32"):
        w.write_blocks("y", torch.float32, (3,), [torch.zeros(3, dtype=torch.float16)])
    with pytest.raises(SafetensorsFormatError, match="tensor 'z': dtype torch.complex64 cannot be written"):
        StreamWriter(tmp_path / "c.safetensors", [("z", torch.complex64, (1,))])


def test_reader_names_bad_files(tmp_path):
    save_file({"w": torch.ones(64)}, tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-8])
    info = read_header(tmp_path / "cut.safetensors")["w"]
    with open(tmp_path / "cut.safetensors", "rb") as f, pytest.raises(SafetensorsFormatError, match="cut.safetensors: file ends"):
        read_tensor(f, info)
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(SafetensorsFormatError, match="tiny.safetensors: not a safetensors file"):
        read_header(tmp_path / "tiny.safetensors")
    (tmp_path / "junk.safetensors").write_bytes((5).to_bytes(8, "little") + b"{nope")
    with pytest.raises(SafetensorsFormatError, match="junk.safetensors: unreadable safetensors header"):
        read_header(tmp_path / "junk.safetensors")
    save_file({"f8": torch.zeros(2, dtype=torch.float8_e4m3fn)}, tmp_path / "f8.safetensors")
    with pytest.raises(SafetensorsFormatError, match="f8.safetensors: tensor 'f8' has dtype F8_E4M3"):
        read_header(tmp_path / "f8.safetensors")
