"""llama.cpp's K-quant block quantizers (Q4_K, Q5_K, Q6_K) in NumPy, byte for byte.

A K-quant super-block holds 256 weights of one row. Its sub-blocks each get a scale (and for
Q4_K / Q5_K a min), themselves quantized to 6 bits (Q6_K: 8 bits) against one f16 `d` (and `dmin`):

  Q4_K  8 x 32 weights, w ~ d*sc_j * q - dmin*m_j,  q in 0..15   144 bytes = 4.5 bits per weight
  Q5_K  8 x 32 weights, same with q in 0..31                      176 bytes = 5.5 bits per weight
  Q6_K 16 x 16 weights, w ~ d*sc_j * (q - 32),     q in 0..63     210 bytes = 6.5625 bits per weight

Reference: ggml/src/ggml-quants.c (llama.cpp as vendored by llama-cpp-python 0.3.36):
quantize_row_q{4,5,6}_K_ref with its helpers make_qkx2_quants (a weighted least-squares search
for scale and min over nstep+1 trial scales) and make_qx_quants (rmse_type 1: 19 trial scales),
rounding with nearest_int (round half to even of the float32 value). llama_model_quantize uses
these `_ref` functions whenever no importance matrix is given, and they live in ggml-base, built
without FMA: every step is one IEEE float32 operation. So this file repeats each float32 operation
in the C order, including the order of the sums (`_ordered_sum`: NumPy's `sum` adds pairwise and
would round differently); the bytes then equal llama.cpp's (tests/export/test_kquants.py).

Vectorised over blocks: a sub-block's elements lie along axis 0 ([32 or 16, n_sub_blocks]) so each
C loop over the elements of one sub-block is a loop over rows of whole-tensor vectors.
"""

from __future__ import annotations

import os

import numpy as np

QK_K = 256
F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)
BLOCK_BYTES = {"q4_k": 144, "q5_k": 176, "q6_k": 210}


def _ordered_sum(a: np.ndarray) -> np.ndarray:
    """a [n, N] -> [N] summed in index order, as the C loops `s += a[i]` do: NumPy adds pairwise
    only along the fast (last) axis of memory; along axis 0 of a C-contiguous array it adds row
    after row (the test against ggml's bytes would catch a change)."""
    return np.add.reduce(a, axis=0)


