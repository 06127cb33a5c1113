"""K-quant blocks (engine/export/kquants.py) against llama.cpp's own: byte equality on a committed
fixture, and the round trip through gguf-py's dequantizer.

The fixture (tests/export/fixtures/kquants.npz, ~30 KB) holds 16 rows of 512 f16 weights of
several kinds of data and the Q4_K, Q5_K and Q6_K blocks llama.cpp wrote for them: made by
tests/export/fixtures/make_kquants_fixture.py, which runs llama-cpp-python 0.3.36's
`llama_model_quantize` (pure, no importance matrix) on a tiny f16 GGUF holding those rows. The
engine's quantizers repeat llama.cpp's float32 operations in C order, so no tolerance is needed:
every block is equal (the script also reports the rate over every tensor of its files)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from engine.export.kquants import QUANTIZERS, quantize_q4_k

FIXTURE = Path(__file__).parent / "fixtures" / "kquants.npz"
TYPES = {"q4_k": gguf.GGMLQuantizationType.Q4_K, "q5_k": gguf.GGMLQuantizationType.Q5_K,
         "q6_k": gguf.GGMLQuantizationType.Q6_K}


@pytest.fixture(scope="module")
def fixture():
    return dict(np.load(FIXTURE))


@pytest.mark.parametrize("name", list(TYPES))
def test_blocks_equal_llama_cpp_bytes(fixture, name):
    rows = fixture["rows"].astype(np.float32)
    theirs = fixture[name]
    ours = QUANTIZERS[name](rows)
    assert ours.shape == theirs.shape == (16, 2 * gguf.GGML_QUANT_SIZES[TYPES[name]][1])
    block = gguf.GGML_QUANT_SIZES[TYPES[name]][1]
    equal = (ours.reshape(-1, block) == theirs.reshape(-1, block)).all(axis=1)
    assert equal.all(), f"{name}: blocks {np.flatnonzero(~equal).tolist()} differ from llama.cpp's"


@pytest.mark.parametrize("name", list(TYPES))
def test_roundtrip_through_gguf_dequantizer_has_llama_cpp_error(fixture, name):
    rows = fixture["rows"].astype(np.float32)
    ours = gguf.quants.dequantize(QUANTIZERS[name](rows), TYPES[name])
    theirs = gguf.quants.dequantize(fixture[name], TYPES[name])
    assert np.array_equal(ours, theirs)
    # and that error is the K-quant's: relative RMS error per row of the Gaussian rows
    rel = np.sqrt(((ours - rows) ** 2).mean(-1) / (rows ** 2).mean(-1))[:4]
    bound = {"q4_k": 0.12, "q5_k": 0.06, "q6_k": 0.03}[name]
    assert (rel > 0).all() and (rel < bound).all(), (name, rel)


def test_more_bits_less_error():
    rows = np.random.default_rng(0).standard_normal((64, 1024)).astype(np.float32)
    errors = [float(np.abs(gguf.quants.dequantize(QUANTIZERS[name](rows), t) - rows).mean()) for name, t in TYPES.items()]
    assert errors[0] > 1.8 * errors[1] > 1.8 * 1.8 * errors[2] > 0


def test_all_zero_and_bad_input():
    zeros = np.zeros((2, 256), np.float32)
    for name, t in TYPES.items():
        assert not gguf.quants.dequantize(QUANTIZERS[name](zeros), t).any()
    with pytest.raises(ValueError, match="multiple of 256 long, got 576"):
        quantize_q4_k(np.ones((2, 576), np.float32))
    bad = np.ones((1, 256), np.float32)
    bad[0, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_q4_k(bad)


def test_threads_split_rows_without_changing_bytes():
    from engine.export.kquants import quantize

    rows = np.random.default_rng(1).standard_normal((600, 512)).astype(np.float32)
    single = quantize(rows, "q5_k", threads=1)
    assert np.array_equal(quantize(rows, "q5_k", threads=3), single)
    assert np.array_equal(single, QUANTIZERS["q5_k"](rows))