def _levels(scaled: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """MAX(lo, MIN(hi, nearest_int(scaled))), in place, as float32."""
    np.rint(scaled, out=scaled)
    np.minimum(scaled, F32(hi), out=scaled)
    return np.maximum(scaled, F32(lo), out=scaled)


def _nearest_int(a: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: round half to even of a float32 value (|a| < 2**22)."""
    return np.rint(a)


def make_qkx2_quants(x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float,
                     nstep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scale, min and levels of sub-blocks x [n, N] (float32, elements along axis 0), minimising
    sum w (scale*L + min - x)^2 over L in 0..nmax: a first guess from the range, then nstep+1 trial
    inverse scales (rmin + rdelta*i + nmax)/(max - min), each refit by weighted least squares.
    Returns (scale [N], the_min [N] = -min >= 0, L [n, N] as float32)."""
    xmin = np.minimum(x.min(axis=0), F32(0))
    xmax = x.max(axis=0)
    sum_w = _ordered_sum(weights)
    sum_x = _ordered_sum(weights * x)
    flat = xmax == xmin
    iscale = F32(nmax) / np.where(flat, F32(1), xmax - xmin)
    scale = F32(1) / iscale
    levels = _levels(iscale * (x - xmin), 0, nmax)
    diff = scale * levels + xmin - x
    best_error = _ordered_sum(weights * (diff * diff))
    for step in range(nstep + 1):
        # the C loop moves `min` to each better fit: later trials use it in the range and the offset
        iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / np.where(flat, F32(1), xmax - xmin)
        trial = _levels(iscale * (x - xmin), 0, nmax)
        wl = weights * trial
        sum_l = _ordered_sum(wl)
        sum_l2 = _ordered_sum(wl * trial)
        sum_xl = _ordered_sum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        fits = (det > 0) & ~flat
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            positive_min = this_min > 0
            this_min = np.where(positive_min, F32(0), this_min)
            this_scale = np.where(positive_min, sum_xl / sum_l2, this_scale)
        diff = this_scale * trial + this_min - x
        error = _ordered_sum(weights * (diff * diff))
        better = fits & (error < best_error)
        if not better.any():
            continue
        np.copyto(levels, trial, where=better)
        best_error = np.where(better, error, best_error)
        scale = np.where(better, this_scale, scale)
        xmin = np.where(better, this_min, xmin)
    levels = np.where(flat, F32(0), levels)
    scale = np.where(flat, F32(0), scale)
    return scale, -xmin, levels


def make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric scale of sub-blocks x [n, N] with L in -nmax..nmax-1 (rmse_type 1: weights x^2),
    19 trial inverse scales -(nmax + 0.1*i)/max around the range's. Returns (scale [N], L + nmax)."""
    n = x.shape[0]
    cols = np.arange(x.shape[1])
    biggest = x[np.abs(x).argmax(axis=0), cols]  # the first element of largest |x|, sign kept
    zero = np.abs(biggest) < GROUP_MAX_EPS
    biggest = np.where(zero, F32(1), biggest)
    weights = x * x
    wx = weights * x

    def trial(iscale):
        levels = _levels(iscale * x, -nmax, nmax - 1)
        return levels, _ordered_sum(wx * levels), _ordered_sum(weights * levels * levels)

    iscale = F32(-nmax) / biggest
    levels, sumlx, suml2 = trial(iscale)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(F32(nmax) + F32(0.1) * F32(step)) / biggest
        candidate, sumlx, suml2 = trial(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        with np.errstate(divide="ignore", invalid="ignore"):
            new_scale = sumlx / suml2
        levels = np.where(better, candidate, levels)
        scale = np.where(better, new_scale, scale)
        best = np.where(better, scale * sumlx, best)
    levels = np.where(zero, F32(-nmax), levels)  # the C code leaves L = 0 (not nmax) for an all-zero sub-block
    scale = np.where(zero, F32(0), scale)
    assert levels.shape[0] == n
    return scale, levels + nmax


def _f16(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16)


def _super_blocks(data: np.ndarray) -> np.ndarray:
    data = np.ascontiguousarray(data, dtype=np.float32)
    if data.shape[-1] % QK_K:
        raise ValueError(f"K-quant rows must be a multiple of {QK_K} long, got {data.shape[-1]}")
    if not np.isfinite(data).all():
        raise ValueError("K-quant input holds NaN or inf")
    return data.reshape(-1, QK_K)


def _scales_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Pack 8 6-bit scales and 8 6-bit mins [nb, 8] into the 12 bytes of Q4_K / Q5_K."""
    out = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return out


def _affine_blocks(data: np.ndarray, nmax: int, rmin: float, nstep: int):
    """The part Q4_K and Q5_K share: per super-block d, dmin (f16), packed scales and the levels
    L [nb, 256] in 0..nmax."""
    blocks = _super_blocks(data)
    nb = blocks.shape[0]
    x = np.ascontiguousarray(blocks.reshape(nb * 8, 32).T)  # [32, nb*8]
    av_x = np.sqrt(_ordered_sum(x * x) / F32(32))
    weights = av_x + np.abs(x)
    scales, mins, levels = make_qkx2_quants(x, weights, nmax, rmin, 0.1, nstep)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
    # C stores nearest_int's int in a uint8 before MIN(63, .): keep that wrap-around
    ls = np.minimum(_nearest_int(inv_scale[:, None] * scales).astype(np.int64) & 0xFF, 63).astype(np.uint8)
    lm = np.minimum(_nearest_int(inv_min[:, None] * mins).astype(np.int64) & 0xFF, 63).astype(np.uint8)
    d = _f16(max_scale / F32(63))
    dmin = _f16(max_min / F32(63))
    sub_d = (d.astype(F32)[:, None] * ls.astype(F32)).reshape(-1)  # [nb*8]
    sub_dm = (dmin.astype(F32)[:, None] * lm.astype(F32)).reshape(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_nearest_int((x + sub_dm) / sub_d), 0, nmax)
    levels = np.where(sub_d != 0, requant, levels)  # `if (!d) continue;` keeps the search's levels
    levels = levels.T.reshape(nb, QK_K).astype(np.uint8)
    return d, dmin, _scales_min_k4(ls, lm), levels


def _nibbles(levels: np.ndarray) -> np.ndarray:
    """[nb, 256] levels -> [nb, 128]: in each 64, byte l = L[l] | L[l+32] << 4."""
    halves = (levels & 0xF).reshape(-1, 4, 2, 32)
    return (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(-1, 128)


def quantize_q4_k(data: np.ndarray) -> np.ndarray:
    """Rows [..., n] (n a multiple of 256) -> Q4_K bytes [..., n // 256 * 144] (d, dmin, scales, qs)."""
    d, dmin, scales, levels = _affine_blocks(data, 15, -1.0, 20)
    out = np.concatenate([d[:, None].view(np.uint8), dmin[:, None].view(np.uint8), scales, _nibbles(levels)], axis=1)
    return out.reshape(*data.shape[:-1], -1)


def quantize_q5_k(data: np.ndarray) -> np.ndarray:
    """Rows [..., n] -> Q5_K bytes [..., n // 256 * 176] (d, dmin, scales, qh, qs)."""
    d, dmin, scales, levels = _affine_blocks(data, 31, -0.5, 15)
    high = (levels >> 4).reshape(-1, 4, 2, 32)  # [nb, 64-group k, first/second 32, j]
    shifts = (2 * np.arange(4))[None, :, None, None] + np.arange(2)[None, None, :, None]
    qh = (high << shifts).sum(axis=(1, 2)).astype(np.uint8)
    out = np.concatenate([d[:, None].view(np.uint8), dmin[:, None].view(np.uint8), scales, qh, _nibbles(levels)],
                         axis=1)
    return out.reshape(*data.shape[:-1], -1)


def quantize_q6_k(data: np.ndarray) -> np.ndarray:
    """Rows [..., n] -> Q6_K bytes [..., n // 256 * 210] (ql, qh, int8 scales, d)."""
    blocks = _super_blocks(data)
    nb = blocks.shape[0]
    x = np.ascontiguousarray(blocks.reshape(nb * 16, 16).T)  # [16, nb*16]
    scales, levels = make_qx_quants(x, 32)
    scales = scales.reshape(nb, 16)
    first_max = np.abs(scales).argmax(axis=1)
    max_scale = scales[np.arange(nb), first_max]
    zero = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F32(-128) / np.where(zero, F32(1), max_scale)
        d = _f16(F32(1) / iscale)
    sc = np.minimum(_nearest_int(iscale[:, None] * scales), 127).astype(np.int8)
    sub_d = (d.astype(F32)[:, None] * sc.astype(F32)).reshape(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_nearest_int(x / sub_d), -32, 31) + 32
    levels = np.where(sub_d != 0, requant, levels).T.reshape(nb, QK_K).astype(np.uint8)
    quads = levels.reshape(nb, 2, 4, 32)  # [nb, 128-half, which 32, l]
    ql = np.concatenate([(quads[:, :, 0] & 0xF) | ((quads[:, :, 2] & 0xF) << 4),
                         (quads[:, :, 1] & 0xF) | ((quads[:, :, 3] & 0xF) << 4)], axis=2).reshape(nb, 128)
    qh = ((quads[:, :, 0] >> 4) | ((quads[:, :, 1] >> 4) << 2) | ((quads[:, :, 2] >> 4) << 4)
          | ((quads[:, :, 3] >> 4) << 6)).reshape(nb, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d[:, None].view(np.uint8)], axis=1)
    out[zero] = 0
    return out.reshape(*data.shape[:-1], -1)


QUANTIZERS = {"q4_k": quantize_q4_k, "q5_k": quantize_q5_k, "q6_k": quantize_q6_k}
PARALLEL_MIN_WEIGHTS = 1 << 18


def quantize(data: np.ndarray, name: str, threads: int | None = None) -> np.ndarray:
    """QUANTIZERS[name](data) with its rows split over `threads` threads (default: the CPUs this
    process may use). NumPy's ufuncs release the GIL, and blocks are independent, so the bytes are
    the same for any split."""
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    rows = data.reshape(-1, data.shape[-1])
    if threads <= 1 or rows.size < PARALLEL_MIN_WEIGHTS or len(rows) < 2:
        return QUANTIZERS[name](data)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(threads, len(rows))) as pool:
        parts = list(pool.map(QUANTIZERS[name], np.array_split(rows, min(threads, len(rows)))))
    return np.concatenate(parts).reshape(*data.shape[:-1], -1)
